"""The units behind ``GradProbe``, without a ``Trainer``: schedule, probe set, notes, arguments, alert records."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lightning_gradprobe import Culprit, CulpritKind, GradProbe, Verdict, probe
from lightning_gradprobe._probe_set import ProbeSet
from lightning_gradprobe._schedule import Moment, Plan, ProbeSchedule
from lightning_gradprobe.alerts import Alert, AlertCondition, AlertThresholds, ProbeFigures, evaluate_alerts
from lightning_gradprobe.core._notes import Notes


def _fit_moment(epoch=0, step=0, max_epochs=None):
    return Moment(fitting=True, epoch=epoch, global_step=step, max_epochs=max_epochs)


def test_schedule_every_n_epochs_once_per_epoch_never_in_the_sanity_check():
    schedule = ProbeSchedule(every_n_epochs=2, every_n_train_steps=None, max_overhead=None)
    plans = [schedule.plan(_fit_moment(epoch)) for epoch in range(4)]
    assert plans == [Plan.NOT_DUE, Plan.PROBE, Plan.NOT_DUE, Plan.PROBE]
    schedule.record_probe(_fit_moment(3), 0.1)
    assert schedule.plan(_fit_moment(3)) is Plan.NOT_DUE  # a second validation in the same epoch
    assert schedule.plan(Moment(fitting=True, sanity_checking=True, epoch=1)) is Plan.NOT_DUE
    assert schedule.plan(Moment(fitting=False)) is Plan.PROBE  # an explicit validate()/test() always probes


def test_schedule_every_n_train_steps():
    schedule = ProbeSchedule(every_n_epochs=1, every_n_train_steps=10, max_overhead=None)
    assert schedule.plan(_fit_moment(step=3)) is Plan.PROBE
    schedule.record_probe(_fit_moment(step=3), 0.1)
    assert schedule.plan(_fit_moment(step=12)) is Plan.NOT_DUE
    assert schedule.plan(_fit_moment(step=13)) is Plan.PROBE


def test_schedule_backs_off_twice_as_long_after_each_failure_and_resumes():
    schedule = ProbeSchedule(every_n_epochs=1, every_n_train_steps=None, max_overhead=None)
    assert schedule.back_off() == 1 and schedule.back_off() == 3
    plans = [schedule.plan(_fit_moment(epoch)) for epoch in range(4)]
    assert plans == [Plan.BACKING_OFF] * 3 + [Plan.PROBE]


def test_schedule_postpones_over_budget_except_the_last_validation_and_lets_processes_agree():
    schedule = ProbeSchedule(every_n_epochs=1, every_n_train_steps=None, max_overhead=0.05)
    schedule.start_fit(now=0.0)
    assert schedule.plan(_fit_moment(0, max_epochs=20), now=0.5) is Plan.PROBE  # no cost known yet
    schedule.record_probe(_fit_moment(0), 1.0)  # 1 s of probing in a 2 s fit: far over 5%
    budget = schedule.budget(_fit_moment(1), now=2.0)
    assert budget is not None and budget.over and "max_overhead" in str(budget)
    assert schedule.plan(_fit_moment(1, max_epochs=20), now=2.0) is Plan.POSTPONED
    assert schedule.plan(_fit_moment(19, max_epochs=20), now=2.0) is Plan.MILESTONE  # the last epoch
    assert schedule.plan(_fit_moment(2, max_epochs=20), now=2.0, agree=lambda _: False) is Plan.PROBE
    assert schedule.postponed == 1
    assert schedule.plan(_fit_moment(3, max_epochs=20), now=100.0) is Plan.PROBE  # back under budget


def test_the_budget_keeps_room_for_the_last_validation_and_counts_every_second():
    schedule = ProbeSchedule(every_n_epochs=1, every_n_train_steps=None, max_overhead=0.05)
    schedule.start_fit(now=0.0)
    for epoch, cost in zip((0, 9, 19, 29), (0.2, 0.1, 0.1, 0.1), strict=True):  # one-time costs in the first
        schedule.record_probe(_fit_moment(epoch, max_epochs=40), cost)
    budget = schedule.budget(_fit_moment(37, max_epochs=40), now=12.5)  # 12 s of training, 0.5 s of probing
    assert budget is not None and (budget.spent, budget.training, budget.expected) == (0.5, 12.0, 0.1)
    # 0.6 s would be exactly 5% of 12 s now, but the last validation's probe must still fit the whole fit's 5%.
    assert budget.reserved == 0.1 and not budget.spent + budget.expected > 0.05 * budget.training
    assert schedule.plan(_fit_moment(37, max_epochs=40), now=12.5) is Plan.POSTPONED
    assert schedule.plan(_fit_moment(39, max_epochs=40), now=13.0).probes  # the room kept for it


def test_the_last_epoch_is_due_whatever_every_n_epochs_says():
    schedule = ProbeSchedule(every_n_epochs=3, every_n_train_steps=None, max_overhead=None)
    due = [e for e in range(10) if schedule.is_due(_fit_moment(e, max_epochs=10))]
    assert due == [2, 5, 8, 9]


def test_a_resumed_fit_spreads_its_milestones_from_where_it_resumed():
    schedule = ProbeSchedule(every_n_epochs=1, every_n_train_steps=None, max_overhead=0.05)
    schedule.start_fit(now=0.0)
    plans = []
    for epoch in range(30, 40):  # resumed at epoch 30 of 40; every probe is far over budget
        now = float(epoch - 29)
        plan = schedule.plan(_fit_moment(epoch, max_epochs=40), now=now)
        plans.append(plan)
        if plan.probes:
            schedule.record_probe(_fit_moment(epoch, max_epochs=40), 0.5)
    probed = [30 + i for i, plan in enumerate(plans) if plan.probes]
    assert probed[0] == 30 and probed[-1] == 39 and len(probed) == 5  # not four in a row at 30-33
    assert probed[1] > 31


def test_schedule_pause_and_state_round_trip():
    schedule = ProbeSchedule(every_n_epochs=1, every_n_train_steps=None, max_overhead=None)
    assert schedule.pause("cannot read the batch") and not schedule.pause("again")
    assert schedule.plan(_fit_moment(0)) is Plan.PAUSED and schedule.paused == "cannot read the batch"
    schedule.record_probe(_fit_moment(4, step=40), 0.1)
    schedule.back_off()
    restored = ProbeSchedule(every_n_epochs=1, every_n_train_steps=None, max_overhead=None)
    restored.load_state_dict(json.loads(json.dumps(schedule.state_dict())))
    assert (restored.last_probe_epoch, restored.last_probe_step, restored.failures, restored.skip) == (4, 40, 1, 1)


def _batches(count=5, size=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, generator=generator), torch.arange(size) + i * size) for i in range(count)]


def test_probe_set_draws_uniformly_keeps_the_draw_and_shares_it_out():
    samples = ProbeSet(size=4, seed=0, redraw=False)
    samples.begin(due=True, world_size=1, rank=0, probes_done=0)
    for x, y in _batches():
        samples.offer(x, y)
    samples.finish()
    first = samples.inputs.clone()
    assert len(samples) == 4 and samples.labels.unique().numel() == 4
    samples.begin(due=True, world_size=1, rank=0, probes_done=1)
    assert not samples.drawing  # kept: nothing more is drawn
    inputs, labels = samples.share(world_size=2)
    assert inputs.shape == (2, 3) and torch.equal(inputs, first[:2]) and labels.shape == (2,)


def test_probe_set_redraws_with_a_new_seed_per_probe_and_per_rank():
    def draw(probes_done, rank):
        samples = ProbeSet(size=4, seed=0, redraw=True)
        samples.begin(due=True, world_size=2, rank=rank, probes_done=probes_done)
        for x, y in _batches():
            samples.offer(x, y)
        samples.finish()
        return samples.labels

    assert not torch.equal(draw(0, 0), draw(1, 0)) and not torch.equal(draw(0, 0), draw(0, 1))
    assert torch.equal(draw(0, 0), draw(0, 0))


def test_probe_set_leaves_out_non_finite_and_padded_rows_and_round_trips():
    samples = ProbeSet(size=3, seed=0, redraw=False)
    samples.begin(due=True, world_size=1, rank=0, probes_done=0)
    x = torch.randn(6, 3)
    x[1, 0] = float("nan")
    samples.offer(x, None)
    samples.offer(torch.randn(4, 5), None)  # another per-sample shape: padded to another length
    samples.finish()
    assert samples.nonfinite_inputs == 1 and samples.mismatched == 4 and "padded" in samples.mismatch_note()
    assert samples.inputs.isfinite().all()
    assert samples.shrink() and samples.size == 1 and not samples.shrink()
    restored = ProbeSet(size=3, seed=0, redraw=False)
    restored.load_state_dict(samples.state_dict())
    assert torch.equal(restored.inputs, samples.inputs) and restored.size == 1


def test_alert_keeps_its_culprits_through_a_checkpoint():
    culprit = Culprit("encoder.1", "Swish", CulpritKind.INPUT, 0.12, Verdict.FAIL, (), None)
    alert = Alert(AlertCondition.FAILED_CHECKS, 0.5, 0.0, 10, (1, 3), "2 of 4 fail", (culprit,))
    assert Alert.from_dict(json.loads(json.dumps(alert.to_dict()))) == alert
    callback = GradProbe()
    callback.alerts = [alert]
    resumed = GradProbe()
    resumed.load_state_dict(callback.state_dict())
    assert resumed.alerts == [alert] and resumed.alerts[0].culprits[0].kind is CulpritKind.INPUT


def test_alert_text_is_built_from_culprits_of_each_kind():
    weights = Culprit("head", "CustomLinear", CulpritKind.PARAMETER, 0.1)
    inputs = Culprit("body.act", "Swish", CulpritKind.INPUT, 0.2)
    figures = ProbeFigures(probed=4, checked=4, failed=1, wrong_parameters=1, culprits=(weights, inputs))
    alerts = {a.condition: a for a in evaluate_alerts(figures, AlertThresholds(), step=3)}
    assert alerts[AlertCondition.FAILED_CHECKS].culprits == (inputs,)
    assert "body.act (Swish, input)" in alerts[AlertCondition.FAILED_CHECKS].message
    assert alerts[AlertCondition.PARAMETER_GRADIENTS].culprits == (weights,)


def test_alert_text_says_what_kind_of_batch_mixing():
    """A backward that mixes samples names it in the failed-checks alert; a leak the backward is blind to, in the
    leakage alert. Counts add across processes like the others."""
    mixing = ProbeFigures(probed=8, checked=8, failed=8, mixing_pairs=56)
    (failed,) = evaluate_alerts(mixing, AlertThresholds(), step=1)
    assert "mixes samples the forward keeps apart (56" in failed.message
    blind = ProbeFigures(probed=8, checked=8, inconclusive=8, leaking_pairs=3, blind_pairs=3)
    (leakage,) = evaluate_alerts(blind, AlertThresholds(), step=1)
    assert leakage.condition is AlertCondition.BATCH_LEAKAGE and "for 3 of them the backward claims" in leakage.message
    both = ProbeFigures.from_gathered(torch.stack([blind.to_tensor(), mixing.to_tensor()]))
    assert (both.blind_pairs, both.mixing_pairs, both.leaking_pairs) == (3, 56, 3)
    (plain,) = evaluate_alerts(ProbeFigures(probed=8, checked=8, leaking_pairs=3), AlertThresholds(), step=1)
    assert "claims" not in plain.message


def test_notes_warn_once_per_model_and_reason():
    notes = Notes(subject=torch.nn.Linear(2, 2))
    notes.add("a remark")
    notes.add("projections", weaker=True)
    assert notes.texts() == ("a remark", "weaker check: projections")
    with pytest.warns(RuntimeWarning, match="weaker check: projections") as caught:
        notes.say_warnings()
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        notes.say_warnings()  # said already for this model


def test_a_weaker_check_is_said_once_per_model_object():
    x = torch.randn(3, 4)

    def model_factory():
        return torch.nn.Sequential(torch.nn.Linear(4, 80))  # 80 outputs: compared through projections

    model = model_factory()
    with pytest.warns(RuntimeWarning, match="random projections"):
        probe(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe(model, x)
    with pytest.warns(RuntimeWarning, match="random projections"):
        probe(model_factory(), x)  # another model is told too


@pytest.mark.parametrize(
    ("arguments", "error", "named"),
    [
        ({"seed": None}, TypeError, "`seed`"),
        ({"seed": "abc"}, TypeError, "`seed`"),
        ({"num_samples": 0}, ValueError, "`num_samples`"),
        ({"every_n_epochs": 2, "every_n_train_steps": 5}, ValueError, "mutually exclusive"),
        ({"max_overhead": float("nan")}, ValueError, "`max_overhead`"),
        ({"time_budget": -1}, ValueError, "`time_budget`"),
        ({"fail_threshold": 2}, ValueError, "`fail_threshold`"),
        ({"on_alert": "stopp"}, ValueError, "`on_alert`"),
        ({"target": "labels"}, ValueError, "`target`"),
        ({"localize": "yes"}, TypeError, "`localize`"),
        ({"feature_names": "age"}, TypeError, "`feature_names`"),
        ({"tokens": 3}, TypeError, "`tokens`"),
        ({"input_key": 1.5}, TypeError, "`input_key`"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(arguments, error, named):
    with pytest.raises(error, match=named):
        GradProbe(**arguments)


def test_alerts_from_a_0_1_checkpoint_load_without_their_text_culprits():
    old = {"condition": "failed_checks", "value": 1.0, "threshold": 0.0, "step": 3, "samples": [0],
           "message": "8 of 8 fail", "culprits": ["enc.1 (Swish, input)"]}  # fmt: skip
    callback = GradProbe()
    callback.load_state_dict({"alerts": [old]})
    assert callback.alerts[0].message == "8 of 8 fail" and callback.alerts[0].culprits == ()
