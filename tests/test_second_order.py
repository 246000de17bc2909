"""Second order: the double backward through the input, judged like the first order."""

import warnings

import pytest
import torch
from torch import nn
from zoo import TanhWithBackward, second_order_models

from lightning_gradprobe import Verdict, probe

SEEDS = range(10)
CORRECT, WRONG = (sorted(models) for models in second_order_models(0))


@pytest.mark.slow
@pytest.mark.parametrize("name", CORRECT)
def test_correct_double_backwards_never_fail(name):
    """Never ``fail``; the mixed term of a saturated tanh is ``inconclusive`` on 5 to 8 seeds in 100 (its float64
    values carry noise far above eps |f|, see ``_parameters._beyond_their_spread``): two seeds in ten may be."""
    verdicts, mixed = [], []
    for seed in SEEDS:
        model, x = second_order_models(seed)[0][name]
        report = probe(model, x, seed=seed, second_order=True)
        assert report.second_order.ok and report.second_order.mixed_term is not Verdict.FAIL, f"seed {seed}:\n{report}"
        verdicts += report.second_order.verdicts
        mixed.append(report.second_order.mixed_term)
    assert Verdict.FAIL not in verdicts
    assert sum(v is Verdict.INCONCLUSIVE for v in verdicts) <= 0.05 * len(verdicts)
    assert sum(v is Verdict.PASS for v in mixed) >= len(SEEDS) - 2, mixed


@pytest.mark.slow
@pytest.mark.parametrize("name", WRONG)
def test_wrong_double_backwards_fail_while_first_order_passes(name):
    first, second = [], []
    for seed in SEEDS:
        model, x = second_order_models(seed)[1][name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            report = probe(model, x, seed=seed, second_order=True)
        first += report.verdicts
        second += report.second_order.verdicts
        assert not report.ok and "second order" in " ".join(report.problems())
    assert Verdict.FAIL not in first, "the first derivative is right"
    if "mixed term" in name:  # only the weights' side of the double backward is wrong
        assert report.second_order.mixed_term is Verdict.FAIL and Verdict.FAIL not in second
        return
    assert sum(v is Verdict.FAIL for v in second) >= 0.99 * len(second)


@pytest.mark.parametrize("name", WRONG)
def test_the_culprit_module_is_named_first(name):
    model, x = second_order_models(0)[1][name]
    report = probe(model, x, second_order=True, localize=True)
    culprit = report.second_order.culprits[0]
    expected = "PenaltyLinear" if "mixed term" in name else "SecondOrderAct"
    assert type(model.get_submodule(culprit.module)).__name__ == expected and not culprit.explained_by
    assert culprit.kind == "second-order" and "culprit" in str(report)


def test_once_differentiable_is_a_finding_not_a_crash():
    model, x = second_order_models(0)[1]["pinn once_differentiable"]
    report = probe(model, x, second_order=True, localize=True)
    assert report.second_order.finding and "once_differentiable" in report.second_order.finding
    assert str(report.second_order.culprits[0]).startswith("not twice differentiable: 1 (SecondOrderAct")


def test_a_zero_hessian_passes():
    model, x = second_order_models(0)[0]["relu-mlp (zero Hessian)"]
    report = probe(model, x, second_order=True)
    assert report.second_order.verdicts == (Verdict.PASS,) * 8
    assert (report.second_order.margin == 0).all()  # both sides exactly zero


def _gradgrad_functions():
    def tanh_chain(x):
        return torch.tanh(x @ torch.linspace(-1, 1, 15, dtype=x.dtype).reshape(5, 3))

    return {
        "tanh-chain": (tanh_chain, True),
        "hand-written tanh": (lambda x: TanhWithBackward.apply(x, "ok"), True),
        "wrong second derivative": (lambda x: TanhWithBackward.apply(x, "sign"), False),
        "missing term": (lambda x: TanhWithBackward.apply(x, "missing"), False),
        "softplus": (torch.nn.functional.softplus, True),
    }


@pytest.mark.parametrize("name", sorted(_gradgrad_functions()))
def test_agrees_with_gradgradcheck_on_float64(name):
    function, expected = _gradgrad_functions()[name]
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = torch.autograd.gradgradcheck(function, (x.clone().requires_grad_(),), raise_exception=False)
    report = probe(function, x, second_order=True)
    assert reference == expected
    assert report.second_order.ok == reference, str(report)
    assert report.ok == reference


def test_second_order_is_off_by_default():
    model, x = second_order_models(0)[1]["pinn detached intermediate"]
    report = probe(model, x)
    assert report.second_order is None and report.ok


def test_callback_logs_second_order_and_names_the_culprit(tmp_path):
    """A real Trainer run: the second-order alert stops training, its figures reach TensorBoard's event files."""
    import sys
    from pathlib import Path

    import lightning.pytorch as pl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    from pinn_second_order import Poisson1D, loaders

    from lightning_gradprobe import GradProbe
    from lightning_gradprobe.alerts import AlertCondition

    train, val = loaders()
    probe_callback = GradProbe(second_order=True, target=None, on_alert="stop", max_overhead=None)
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="pinn")
    trainer = pl.Trainer(
        max_epochs=3, logger=logger, callbacks=[probe_callback], enable_progress_bar=False, enable_checkpointing=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Poisson1D(correct=False), train, val)
    (alert,) = probe_callback.alerts
    assert alert.condition is AlertCondition.SECOND_ORDER_CHECKS and trainer.current_epoch == 1
    assert alert.culprits[0].label == "net.1 (Tanh, second-order)"
    events = EventAccumulator(str(tmp_path / "pinn" / "version_0"))
    events.Reload()
    fail = events.Scalars("gradprobe/second_order/fail_fraction")
    margin = events.Scalars("gradprobe/second_order/margin_max")
    assert [e.value for e in fail] == [1.0] and margin[0].value > 1
    assert [e.value for e in events.Scalars("gradprobe/checks/fail_fraction")] == [0.0]  # first order is right


def test_every_parameter_frozen_leaves_no_mixed_term():
    """No trainable parameter: nothing for a gradient penalty to send to the weights (it raised "`inputs` argument to
    `grad()` cannot be empty")."""
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).requires_grad_(False)
    report = probe(model, torch.randn(4, 3), second_order=True)
    assert report.second_order is not None and report.second_order.mixed_term is None and report.ok
