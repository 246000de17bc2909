"""GradProbe on real Trainer runs: schedule, probe set, alerts, robustness, metrics, checkpoints."""

import warnings

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lit_models import DigitsModule, TensorBatchModule, trainer

from lightning_gradprobe import GradientCheckError, GradProbe, GradProbeStoppingReason
from lightning_gradprobe.alerts import Alert, AlertCondition


def _fit(tmp_path, module, callback, **kwargs):
    run = trainer(tmp_path, [callback], **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(module)
    return run, [str(w.message) for w in caught if "GradProbe" in str(w.message)]


@pytest.mark.parametrize(
    ("module", "target"),
    [
        (DigitsModule(batch="tuple"), "argmax"),
        (DigitsModule(batch="dict"), "label"),
        (TensorBatchModule(batch="tensor"), "argmax"),
        (DigitsModule(batch="iterable"), "argmax"),
    ],
)
def test_zero_config_on_common_batch_shapes(tmp_path, module, target):
    callback = GradProbe(max_overhead=None, target=target)
    run, messages = _fit(tmp_path, module, callback)
    assert callback.probes_done == 2 and not messages, messages
    assert callback.last_report is not None and callback.last_report.ok, str(callback.last_report)
    assert float(run.callback_metrics["gradprobe/checks/fail_fraction"]) == 0.0
    assert len(callback.last_report.verdicts) == 8


def test_wrong_backward_warns_with_the_evidence(tmp_path):
    callback = GradProbe(max_overhead=None)
    _, messages = _fit(tmp_path, DigitsModule(bug="scale"), callback)
    assert len(messages) == 2 and all("[failed_checks] 8 of 8" in m for m in messages)
    assert [a.condition for a in callback.alerts] == [AlertCondition.FAILED_CHECKS] * 2


def test_on_alert_stop_ends_training_like_early_stopping(tmp_path):
    callback = GradProbe(max_overhead=None, on_alert="stop")
    run, _ = _fit(tmp_path, DigitsModule(bug="scale"), callback, max_epochs=5)
    assert run.should_stop and run.current_epoch == 1 and callback.probes_done == 1
    assert callback.stopping_reason is GradProbeStoppingReason.ALERT
    assert "fail the gradient check" in callback.stopping_reason_message


def test_on_alert_raise_carries_report_and_alerts(tmp_path):
    callback = GradProbe(max_overhead=None, on_alert="raise")
    with pytest.raises(GradientCheckError, match="failed_checks") as info:
        _fit(tmp_path, DigitsModule(bug="scale"), callback)
    assert info.value.report is callback.last_report and not info.value.report.ok
    assert info.value.alerts[0].condition is AlertCondition.FAILED_CHECKS


def test_on_alert_callable_and_thresholds(tmp_path):
    received: list[Alert] = []
    _fit(tmp_path, DigitsModule(bug="scale"), GradProbe(max_overhead=None, on_alert=received.append))
    assert len(received) == 2 and received[0].value == 1.0 and received[0].threshold == 0.0
    assert received[0].step == 7 and len(received[0].samples) == 8  # the step its scalars are logged at
    received.clear()
    _fit(tmp_path, DigitsModule(bug="ok"), GradProbe(max_overhead=None, on_alert=received.append))
    assert received == []


@pytest.mark.parametrize("leak", [True, "blind"])
def test_leakage_alert(tmp_path, leak):
    """A forward that mixes neighbouring samples, its backward right or blind to it (the mix detached: autograd
    claims no cross-sample gradient, and every per-sample check would pass): the same alert, which says which. The
    detached mix also leaves the weights' gradients without it: the parameter check says so."""
    received: list[Alert] = []
    _fit(tmp_path, DigitsModule(leak=leak), GradProbe(max_overhead=None, on_alert=received.append))
    leakage = [a for a in received if a.condition is AlertCondition.BATCH_LEAKAGE]
    assert len(leakage) == 2 and all(
        ("claims no cross-sample gradient" in a.message) == (leak == "blind") for a in leakage
    )
    expected = {AlertCondition.BATCH_LEAKAGE} | ({AlertCondition.PARAMETER_GRADIENTS} if leak == "blind" else set())
    assert {a.condition for a in received} == expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_epochs": 2, "every_n_train_steps": 5}, "mutually exclusive"),
        ({"fail_threshold": 1.0}, "fail_threshold"),
        ({"vanishing_threshold": -0.1}, "vanishing_threshold"),
        ({"on_alert": "panic"}, "on_alert"),
        ({"num_samples": 0}, "num_samples"),
        ({"target": "logits"}, "target"),
        ({"time_budget": 0}, "time_budget"),
    ],
)
def test_nonsense_arguments_get_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradProbe(max_overhead=None, **kwargs)


def test_schedule_every_n_epochs_and_sanity_check_skipped(tmp_path):
    callback = GradProbe(max_overhead=None, every_n_epochs=2)
    _fit(tmp_path, DigitsModule(), callback, max_epochs=4, num_sanity_val_steps=2)
    assert callback.probes_done == 2 and callback.schedule.last_probe_epoch == 3


def test_schedule_every_n_train_steps_mid_epoch(tmp_path):
    callback = GradProbe(max_overhead=None, every_n_train_steps=6)
    _fit(tmp_path, DigitsModule(), callback, max_epochs=2, val_check_interval=0.25)  # 8 steps/epoch, val every 2
    assert callback.probes_done == 3  # steps 2, 8, 14


def test_probe_set_fixed_by_default_redrawn_on_request(tmp_path):
    fixed = GradProbe(max_overhead=None)
    seen = []
    module = DigitsModule()
    run = trainer(tmp_path, [fixed], max_epochs=3)
    original = fixed._finish

    def spy(trainer_, pl_module):
        original(trainer_, pl_module)
        seen.append(fixed.samples.inputs.clone())

    fixed._finish = spy
    run.fit(module)
    assert all(torch.equal(seen[0], s) for s in seen)
    redraw = GradProbe(max_overhead=None, redraw=True)
    seen_redraw = []
    original_redraw = redraw._finish

    def spy_redraw(trainer_, pl_module):
        original_redraw(trainer_, pl_module)
        seen_redraw.append(redraw.samples.inputs.clone())

    redraw._finish = spy_redraw
    trainer(tmp_path, [redraw], max_epochs=3).fit(DigitsModule())
    assert not torch.equal(seen_redraw[0], seen_redraw[1])


def test_probe_set_spans_all_validation_loaders_and_short_last_batch(tmp_path):
    callback = GradProbe(max_overhead=None, num_samples=40)
    _fit(tmp_path, DigitsModule(val_loaders=2, n_val=30, batch_size=16), callback, max_epochs=1)
    assert len(callback.samples.inputs) == 40  # 2 loaders x 30 samples (batches of 16, 14)
    assert len(callback.last_report.verdicts) == 40


def test_trainer_validate_and_test_probe_under_inference_mode(tmp_path):
    module = DigitsModule()
    callback = GradProbe(max_overhead=None, on_test=True)
    run = trainer(tmp_path, [callback], max_epochs=1)
    run.fit(module)
    done = callback.probes_done
    metrics = run.validate(module, verbose=False)[0]
    assert callback.probes_done == done + 1 and metrics["gradprobe/checks/fail_fraction"] == 0.0
    assert callback.last_report.ok and callback.last_report.saliency.abs().sum() > 0
    run.test(module, verbose=False)
    assert callback.probes_done == done + 2


def test_probe_failure_never_kills_training_and_backs_off(tmp_path):
    def broken(pl_module, x):
        raise RuntimeError("this model cannot be probed")

    callback = GradProbe(max_overhead=None, forward=broken)
    run, messages = _fit(tmp_path, DigitsModule(), callback, max_epochs=4)
    assert run.current_epoch == 4  # training completed
    assert len(messages) == 1 and "this model cannot be probed" in messages[0] and "training goes on" in messages[0]
    assert callback.schedule.failures == 2  # epochs 0 and 2 tried; 1 skipped (back-off), 3 skipped (back-off doubles)


def test_time_budget_shrinks_the_probe(tmp_path):
    callback = GradProbe(max_overhead=None, time_budget=1e-6)
    _, messages = _fit(tmp_path, DigitsModule(), callback, max_epochs=2)
    assert callback.samples.size == 2 and any("time_budget" in m for m in messages)


def test_metrics_reach_csv_logger_and_run_without_logger(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    _fit(tmp_path, DigitsModule(), GradProbe(max_overhead=None), logger=logger)
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "gradprobe/checks/fail_fraction" in header and "gradprobe/health/grad_norm_p50" in header
    received = []
    _fit(tmp_path, DigitsModule(bug="scale"), GradProbe(max_overhead=None, on_alert=received.append), logger=False)
    assert received


def test_checkpoint_resume_keeps_probe_set_and_schedule(tmp_path):
    callback = GradProbe(max_overhead=None, every_n_epochs=2)
    run = trainer(tmp_path, [callback], max_epochs=2, enable_checkpointing=True)
    run.fit(DigitsModule())
    path = tmp_path / "resume.ckpt"
    run.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["callbacks"][callback.state_key]
    assert state["probes_done"] == 1 and torch.equal(state["probe_inputs"], callback.samples.inputs)
    assert state["skip"] == 0 and state["failures"] == 0  # the back-off resumes where it was

    resumed = GradProbe(max_overhead=None, every_n_epochs=2)
    run2 = trainer(tmp_path, [resumed], max_epochs=4)
    run2.fit(DigitsModule(), ckpt_path=path)
    assert resumed.probes_done == 2 and resumed.schedule.last_probe_epoch == 3
    assert torch.equal(resumed.samples.inputs, callback.samples.inputs)
    old = GradProbe(max_overhead=None)
    old.load_state_dict({"probes_done": 3})  # an older, smaller state still loads
    assert old.probes_done == 3 and old.samples.inputs is None and old.alerts == []


def test_overhead_budget_postpones_probes_on_short_epochs(tmp_path):
    budgeted = GradProbe(max_overhead=0.05)
    _fit(tmp_path, DigitsModule(n_train=64), budgeted, max_epochs=8)
    assert budgeted.probes_done >= 1 and budgeted.schedule.postponed >= 1
    assert budgeted.probes_done + budgeted.schedule.postponed == 8
    everything = GradProbe(max_overhead=None)
    _fit(tmp_path, DigitsModule(n_train=64), everything, max_epochs=8)
    assert everything.probes_done == 8 and everything.schedule.postponed == 0
    with pytest.raises(ValueError, match="max_overhead"):
        GradProbe(max_overhead=0)


def test_early_stopping_and_checkpointing_can_monitor_probe_metrics(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    stopper = EarlyStopping(monitor="gradprobe/checks/fail_fraction", mode="min", patience=1)
    keeper = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="gradprobe/checks/fail_fraction", mode="min")
    run = trainer(tmp_path, [GradProbe(max_overhead=None), stopper, keeper], max_epochs=6, enable_checkpointing=True)
    run.fit(DigitsModule())
    assert run.current_epoch == 2  # 0.0 at epoch 0, no improvement at epoch 1: patience 1 spent
    assert keeper.best_model_score == 0.0 and keeper.best_model_path
