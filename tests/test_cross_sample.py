"""Finite differences across samples tell a backward that mixes samples from a forward that does."""

from __future__ import annotations

import warnings
from typing import ClassVar

import pytest
import torch
from cross_sample_cases import Apply, RmsBatchMean, blind_backwards, mixing_backwards, mixing_forwards
from torch import nn
from zoo import Act

from lightning_gradprobe import Verdict, probe


def test_the_reported_reproducer_fails_every_sample_without_an_invented_forward_leak():
    torch.manual_seed(1151)
    model = nn.Sequential(nn.Linear(10, 12), Apply(RmsBatchMean), nn.Linear(12, 3)).eval()
    x = torch.randn(8, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = probe(model, x, seed=151)
    assert report.verdicts == (Verdict.FAIL,) * 8
    assert report.leaking_pairs == () and report.batch_independent is True and report.mixing_pairs
    # The forward really keeps samples apart: moving sample 6 moves only output 6, by exactly 0.0 elsewhere.
    with torch.no_grad():
        base = model.double()(x.double())
        moved = x.double().clone()
        moved[6] += 1e-3
        change = (model(moved) - base).abs().sum(1)
    assert change[6] > 0 and bool((change[torch.arange(8) != 6] == 0).all())


@pytest.mark.parametrize("name", sorted(mixing_backwards()))
def test_mixing_backwards_fail_on_every_sample(name):
    for seed in range(5):
        torch.manual_seed(seed)
        report = probe(mixing_backwards()[name]().eval(), torch.randn(8, 10), seed=seed)
        assert report.verdicts == (Verdict.FAIL,) * 8 and report.leaking_pairs == (), (seed, str(report))


def test_a_forward_that_mixes_samples_is_still_found():
    for seed in range(5):
        torch.manual_seed(seed)
        report = probe(mixing_forwards()["batch-centering"]().eval(), torch.randn(8, 10), seed=seed)
        assert report.batch_independent is False and len(report.leaking_pairs) == 8 * 7
        assert report.verdicts == (Verdict.INCONCLUSIVE,) * 8
    second = probe(mixing_forwards()["batch-centering"]().eval(), torch.randn(8, 10), second_order=True)
    assert second.second_order is None and any("second order not checked" in note for note in second.notes)


@pytest.mark.parametrize("name", sorted(blind_backwards()))
def test_a_forward_that_mixes_samples_is_found_when_the_backward_claims_no_cross_term(name):
    """Batch statistics the backward treats as constants: autograd claims nothing across samples, and the per-sample
    finite differences (every sample moved at once) keep the statistics in place. Their correct twin, autograd
    through the statistics, is a leak found through its claims (above); this one is found by the forward alone,
    with a note on the blind backward, never passed."""
    for seed in range(5):
        torch.manual_seed(seed)
        report = probe(blind_backwards()[name]().eval(), torch.randn(8, 10), seed=seed)
        assert report.batch_independent is False and report.leaking_pairs and not report.ok, str(report)
        assert report.verdicts == (Verdict.INCONCLUSIVE,) * 8
        assert any("claims no cross-sample gradient" in note for note in report.notes)
        assert report.blind_pairs and set(report.blind_pairs) <= set(report.leaking_pairs)
        assert "batch statistics treated as constants" in report.problems()[-1]
    correct = probe(mixing_forwards()["batch-centering"]().eval(), torch.randn(8, 10))
    assert not any("claims no cross-sample gradient" in note for note in correct.notes) and not correct.blind_pairs


def test_a_forward_that_draws_random_numbers_is_not_called_a_leak():
    """A VAE-style forward samples noise in eval mode: the same batch twice differs, so the forward-only test cannot
    tell mixing from noise; it says so, and claims no leak (a review found it claimed one)."""

    class Sampling(nn.Module):
        def __init__(self):
            super().__init__()
            self.encode, self.decode = nn.Linear(6, 8), nn.Linear(4, 6)

        def forward(self, x):
            mean, log_var = self.encode(x).chunk(2, -1)
            return self.decode(mean + torch.randn_like(mean) * (0.5 * log_var).exp() * 0.1)

    torch.manual_seed(0)
    report = probe(Sampling(), torch.randn(8, 6), check_parameters=False)
    assert report.batch_independent is True and report.blind_pairs == ()
    assert any("not deterministic" in note for note in report.notes)


def test_a_model_that_cannot_run_part_of_its_batch_says_so():
    """A forward that refuses small batches: the forward-only leak test (part of the batch) cannot run; the report
    says so and judges the samples as before."""

    class NeedsTenSamples(nn.Module):
        def forward(self, x):
            if x.shape[0] < 10:
                raise ValueError("at least 10 samples per batch")
            return x.tanh()

    report = probe(NeedsTenSamples(), torch.randn(12, 4))
    assert report.batch_independent is True and set(report.verdicts) == {Verdict.PASS}, str(report)
    assert any("autograd's cross-sample gradients only" in note for note in report.notes)


class _CountedTanh(torch.autograd.Function):
    """``tanh``, counting its backwards by dtype; optionally mixing samples in the model dtype's backward, and
    raising in float64's (a kernel with no float64 backward)."""

    calls: ClassVar[dict[torch.dtype, int]] = {}
    mixing = False
    float64_backward_raises = False

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        _CountedTanh.calls[g.dtype] = _CountedTanh.calls.get(g.dtype, 0) + 1
        if g.dtype == torch.float64 and _CountedTanh.float64_backward_raises:
            raise RuntimeError("this kernel has no float64 backward")
        grad = g * (1 - y * y)
        return grad + grad.mean(0, keepdim=True) if _CountedTanh.mixing else grad


@pytest.fixture
def counted_tanh():
    _CountedTanh.calls, _CountedTanh.mixing, _CountedTanh.float64_backward_raises = {}, False, False
    yield _CountedTanh
    _CountedTanh.calls, _CountedTanh.mixing, _CountedTanh.float64_backward_raises = {}, False, False


def _counted_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 12), Apply(_CountedTanh), nn.Linear(12, 10)).eval()


def test_independence_is_read_from_the_float64_rows_without_a_backward_of_its_own(counted_tanh):
    """10 outputs, a float64 reference: the model's dtype runs the saliency row and one projection, nothing more.
    Asked for a subset of samples (the float64 rows then cover only those), the check runs its own backward."""
    x = torch.randn(8, 10)
    report = probe(_counted_model(), x, check_parameters=False)
    assert report.ok and report.batch_independent is True
    assert counted_tanh.calls[torch.float32] == 2
    counted_tanh.calls = {}
    assert probe(_counted_model(), x, check_parameters=False, check_samples=[0, 3]).batch_independent is True
    assert counted_tanh.calls[torch.float32] == 3


def test_mixing_backward_found_with_and_without_float64_rows(counted_tanh):
    """The same batch-mixing backward, caught through the float64 rows, and by the model dtype's own backward when
    the float64 backward raises (no float64 rows to compare with)."""
    counted_tanh.mixing = True
    x = torch.randn(8, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        through_rows = probe(_counted_model(), x, check_parameters=False)
        counted_tanh.float64_backward_raises, counted_tanh.calls = True, {}
        alone = probe(_counted_model(), x, check_parameters=False)
    assert counted_tanh.calls[torch.float64] == 1  # tried once, raised: nothing to compare with
    for report in (through_rows, alone):
        assert report.verdicts == (Verdict.FAIL,) * 8 and report.mixing_pairs and report.leaking_pairs == ()


class _BatchStatistics(nn.Module):
    """Normalisation by the batch's own statistics: a forward that really mixes samples (in eval mode too)."""

    def forward(self, x):
        return nn.functional.batch_norm(x, None, None, training=True)


@pytest.mark.parametrize("wrong", [False, True])
def test_a_forward_that_mixes_samples_with_a_wrong_backward_is_told_as_a_leak(wrong):
    """The forward mixes samples; the backward's cross-sample gradients are wrong too (or right): leaking pairs and
    ``inconclusive`` either way (per-sample gradients are ill-defined), a note on the wrong cross terms, never "a
    backward that mixes samples the forward keeps apart" (a ``fail`` would not be safe: on a correct model with
    kinks, one source in eight can disagree)."""
    torch.manual_seed(0)
    act = Act("scale" if wrong else "ok")  # tanh; its backward x1.1 when wrong
    model = nn.Sequential(nn.Linear(6, 16), _BatchStatistics(), act, nn.Linear(16, 3)).eval()
    report = probe(model, torch.randn(8, 6), check_parameters=False)
    assert report.batch_independent is False and report.leaking_pairs and report.mixing_pairs == ()
    assert report.verdicts == (Verdict.INCONCLUSIVE,) * 8, str(report)
    assert any("wrong across samples" in note for note in report.notes) == wrong


def test_a_dependence_below_the_model_dtypes_precision_is_no_leak():
    """A forward whose samples touch at 1e-9 (an adaptive ODE solver choosing its step size over the whole batch
    does so at about 1e-12): below float32's precision it is no leak of a float32 model; a float64 model, whose
    precision resolves it, is told of it."""

    class Touching(nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.linear = nn.Linear(6, 3).to(dtype)

        def forward(self, x):
            h = torch.tanh(self.linear(x))
            return h + 1e-9 * h.mean(0, keepdim=True).detach()

    torch.manual_seed(0)
    x = torch.randn(8, 6)
    float32 = probe(Touching(torch.float32), x, check_parameters=False)
    assert float32.batch_independent is True and float32.ok, str(float32)
    float64 = probe(Touching(torch.float64), x.double(), check_parameters=False)
    assert float64.batch_independent is False and float64.blind_pairs
