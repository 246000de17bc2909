"""Each judging stage on constructed evidence: a Jacobian we choose, against a function we know.

The function is float64 and is its own reference, so the Jacobian handed in *is* the evidence judged (the
re-checks at other points differentiate the function itself).
"""

from __future__ import annotations

import math

import torch

from lightning_gradprobe.core._functions import Selection
from lightning_gradprobe.core._verdicts import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    Problem,
    Setting,
    default_rtol,
    first_check,
    judge_samples,
    recheck_at_the_point,
    recheck_nearby,
    recheck_with_grown_step,
    sample_verdicts,
    smooth_but_nonfinite,
)
from lightning_gradprobe.core.report import Verdict

K = 4


def _problem(function):
    n_outputs = function(torch.zeros(1, 3, dtype=torch.float64)).reshape(1, -1).shape[1]
    rtol = default_rtol(torch.float64)
    return Problem(
        function, function, Selection("all", n_outputs), torch.float64, torch.float64, rtol, "autograd", None
    )


def _setting(function, x, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return Setting.draw(_problem(function), x, torch.zeros(len(x), dtype=torch.long), generator, K)


def _true_jacobian(function, x):
    per_sample = torch.func.vmap(torch.func.jacrev(lambda s: function(s[None])[0]))
    return per_sample(x)


def _tanh_layer(x):
    weight = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(3, 2)
    return torch.tanh(x @ weight)


def _points(n=3, seed=0):
    return torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_the_first_check_passes_the_true_jacobian_and_fails_a_wrong_one():
    x = _points()
    setting = _setting(_tanh_layer, x)
    right = first_check(setting, _true_jacobian(_tanh_layer, x)).comparison
    assert bool((right.passed & right.reliable & right.resolved).all())
    wrong = first_check(setting, 1.01 * _true_jacobian(_tanh_layer, x)).comparison
    assert bool((wrong.reliable & ~wrong.passed).all())
    assert float(wrong.relative_error.min()) > 1e3 * default_rtol(torch.float64)  # far past float64's tolerance


def test_a_reliable_failure_stands_when_the_better_check_at_the_point_agrees():
    x = _points()
    setting = _setting(_tanh_layer, x)
    first = first_check(setting, 1.01 * _true_jacobian(_tanh_layer, x))
    failed = first.comparison.reliable & ~first.comparison.passed
    recheck, at_kink = recheck_at_the_point(setting, first, failed)
    assert recheck is not None and bool(recheck.decided.all()) and bool((recheck.codes == FAIL).all())
    assert not at_kink.any()
    assert bool((recheck.steps == setting.step).all())  # the failure stands at the first step


def _x_abs_x(x):
    return x * x.abs()  # smooth derivative 2|x|, but odd non-smoothness at 0: truncation hides from D2


def test_truncation_that_shrinks_with_the_step_overturns_a_failure():
    # x|x| at exactly 0: the central difference is off by O(h) while autograd's 0 is right.
    x = torch.zeros(2, 3, dtype=torch.float64)
    setting = _setting(_x_abs_x, x)
    first = first_check(setting, _true_jacobian(_x_abs_x, x))
    failed = first.comparison.reliable & ~first.comparison.passed
    recheck, _ = recheck_at_the_point(setting, first, failed)
    if recheck is not None:  # where the first step saw a failure, the smaller steps overturn it
        overturned = recheck.decided & failed[recheck.rows]
        assert bool((recheck.codes[overturned] != FAIL).all())
    verdicts = sample_verdicts(
        judge_samples(
            setting.problem,
            _true_jacobian(_x_abs_x, x),
            x,
            setting.index,
            generator=torch.Generator().manual_seed(0),
            n_directions=K,
        ).codes
    )
    assert Verdict.FAIL not in verdicts


def _maximum(x):
    return torch.maximum(x[:, :1], x[:, 1:2]) + 0.0 * x[:, 2:]


def test_a_tie_at_the_sample_is_judged_at_a_nearby_point_not_failed():
    # max(x0, x1) at x0 == x1: the one-sided derivatives differ; the first check cannot judge there.
    x = torch.tensor([[0.5, 0.5, 1.0], [-1.0, -1.0, 0.3]], dtype=torch.float64)
    one_sided = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=torch.float64).expand(2, 1, 3)  # a valid subgradient
    setting = _setting(_maximum, x)
    first = first_check(setting, one_sided)
    unreliable = ~first.comparison.reliable  # a kink inside the stencil, in every direction that crosses the tie
    assert int(unreliable.sum()) >= K
    recheck = recheck_nearby(setting, first, unreliable)
    assert recheck is not None and recheck.moved
    assert bool((recheck.codes[recheck.decided] != FAIL).all())
    judgement = judge_samples(setting.problem, one_sided, x, setting.index,
                              generator=torch.Generator().manual_seed(0), n_directions=K)  # fmt: skip
    assert bool(judgement.moved.all()) and Verdict.FAIL not in sample_verdicts(judgement.codes)


def _huge_offset(x):
    return 1e6 + 1e-3 * torch.sin(x).sum(1, keepdim=True)


def test_round_off_limited_passes_grow_the_step_at_the_same_point():
    # A gradient tiny next to its output: at the first step, round-off hides a 1% error.
    x = _points(2)
    setting = _setting(_huge_offset, x)
    first = first_check(setting, _true_jacobian(_huge_offset, x))
    comparison = first.comparison
    roundoff = comparison.passed & comparison.reliable & ~comparison.resolved & comparison.roundoff_limited
    assert bool(roundoff.all())
    recheck = recheck_with_grown_step(setting, first, roundoff)
    assert recheck is not None and sample_verdicts(recheck.codes) == [Verdict.PASS, Verdict.PASS]
    assert not bool((recheck.codes == FAIL).any()) and bool((recheck.steps >= 64 * setting.step).all())
    wrong = first_check(setting, 1.1 * _true_jacobian(_huge_offset, x))
    grown = recheck_with_grown_step(setting, wrong, roundoff)
    resolved = recheck.codes == PASS  # where the grown step resolves the true Jacobian, it fails a 10% error
    assert grown is not None and bool((grown.codes[resolved] == FAIL).all())


def _constant(x):
    return torch.ones(x.shape[0], 2, dtype=x.dtype) + 0.0 * x[:, :2]


def test_an_exact_zero_jacobian_passes():
    x = _points()
    setting = _setting(_constant, x)
    first = first_check(setting, torch.zeros(3, 2, 3, dtype=torch.float64))
    assert bool((first.comparison.passed & first.comparison.reliable).all())
    judgement = judge_samples(setting.problem, torch.zeros(3, 2, 3, dtype=torch.float64), x, setting.index,
                              generator=torch.Generator().manual_seed(0), n_directions=K)  # fmt: skip
    assert sample_verdicts(judgement.codes) == [Verdict.PASS] * 3


def _square_sum(x):
    return x.pow(2).sum(1, keepdim=True)


def test_a_non_finite_gradient_at_a_smooth_point_fails():
    x = _points()
    jac = _true_jacobian(_square_sum, x).clone()
    jac[1, 0, 2] = math.nan
    setting = _setting(_square_sum, x)
    first = first_check(setting, jac)
    broken = smooth_but_nonfinite(setting, first)
    assert broken[1].all() and not broken[0].any() and not broken[2].any()
    judgement = judge_samples(setting.problem, jac, x, setting.index,
                              generator=torch.Generator().manual_seed(0), n_directions=K)  # fmt: skip
    assert sample_verdicts(judgement.codes) == [Verdict.PASS, Verdict.FAIL, Verdict.PASS]


def test_verdicts_combine_directions_any_fail_fails_all_inconclusive_is_inconclusive():
    codes = torch.tensor([[PASS, FAIL], [INCONCLUSIVE, INCONCLUSIVE], [PASS, INCONCLUSIVE], [PASS, PASS]])
    assert sample_verdicts(codes) == [Verdict.FAIL, Verdict.INCONCLUSIVE, Verdict.PASS, Verdict.PASS]
