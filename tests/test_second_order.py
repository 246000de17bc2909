"""Second order: the double backward through the input, judged like the first order."""

import warnings

import pytest
import torch
from zoo import TanhWithBackward, second_order_models

from lightning_gradprobe import Verdict, probe

SEEDS = range(10)
CORRECT, WRONG = (sorted(models) for models in second_order_models(0))


@pytest.mark.parametrize("name", CORRECT)
def test_correct_double_backwards_never_fail(name):
    verdicts = []
    for seed in SEEDS:
        model, x = second_order_models(seed)[0][name]
        report = probe(model, x, seed=seed, second_order=True)
        assert report.second_order.ok, f"seed {seed}:\n{report}"
        verdicts += report.second_order.verdicts
    assert Verdict.FAIL not in verdicts
    assert sum(v is Verdict.INCONCLUSIVE for v in verdicts) <= 0.05 * len(verdicts)


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
    assert sum(v is Verdict.FAIL for v in second) >= 0.99 * len(second)


@pytest.mark.parametrize("name", WRONG)
def test_the_culprit_module_is_named_first(name):
    model, x = second_order_models(0)[1][name]
    report = probe(model, x, second_order=True, localize=True)
    culprit = report.second_order.culprits[0]
    assert type(model.get_submodule(culprit.module)).__name__ == "SecondOrderAct" and not culprit.explained_by
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
