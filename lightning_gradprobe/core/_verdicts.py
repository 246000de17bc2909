"""Judging: each checked sample along each direction, then one verdict per sample.

Two questions, judged apart:

1. **Is the backward's formula right?** The same model code runs in float64 (the *reference* dtype) and its
   Jacobian, seen through a few random output projections, is compared with float64 central differences.
   The tolerance is the stencil's own measured error plus ``default_rtol(float64)``, five orders of
   magnitude below float32's, so a 5e-4 formula error shows.
2. **Is the model dtype's Jacobian the reference one, up to round-off?** No finite difference needed: the
   model-dtype Jacobian is compared with the float64 one (along the first output projection, where there are
   projections: the model's dtype computes that one, ``MODEL_DTYPE_ROWS``). Beyond its dtype's tolerance of
   the Jacobian's scale (and 10 eps of the problem's own scale, ``|f| / |x|``) it is ``precision-limited``;
   beyond ``1e4 eps`` of the problem's own scale, at the sample and at a nearby point, a float32 backward is
   ``fail`` (a kernel can be wrong in one dtype only).
   Half-precision Jacobians are never failed here: their ties route gradients differently.

The rules each direction of question 1 follows:

- a clean first check (passes, no kink, resolved) is a ``pass``;
- a reliable first check that fails stands, unless a better check at the same point (step / 8, smaller error
  bound) passes: moving away could hide a kernel that breaks exactly there (NaN at an input of 0);
- a pass limited by round-off (a gradient tiny next to its output) is repeated at the same point with a
  step grown until round-off no longer hides a 1% error;
- anything else (a kink or tie inside the stencil, curvature) is repeated at a nearby point with step / 8,
  where a ``fail`` must also survive ``D(h) = D(2h)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

from ._finite_differences import (
    RESOLUTION,
    Comparison,
    Stencil,
    compare,
    default_step,
    evaluate_stencil,
    noise_floor,
    project,
)
from ._inputs import free_only
from ._jacobian import compute_gradients, jacobians_of
from ._notes import describe_error
from .report import Verdict, dtype_name

__all__ = [
    "FAIL",
    "INCONCLUSIVE",
    "MODEL_DTYPE_ROWS",
    "ReferenceRows",
    "PASS",
    "PRECISION",
    "FirstCheck",
    "Judgement",
    "Problem",
    "Recheck",
    "Setting",
    "central_derivative",
    "consistent",
    "default_rtol",
    "first_check",
    "judge_samples",
    "output_projection",
    "recheck_at_the_point",
    "recheck_nearby",
    "recheck_with_grown_step",
    "sample_verdicts",
    "smooth_but_nonfinite",
    "unit_rms",
]

_DEFAULT_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}
_RETRY_STEP_DIVISOR = 8.0  # the better check at the same point, and the one at a nearby point, use step / 8
_MAX_REFINEMENTS = 3  # an error that keeps shrinking with the step is followed down to step / 8^4
_MIN_GROWTH, _MAX_GROWTH = 64.0, 16384.0  # step growth when round-off limited the first check (<= 0.1 x scale)
_GROWTH_TARGET = RESOLUTION / 4  # the step grows until round-off is a quarter of the 1% a pass certifies
_JITTER = 1e-2  # distance of the nearby re-check point, relative to the input's scale
_MAX_ROWS = 2  # output projections compared in the reference dtype (one reference backward each)
# Of them, those the model's own dtype computes where a separate reference judges the formula: the model dtype is
# only compared with the reference (question 2), and one projection does that at one backward.
MODEL_DTYPE_ROWS = 1
# A second difference carries up to this many eps of |f(x)| from round-off alone, curvature or not.
_CURVATURE_ROUNDOFF_EPS = 32.0
# Step / 8 divides a second difference by 8 at a kink (it falls as h) and by 64 where the function is smooth
# (h^2): falling by more than 16 is smooth.
_SMOOTH_CURVATURE_DROP = 16.0
# Step / 8 divides a central difference's truncation error by 64 (by 8 at an odd non-smoothness such as x|x|),
# while a wrong backward's error stays put: an error that falls by more than 4 is truncation.
_TRUNCATION_DROP = 4.0
# The tie test looks just either side of the point, this far (in eps of the input's scale, and at least the
# minimum), and calls Jacobians that differ beyond the gap (relative, likewise) a tie: float64 gives 1e-9, 1e-6.
_TIE_OFFSET_EPS, _TIE_OFFSET_MIN = 100.0, 1e-9
_TIE_GAP_EPS, _TIE_GAP_MIN = 1e3, 1e-6
# A float64 Jacobian that jumps within this many eps (of the model dtype, relative to the input's scale) of the
# point, and within a tenth of that, by more than the model dtype's tolerance both times, sits on a tie that the
# model dtype's rounding can flip.
_DTYPE_TIE_EPS = 100.0
_DTYPE_TIE_SEED = 0
# Two stencils measure the same derivative when they differ by at most this many times their summed error bounds.
_AGREEMENT_BOUNDS = 2.0
# D(h) and D(2h) (or D(h/8)) of a differentiable function agree to 1%; a jump inside the stencil does not.
_SELF_CONSISTENCY = 1e-2
# A model-dtype Jacobian within ROUNDOFF eps of the problem's own scale matches its float64 twin as closely as the
# dtype allows; beyond FAIL eps (at the sample and nearby) it is a kernel wrong in that dtype. Between the two it
# is precision-limited: backwards whose terms cancel (x/|x| over a size-1 dimension: terms of 1/|x_i|) leave a
# residue that the output-per-input scale underestimates.
_DTYPE_ROUNDOFF, _DTYPE_FAIL = 10.0, 1e4
# Direction status codes, ordered by severity.
PASS, PRECISION, INCONCLUSIVE, FAIL = 0, 1, 2, 3


def default_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance granted to a backward computed in ``dtype``.

    Example:
        >>> default_rtol(torch.float32), default_rtol(torch.float64)
        (0.001, 1e-06)

    """
    return _DEFAULT_RTOL.get(dtype, 3e-2)


@dataclass(frozen=True)
class Problem:
    """What is judged: the model as a function of a batch, in its own dtype and in the reference dtype."""

    function: Callable[[Tensor], Tensor]
    reference: Callable[[Tensor], Tensor]
    selection: Callable[[Tensor, Tensor], Tensor]
    model_dtype: torch.dtype
    reference_dtype: torch.dtype
    rtol: float  # granted to the model-dtype backward
    engine: str
    chunk_size: int | None
    floor: float | None = None  # |J v| below floor x the problem's own scale is round-off (None: the dtype's)
    projection: Tensor | None = None  # (M, q) output projections the rows are seen through (None: all outputs)
    free: Tensor | None = None  # (D,) the coordinates of packed inputs that are differentiated (None: all)
    gain: Tensor | None = None  # (n,) a lower bound on the problem's own scale per sample, from the caller

    @property
    def separate_reference(self) -> bool:
        """Whether the formula is judged through a second copy of the model in the reference dtype."""
        return self.reference_dtype != self.model_dtype


@dataclass
class Judgement:
    """Per-direction codes and evidence ``(n, k)`` of the checked samples, per-sample ``steps``/``moved``."""

    codes: Tensor
    relative_error: Tensor
    fd_error: Tensor
    margin: Tensor
    resolution: Tensor
    dtype_error: Tensor
    steps: Tensor
    moved: Tensor
    notes: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, n: int, k: int) -> Judgement:
        """Codes ``pass`` and NaN figures for ``n`` samples and ``k`` directions, to be filled in."""
        nan = torch.full((n, k), float("nan"), dtype=torch.float64)
        return cls(
            codes=torch.full((n, k), PASS),
            relative_error=nan.clone(),
            fd_error=nan.clone(),
            margin=nan.clone(),
            resolution=nan.clone(),
            dtype_error=nan.clone(),
            steps=torch.full((n,), float("nan"), dtype=torch.float64),
            moved=torch.zeros(n, dtype=torch.bool),
        )

    def fill(self, rows: Tensor, other: Judgement) -> None:
        """Take ``other``'s codes and figures (of the samples ``rows``) into this one."""
        for name in ("codes", "relative_error", "fd_error", "margin", "resolution", "dtype_error", "steps", "moved"):
            getattr(self, name)[rows] = getattr(other, name)


@dataclass
class _Evidence:
    """The figures a verdict was decided on, per direction; replaced where a later check decides."""

    relative_error: Tensor
    fd_error: Tensor
    margin: Tensor
    resolution: Tensor
    scale: Tensor
    natural: Tensor

    @classmethod
    def of(cls, comparison: Comparison) -> _Evidence:
        return cls(**{f.name: getattr(comparison, f.name).clone() for f in fields(cls)})

    def take(self, rows: Tensor, mask: Tensor, comparison: Comparison) -> None:
        for f in fields(self):
            mine = getattr(self, f.name)
            mine[rows] = torch.where(mask, getattr(comparison, f.name).to(mine), mine[rows])


def judge_samples(
    problem: Problem,
    jac: Tensor,
    x: Tensor,
    index: Tensor,
    *,
    generator: torch.Generator,
    n_directions: int,
    reference: ReferenceRows | None = None,
) -> Judgement:
    """Judge each sample of ``x`` (the checked ones) along ``n_directions`` random directions.

    The rules of the module docstring, as stages: the first check; non-finite gradients at smooth points; a
    reliable failure re-checked at the same point; round-off-limited passes re-checked with a grown step; the
    rest re-checked at a nearby point; then the model dtype's Jacobian against the reference one.

    Args:
        problem: The functions, dtypes, tolerance and output projection.
        jac: ``(n, q, ...)`` the model-dtype Jacobian rows of these samples, seen through ``problem.projection``
            (its first ``MODEL_DTYPE_ROWS`` columns only, where a separate reference judges the formula).
        x: ``(n, ...)`` the samples, in the inputs' dtype.
        index: ``(n,)`` per-sample output indices for the selection.
        generator: The probe's own generator.
        n_directions: Random directions per sample.
        reference: The reference's rows and values at ``x``, when already computed.

    """
    setting = Setting.draw(problem, x, index, generator, n_directions)
    first = first_check(setting, jac, reference)
    comparison = first.comparison
    clean = comparison.passed & comparison.reliable & comparison.resolved
    # Non-finite gradients where the function is finite and smooth are wrong, whatever happens nearby.
    broken = smooth_but_nonfinite(setting, first)
    failed = comparison.reliable & ~comparison.passed & ~broken
    roundoff = comparison.passed & comparison.reliable & ~comparison.resolved & comparison.roundoff_limited
    ledger = _Ledger.start(setting, first)
    ledger.codes[clean] = PASS
    ledger.codes[broken] = FAIL
    at_the_point, at_kink = recheck_at_the_point(setting, first, failed)
    ledger.apply(at_the_point)
    ledger.apply(recheck_with_grown_step(setting, first, roundoff))
    ledger.apply(recheck_nearby(setting, first, ~(clean | broken | failed | roundoff) | at_kink))
    return ledger.judgement(setting, first)


@dataclass(frozen=True)
class Setting:
    """What every check of one batch of samples shares: the problem, the points, directions and first steps."""

    problem: Problem
    x: Tensor  # (n, ...) the samples, in the inputs' dtype
    x_reference: Tensor  # the same, in the reference dtype
    index: Tensor  # (n,) per-sample output indices
    directions: Tensor  # (n, k, ...) unit-RMS random directions
    step: Tensor  # (n,) the first step
    generator: torch.Generator

    @classmethod
    def draw(cls, problem: Problem, x: Tensor, index: Tensor, generator: torch.Generator, k: int) -> Setting:
        """Draw the directions (in float32, 5x cheaper; normalised in float64) and size the first steps."""
        ref = problem.reference_dtype
        x_reference = x.to(ref)
        directions = torch.randn((x.shape[0], k, *x.shape[1:]), generator=generator).double()
        directions = unit_rms(directions, 2, problem.free).to(x.device)
        step = default_step(x_reference, ref, free=problem.free).to(x.device)
        return cls(problem, x, x_reference, index, directions, step, generator)

    def stencil(self, points: Tensor, rows: Tensor, steps: Tensor, f0: Tensor | None = None) -> Stencil:
        """The unprojected stencil of the reference function at ``points`` (samples ``rows``)."""
        p = self.problem
        return evaluate_stencil(p.reference, p.selection, points, self.index[rows], self.directions[rows], steps, f0=f0)

    def nearby(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """A point near each of the samples ``rows`` (draws from the generator), in the inputs' and reference dtype."""
        p = self.problem
        return _nearby(self.x[rows], self.step[rows], p.reference_dtype, self.generator, p.free)

    def reference_rows_at(self, points: Tensor, rows: Tensor) -> Tensor:
        """Projected Jacobian rows of the reference model at ``points`` (reference dtype)."""
        return _reference_rows(self.problem, points, self.index[rows], self.problem.projection)[0]

    def model_rows_at(self, points: Tensor, rows: Tensor) -> Tensor:
        """Projected Jacobian rows of the model in its own dtype at ``points``."""
        jac = _jacobians(self.problem.function, self.problem, points, self.index[rows])
        return _project_rows(jac, self.problem.projection)


@dataclass(frozen=True)
class FirstCheck:
    """The first comparison of autograd with finite differences, at the sample, with the first step.

    Attributes:
        model_rows: ``(n, q, D)`` the model-dtype Jacobian rows (the first projection's alone where a separate
            reference judges the formula: the model's dtype is then compared with it along that one).
        reference_rows: The rows the formula is judged on: the reference copy's, or the model's own when it has
            no separate reference (or its reference backward failed).
        separate: Whether ``reference_rows`` come from the separate reference copy.
        rtol: The tolerance ``reference_rows`` are judged with.
        raw: The unprojected first stencil; ``stencil`` is its projection.
        gain: ``(n,)`` the problem's own output change per unit input displacement: the scale of round-off.
        floor: ``|J v|`` below ``floor`` times the problem's own scale is round-off.
        comparison: The first check's per-direction outcome.

    """

    model_rows: Tensor
    reference_rows: Tensor
    separate: bool
    rtol: float
    raw: Stencil
    stencil: Stencil
    gain: Tensor
    floor: float
    comparison: Comparison
    notes: tuple[str, ...] = ()

    def check(self, setting: Setting, jac_rows: Tensor, stencil: Stencil, rows: Tensor) -> Comparison:
        """Compare ``jac_rows`` (of samples ``rows``) with an unprojected ``stencil``, as the first check did."""
        projected = project(stencil, setting.problem.projection)
        return compare(jac_rows, projected, self.rtol, gain=self.gain[rows], floor=self.floor)

    def trusted_rows_at(self, setting: Setting, points: Tensor, rows: Tensor) -> Tensor:
        """The rows the formula is judged on, at other ``points`` (reference dtype)."""
        if self.separate:
            return setting.reference_rows_at(points, rows)
        return setting.model_rows_at(points.to(setting.x.dtype), rows).to(points.dtype)


def first_check(setting: Setting, jac: Tensor, reference: ReferenceRows | None = None) -> FirstCheck:
    """The first check: the reference Jacobian rows, the first stencil, and their comparison.

    One reference backward per output projection, whose forward also gives the stencil's ``f(x)`` (unless
    ``reference`` brings them, computed before).
    """
    problem = setting.problem
    n = setting.x.shape[0]
    model_rows = jac.reshape(jac.shape[0], jac.shape[1], -1)
    reference_rows, rtol, separate, f0 = model_rows, problem.rtol, problem.separate_reference, None
    notes: tuple[str, ...] = ()
    if separate:
        try:
            if reference is None:
                reference = ReferenceRows.compute(problem, setting.x_reference, setting.index)
            reference_rows, f0 = reference.unpack()
            rtol = default_rtol(problem.reference_dtype)
        except Exception as error:  # a float64 backward the model cannot run: judge its own dtype's
            separate = False
            reference_rows = model_rows
            notes = (
                f"the backward was judged in {dtype_name(problem.model_dtype)} against "
                f"{dtype_name(problem.reference_dtype)} finite differences: the {dtype_name(problem.reference_dtype)} "
                f"backward failed ({describe_error(error)})",
            )
    everyone = torch.arange(n, device=setting.x.device)
    if not separate and problem.projection is not None and model_rows.shape[1] < problem.projection.shape[1]:
        # The forward pass computed the one projection a float64 reference is compared along; judged alone, the
        # model's own backward is judged along all of them: the others are computed now (one backward each).
        others = replace(problem, reference=problem.function)
        rest, _ = _reference_rows(others, setting.x, setting.index, problem.projection[:, model_rows.shape[1] :])
        model_rows = reference_rows = torch.cat([model_rows, rest.to(model_rows)], dim=1)
    raw = setting.stencil(setting.x_reference, everyone, setting.step, f0)
    stencil = project(raw, problem.projection)
    gain = _gain(stencil.f0, setting.x_reference, reference_rows, problem.free)
    if problem.gain is not None:
        gain = torch.maximum(gain, problem.gain.to(gain))
    floor = noise_floor(problem.reference_dtype) if problem.floor is None else problem.floor
    comparison = compare(reference_rows, stencil, rtol, gain=gain, floor=floor)
    return FirstCheck(model_rows, reference_rows, separate, rtol, raw, stencil, gain, floor, comparison, notes)


def smooth_but_nonfinite(setting: Setting, first: FirstCheck) -> Tensor:
    """Directions of samples whose Jacobian is NaN/Inf where the function is finite and smooth, ``(n, k)``.

    Smooth: no kink in the first stencil, or a second difference that falls faster than the step (``h^2``
    for a smooth function whose slope vanishes at the point, ``h`` at a kink).
    """
    comparison, raw = first.comparison, first.raw
    candidates = ~first.reference_rows.isfinite().all(2).all(1)[:, None] & raw.f_plus.isfinite().all(-1)
    candidates &= raw.f_minus.isfinite().all(-1) & raw.f0.isfinite().all(-1)[:, None]
    smooth = candidates & comparison.reliable
    rows = (candidates & ~comparison.reliable).any(1).nonzero().flatten()
    if len(rows):
        finer_step = setting.step[rows] / _RETRY_STEP_DIVISOR
        finer_raw = setting.stencil(setting.x_reference[rows], rows, finer_step, raw.f0[rows])
        finer = project(finer_raw, setting.problem.projection)
        coarse = _subset(first.stencil, rows)

        def curvature(stencil: Stencil) -> Tensor:
            return (stencil.f_plus - 2 * stencil.f0.unsqueeze(1) + stencil.f_minus).norm(dim=-1)

        roundoff = _CURVATURE_ROUNDOFF_EPS * coarse.eps * coarse.f0.norm(dim=-1, keepdim=True)
        smooth[rows] |= candidates[rows] & (curvature(finer) <= curvature(coarse) / _SMOOTH_CURVATURE_DROP + roundoff)
    return smooth


@dataclass(frozen=True)
class Recheck:
    """What one re-check decided, for the samples ``rows`` it re-checked; every ``(r, k)`` field is per direction.

    Attributes:
        rows: ``(r,)`` the samples re-checked.
        decided: ``(r, k)`` the directions whose code this re-check sets.
        codes: ``(r, k)`` their codes.
        evidence: ``(rows, mask, comparison)`` triples: the comparison whose figures now stand for those directions.
        steps: ``(r,)`` the step that now stands for each sample.
        moved: Whether the samples were re-checked at a nearby point.

    """

    rows: Tensor
    decided: Tensor
    codes: Tensor
    evidence: tuple[tuple[Tensor, Tensor, Comparison], ...]
    steps: Tensor
    moved: bool = False


def recheck_at_the_point(setting: Setting, first: FirstCheck, failed: Tensor) -> tuple[Recheck | None, Tensor]:
    """A reliable failure stands, unless a better check at the same point contradicts it (see module).

    Returns the re-check, and ``(n, k)`` the directions of samples that sit on a tie or kink of the function
    itself (the Jacobian jumps across the point), left undecided: their finite differences at the point cannot
    judge, so they go to a nearby point.
    """
    at_kink = torch.zeros_like(failed)
    rows = failed.any(1).nonzero().flatten()
    if not len(rows):
        return None, at_kink
    f0 = first.raw.f0[rows]
    points = setting.x_reference[rows]
    finer_step = setting.step[rows] / _RETRY_STEP_DIVISOR
    finer_raw = setting.stencil(points, rows, finer_step, f0)
    finer = first.check(setting, first.reference_rows[rows], finer_raw, rows)
    mask = failed[rows]
    previous_error = first.comparison.relative_error[rows]
    overturned = mask & finer.reliable & finer.passed & (finer.fd_error < first.comparison.fd_error[rows])
    # An error that shrinks with the step is the difference's own truncation (odd non-smoothness such as
    # x|x| hides from the second difference), not the backward's: a wrong backward's error stays put. Follow
    # it down one more step.
    shrinking = mask & ~overturned & (finer.relative_error <= previous_error / _TRUNCATION_DROP)
    level_step, previous = finer_step, finer
    for _ in range(_MAX_REFINEMENTS):
        if not shrinking.any():
            break
        level_step = level_step / _RETRY_STEP_DIVISOR
        level = first.check(setting, first.reference_rows[rows], setting.stencil(points, rows, level_step, f0), rows)
        converged = shrinking & level.reliable & level.passed
        finer = _merge(finer, level, converged)
        finer_step = torch.where(converged.any(1), level_step, finer_step)
        overturned |= converged
        shrinking &= ~converged & (level.relative_error <= previous.relative_error / _TRUNCATION_DROP)
        previous = level
    # Finite differences that measure a derivative agree with themselves across steps (D(h) = D(h/8));
    # noise at the step's scale (features far finer than any step) does not, and cannot judge.
    measured = consistent(_subset(first.stencil, rows), project(finer_raw, setting.problem.projection))
    # Ties (max-pool over a flat region, several ReLUs at exactly 0) make the one-sided derivatives differ:
    # the Jacobian just either side of the point differs, and their errors can cancel in the second
    # difference. A backward wrong at exactly this point (a 0/0 patched to 0) is continuous either side.
    unjudged = mask & ~overturned & (~measured | _jumps(setting, first, rows)[:, None])
    stands = mask & ~overturned & ~unjudged
    at_kink[rows] = unjudged
    recheck = Recheck(
        rows,
        stands | overturned,
        torch.where(overturned, torch.where(finer.resolved, PASS, INCONCLUSIVE), FAIL),
        ((rows, overturned, finer),),
        torch.where(overturned.any(1), finer_step, setting.step[rows]),
    )
    return recheck, at_kink


def recheck_with_grown_step(setting: Setting, first: FirstCheck, roundoff: Tensor) -> Recheck | None:
    """Round-off hid a 1% error (a gradient tiny next to its output): grow the step at the same point."""
    rows = roundoff.any(1).nonzero().flatten()
    if not len(rows):
        return None
    mask = roundoff[rows]
    worst = torch.where(mask, first.comparison.fd_error[rows], 0.0).amax(1).nan_to_num(nan=1.0, posinf=1e12)
    grown_step = setting.step[rows] * (worst / _GROWTH_TARGET).clamp(_MIN_GROWTH, _MAX_GROWTH)
    grown_raw = setting.stencil(setting.x_reference[rows], rows, grown_step, first.raw.f0[rows])
    grown = first.check(setting, first.reference_rows[rows], grown_raw, rows)
    better = grown.fd_error < first.comparison.fd_error[rows]
    verdict = torch.where(
        grown.passed & grown.reliable & grown.resolved,
        PASS,
        torch.where(grown.reliable & ~grown.passed & better, FAIL, INCONCLUSIVE),
    )
    # A large step can cross jumps (a staircase such as round(x, 3) has slope 1 at any scale above its
    # treads, and 0 below): a failure there must see the derivative the first step saw, within both bounds.
    grown_stencil = project(grown_raw, setting.problem.projection)
    agree = _agree(_subset(first.stencil, rows), first.comparison, rows, grown_stencil, grown)
    verdict = torch.where((verdict == FAIL) & ~agree, INCONCLUSIVE, verdict)
    return Recheck(rows, mask, verdict, ((rows, mask, grown),), grown_step)


def recheck_nearby(setting: Setting, first: FirstCheck, shaky: Tensor) -> Recheck | None:
    """Check kinks and ties again at a nearby point, where a wrong backward stays wrong.

    Kinks sit on sets of measure zero. A failure there must satisfy ``D(h) = D(2h)`` and repeat at a second
    nearby point (two kinks inside one stencil can cancel in its second difference).
    """
    rows = shaky.any(1).nonzero().flatten()
    if not len(rows):
        return None
    small = setting.step[rows] / _RETRY_STEP_DIVISOR
    mask = shaky[rows]
    verdict, near = _at_nearby_point(setting, first, rows, small)
    suspects = ((verdict == FAIL) & mask).any(1)
    if not suspects.any():
        return Recheck(rows, mask, verdict, ((rows, mask, near),), small, moved=True)
    sub = rows[suspects]
    again, near2 = _at_nearby_point(setting, first, sub, small[suspects])
    confirmed = (verdict[suspects] == FAIL) & (again == FAIL)
    retracted = (verdict[suspects] == FAIL) & ~confirmed
    verdict[suspects] = torch.where(retracted, again, verdict[suspects])
    mask_first = mask.clone()
    mask_first[suspects] &= ~retracted
    evidence = ((sub, retracted & mask[suspects], near2), (rows, mask_first, near))
    return Recheck(rows, mask, verdict, evidence, small, moved=True)


def _at_nearby_point(setting: Setting, first: FirstCheck, rows: Tensor, small: Tensor) -> tuple[Tensor, Comparison]:
    problem = setting.problem
    near_x, near_r = setting.nearby(rows)
    near_rows = setting.reference_rows_at(near_r, rows) if first.separate else setting.model_rows_at(near_x, rows)
    raw = setting.stencil(near_r, rows, small)
    near = first.check(setting, near_rows, raw, rows)
    verdict = torch.where(
        near.passed & near.reliable & near.resolved,
        PASS,
        torch.where(near.reliable & ~near.passed, FAIL, INCONCLUSIVE),
    )
    suspects = (verdict == FAIL).any(1)
    if suspects.any():
        # A "fail" here needs finite differences that agree with themselves: D(h) = D(2h) for a
        # differentiable function, while a jump inside the stencil does not scale with the step.
        coarse = setting.stencil(near_r[suspects], rows[suspects], 2 * small[suspects], raw.f0[suspects])
        fine = _subset(project(raw, problem.projection), suspects)
        agreeing = consistent(fine, project(coarse, problem.projection))
        verdict[suspects] = torch.where(
            verdict[suspects] == FAIL, torch.where(agreeing, FAIL, INCONCLUSIVE), verdict[suspects]
        )
    return verdict, near


class _Ledger:
    """The codes, figures and steps of one batch as the checks decide them, in the order they decide."""

    def __init__(self, codes: Tensor, evidence: _Evidence, steps: Tensor, moved: Tensor) -> None:
        self.codes, self.evidence, self.steps, self.moved = codes, evidence, steps, moved

    @classmethod
    def start(cls, setting: Setting, first: FirstCheck) -> _Ledger:
        """Every direction inconclusive until a check decides it; the first check's figures."""
        codes = torch.full(first.comparison.passed.shape, INCONCLUSIVE, device=setting.x.device)
        moved = torch.zeros(setting.x.shape[0], dtype=torch.bool)
        return cls(codes, _Evidence.of(first.comparison), setting.step.clone(), moved)

    def apply(self, recheck: Recheck | None) -> None:
        """Take what a re-check decided."""
        if recheck is None:
            return
        rows = recheck.rows
        self.codes[rows] = torch.where(recheck.decided, recheck.codes, self.codes[rows])
        for evidence_rows, mask, comparison in recheck.evidence:
            self.evidence.take(evidence_rows, mask, comparison)
        self.steps[rows] = recheck.steps
        if recheck.moved:
            self.moved[rows.cpu()] = True

    def judgement(self, setting: Setting, first: FirstCheck) -> Judgement:
        """The judgement, after question 2 (the model dtype's Jacobian against the reference one)."""
        codes, evidence = self.codes, self.evidence
        dtype_error = torch.full(codes.shape, float("nan"), dtype=torch.float64, device=codes.device)
        margin = evidence.margin
        notes = list(first.notes)
        if first.separate:
            codes, dtype_error, dtype_margin = _judge_model_dtype(setting, first, codes)
            margin = torch.maximum(margin, dtype_margin)
            codes, tie_notes = _name_dtype_ties(setting, first, codes)
            notes += tie_notes
        return Judgement(
            codes=codes.cpu(),
            relative_error=evidence.relative_error.double().cpu(),
            fd_error=evidence.fd_error.double().cpu(),
            margin=margin.double().cpu(),
            resolution=evidence.resolution.double().cpu(),
            dtype_error=dtype_error.cpu(),
            steps=self.steps.double().cpu(),
            moved=self.moved,
            notes=notes,
        )


def _jumps(setting: Setting, first: FirstCheck, rows: Tensor) -> Tensor:
    """Whether the trusted Jacobian differs just either side of each sample (a tie or kink at the point)."""
    eps = torch.finfo(setting.x_reference.dtype).eps
    distance, tolerance = max(_TIE_OFFSET_MIN, _TIE_OFFSET_EPS * eps), max(_TIE_GAP_MIN, _TIE_GAP_EPS * eps)
    return _jacobian_jumps(setting, first, rows, distance, tolerance, setting.generator)


def _jacobian_jumps(
    setting: Setting,
    first: FirstCheck,
    rows: Tensor,
    distance: float,
    tolerance: float,
    generator: torch.Generator,
    floor: Tensor | None = None,
) -> Tensor:
    """Whether the trusted Jacobian just either side of each sample differs beyond ``tolerance`` of its size.

    The two points lie ``distance`` (relative to the input's scale) either side; ``floor`` (``(len(rows),)``) is a
    smallest size to measure against, so that round-off on a Jacobian that is zero never reads as a jump.
    """
    xr = setting.x_reference[rows]
    offset = unit_rms(torch.randn(xr.shape, generator=generator, dtype=torch.float64), 1, setting.problem.free).to(xr)
    scale = (setting.step[rows] / torch.finfo(setting.problem.reference_dtype).eps ** (1 / 3)).to(xr)
    offset = offset * (distance * scale).reshape(-1, *[1] * (xr.ndim - 1))
    both = first.trusted_rows_at(setting, torch.cat([xr + offset, xr - offset]), torch.cat([rows, rows]))
    plus, minus = both[: len(rows)], both[len(rows) :]
    gap = (plus - minus).norm(dim=(1, 2))
    size = torch.maximum(plus.norm(dim=(1, 2)), minus.norm(dim=(1, 2)))
    if floor is not None:
        size = torch.maximum(size, floor.to(size))
    return ~(gap <= tolerance * size)


def _name_dtype_ties(setting: Setting, first: FirstCheck, codes: Tensor) -> tuple[Tensor, tuple[str, ...]]:
    """A model-dtype Jacobian off the float64 one because a discrete choice flips is a tie, not precision.

    Top-k, sort, argmax and max-pool pick by comparing values; at a near-tie (repeated tokens after a float32
    layer) the model dtype and float64 can pick differently at the sample itself. Then the float64 Jacobian itself
    jumps within the model dtype's rounding of the point, and the direction is inconclusive, with a note.
    """
    dtype = setting.problem.model_dtype
    rows = (codes == PRECISION).any(1).nonzero().flatten()
    if dtype in (torch.float16, torch.bfloat16) or not len(rows):
        return codes, ()
    # Measured against at least the size a Jacobian of the problem's own scale has, where the model dtype can
    # resolve it: a float64 Jacobian that is round-off on an exact zero does not jump, it is noise.
    width = first.reference_rows.shape[-1] ** 0.5
    floor = noise_floor(dtype) * first.gain[rows] * width
    jumps = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
    for distance in _DTYPE_TIE_EPS * torch.finfo(dtype).eps, _DTYPE_TIE_EPS * torch.finfo(dtype).eps / 10:
        # A smooth Jacobian's change shrinks with the distance; a choice that flips jumps at both. The same
        # offset direction both times, from a generator of its own (the probe's own stream stays as it was).
        generator = torch.Generator().manual_seed(_DTYPE_TIE_SEED)
        jumps &= _jacobian_jumps(setting, first, rows, distance, setting.problem.rtol, generator, floor)
    tied = rows[jumps]
    if not len(tied):
        return codes, ()
    codes = codes.clone()  # a tie makes the whole sample's Jacobian ill-defined in the model dtype
    codes[tied] = torch.where(codes[tied] == FAIL, FAIL, INCONCLUSIVE)
    name = dtype_name(dtype)
    return codes, (
        f"a tie, not precision: on {len(tied)} sample(s) the {name} and float64 Jacobians differ because a discrete "
        f"choice (top-k, sort, argmax, max-pool) flips within {name}'s rounding of the point; inconclusive there",
    )


def _judge_model_dtype(setting: Setting, first: FirstCheck, codes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Question 2: the model-dtype Jacobian against the reference one (see the module docstring)."""
    problem, evidence, stencil = setting.problem, first.comparison, first.stencil
    displacement = stencil.d_plus + stencil.d_minus
    rtol, dtype, floor = problem.rtol, problem.model_dtype, first.floor
    gap, ok, limit = _dtype_gap(
        first.model_rows, first.reference_rows, displacement, evidence.scale, evidence.natural, rtol, dtype, floor
    )
    dtype_error = gap / evidence.scale.clamp_min(torch.finfo(torch.float64).tiny)
    margin = gap / limit
    codes = torch.where((codes == PASS) & ~ok, PRECISION, codes)
    beyond = gap > limit
    half = problem.model_dtype in (torch.float16, torch.bfloat16)
    rows = beyond.any(1).nonzero().flatten()
    if half or not len(rows):
        return codes, dtype_error, torch.zeros_like(margin) if half else margin
    # Confirm at a nearby point: a float32 near-tie (max-pool, ReLU at round-off distance from 0) routes the
    # gradient differently from float64 at the sample only; a kernel wrong in float32 is wrong nearby too.
    near_x, near_r = setting.nearby(rows)
    near_model = setting.model_rows_at(near_x, rows)
    near_reference = setting.reference_rows_at(near_r, rows)
    near_displacement = displacement[rows]
    predicted = torch.einsum("nqd,nkd->nkq", near_reference.double(), near_displacement).norm(dim=-1)
    typical = near_reference.double().norm(dim=(1, 2))[:, None] * near_displacement.norm(dim=-1)
    typical = typical / near_displacement.shape[-1] ** 0.5
    scale = torch.maximum(torch.maximum(predicted, typical), floor * evidence.natural[rows]).clamp_min(
        torch.finfo(torch.float64).tiny
    )
    gap2, _, limit2 = _dtype_gap(
        near_model, near_reference, near_displacement, scale, evidence.natural[rows], rtol, dtype, floor
    )
    mask = beyond[rows]
    confirmed = mask & (gap2 > limit2)
    codes[rows] = torch.where(
        confirmed, FAIL, torch.where(mask, torch.maximum(codes[rows], torch.tensor(PRECISION)), codes[rows])
    )
    margin[rows] = torch.where(mask, gap2 / limit2, margin[rows])
    return codes, dtype_error, margin


def _dtype_gap(
    model_rows: Tensor,
    reference_rows: Tensor,
    displacement: Tensor,
    scale: Tensor,
    natural: Tensor,
    rtol: float,
    dtype: torch.dtype,
    floor: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``|(J_model - J_reference) d|``, whether it is as close as its dtype allows, and the limit beyond which it fails.

    As close as the dtype allows: within ``rtol`` of the Jacobian's scale, or ``_DTYPE_ROUNDOFF`` eps of the problem's
    own scale (half precision: ``rtol`` only, it is described, never failed). Fails beyond ``rtol`` of the
    Jacobian's scale and ``_DTYPE_FAIL`` eps of the problem's own scale (or in underflow).
    """
    # Along the projections the model dtype computed (the first, where it is compared with a separate reference),
    # grown to the size a gap has along all of them: random projections share a gap's square alike.
    computed, every = model_rows.shape[1], reference_rows.shape[1]
    difference = model_rows.double() - reference_rows[:, :computed].double()
    gap = torch.einsum("nqd,nkd->nkq", difference.nan_to_num(nan=float("inf")), displacement.double()).norm(dim=-1)
    gap = gap * (every / computed) ** 0.5
    gap = gap.nan_to_num(nan=float("inf"))
    info = torch.finfo(dtype)
    if dtype in (torch.float16, torch.bfloat16):
        within = gap <= rtol * scale
    else:
        resolvable = max(noise_floor(dtype), floor) * rtol
        within = gap <= torch.maximum(rtol * scale, max(resolvable, _DTYPE_ROUNDOFF * info.eps) * natural)
    # (Underflow: values near the dtype's smallest normal number keep few digits, and below it none.)
    underflow = info.tiny / info.eps * displacement.double().norm(dim=-1)
    limit = torch.maximum(torch.maximum(rtol * scale, _DTYPE_FAIL * info.eps * natural), underflow).clamp_min(info.tiny)
    return gap, within, limit


def output_projection(n_outputs: int, generator: torch.Generator, device: torch.device) -> Tensor | None:
    """Random output projections ``(M, q)`` when there are more than ``_MAX_ROWS`` outputs, else ``None``."""
    if n_outputs <= _MAX_ROWS:
        return None
    gaussian = torch.randn((n_outputs, _MAX_ROWS), generator=generator, dtype=torch.float64)
    return (gaussian / n_outputs**0.5).to(device)


def _project_rows(jac: Tensor, projection: Tensor | None) -> Tensor:
    """``(n, M, ...)`` Jacobians to ``(n, q, D)`` rows ``projection^T J``."""
    flat = jac.reshape(jac.shape[0], jac.shape[1], -1)
    if projection is None:
        return flat
    return torch.einsum("nmd,mq->nqd", flat.to(projection.dtype), projection)


def _jacobians(function: Callable[[Tensor], Tensor], problem: Problem, x: Tensor, index: Tensor) -> Tensor:
    return jacobians_of(function, problem.selection, x, index, engine=problem.engine, chunk_size=problem.chunk_size)


def _reference_rows(
    problem: Problem, x: Tensor, index: Tensor, projection: Tensor | None, *, with_values: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Projected Jacobian rows of the reference (float64) model, one reference backward per projection.

    With ``with_values``, also the selected outputs at ``x`` (from the same forward).
    """
    selection = problem.selection
    if projection is not None:

        def projected(outputs: Tensor, idx: Tensor) -> Tensor:
            rows = problem.selection(outputs, idx)
            return rows @ projection.to(rows.dtype)

        selection = projected
    if not with_values:
        jac = jacobians_of(problem.reference, selection, x, index, engine=problem.engine, chunk_size=problem.chunk_size)
        return jac.reshape(jac.shape[0], jac.shape[1], -1), None
    leaf = x.detach().requires_grad_(True)
    outputs = problem.reference(leaf.clone())
    jac = compute_gradients(
        problem.reference,
        selection,
        leaf,
        outputs,
        index,
        engine=problem.engine,
        check_batch=False,
        generator=torch.Generator(),
        chunk_size=problem.chunk_size,
    ).jacobians
    return jac.reshape(jac.shape[0], jac.shape[1], -1), problem.selection(outputs, index).detach()


@dataclass(frozen=True)
class ReferenceRows:
    """The reference copy's projected Jacobian rows at a batch and its selected outputs there, or why not.

    Computed once by :meth:`compute` (one reference forward, one backward per projection); read by the first check,
    and by the batch-independence check before it (see :func:`~._jacobian.leaking_against`).
    """

    rows: Tensor | None  # (n, q, D), in the reference dtype
    values: Tensor | None  # (n, M) the selected outputs
    error: Exception | None = None  # what the reference backward raised (then rows and values are None)

    @classmethod
    def compute(cls, problem: Problem, x: Tensor, index: Tensor) -> ReferenceRows:
        """The rows at ``x`` (cast to the reference dtype); an exception is kept, not raised."""
        try:
            rows, values = _reference_rows(
                problem, x.to(problem.reference_dtype), index, problem.projection, with_values=True
            )
        except Exception as error:  # a float64 backward the model cannot run: the first check says so
            return cls(None, None, error)
        return cls(rows, values)

    def unpack(self) -> tuple[Tensor, Tensor]:
        """``(rows, values)``; raises what the reference backward raised."""
        if self.error is not None:
            raise self.error
        assert self.rows is not None and self.values is not None
        return self.rows, self.values

    def take(self, samples: Tensor) -> ReferenceRows:
        """The same of ``samples`` alone (indices into the batch)."""
        if self.rows is None or self.values is None:
            return self
        return ReferenceRows(self.rows[samples], self.values[samples])


def _gain(f0: Tensor, x: Tensor, rows: Tensor, free: Tensor | None = None) -> Tensor:
    """The problem's own output change per unit input displacement, ``(n,)``: the scale of round-off.

    The larger of ``|f(x)| / max(|x|, sqrt(D))`` and the batch's median ``|J|_F / sqrt(D)``.
    """
    n = x.shape[0]
    flat = free_only(x.reshape(n, -1).double(), free)
    root_d = (flat.shape[1] if free is None else int(free.sum())) ** 0.5
    own = f0.double().norm(dim=1) / flat.norm(dim=1).clamp_min(root_d)
    typical = rows.double().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).norm(dim=(1, 2)) / root_d
    return torch.maximum(own.nan_to_num(nan=0.0, posinf=0.0), typical.median().expand(n))


def _nearby(
    x: Tensor, step: Tensor, dtype: torch.dtype, generator: torch.Generator, free: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """A point 1% of the input's scale away, representable in both the inputs' dtype and ``dtype``."""
    jitter = unit_rms(torch.randn(x.shape, generator=generator, dtype=torch.float64), 1, free).to(x.device)
    scale = (step / torch.finfo(dtype).eps ** (1 / 3)).reshape(-1, *[1] * (x.ndim - 1))
    near = (x.to(torch.float64) + _JITTER * scale * jitter).to(x.dtype)
    return near, near.to(dtype)


def central_derivative(stencil: Stencil) -> tuple[Tensor, Tensor]:
    """The stencil's central-difference derivative per direction ``(n, k, M)``, and its displacement lengths."""
    length = (stencil.d_plus + stencil.d_minus).norm(dim=-1)
    return (stencil.f_plus - stencil.f_minus) / length.unsqueeze(-1), length


def consistent(fine: Stencil, coarse: Stencil, tolerance: float = _SELF_CONSISTENCY) -> Tensor:
    """Whether two stencils along the same directions (steps h and 2h) give the same derivative, ``(n, k)``."""
    (a, _), (b, _) = central_derivative(fine), central_derivative(coarse)
    gap = (a - b).norm(dim=-1)
    return gap <= tolerance * torch.maximum(a.norm(dim=-1), b.norm(dim=-1))


def unit_rms(directions: Tensor, lead: int, free: Tensor | None = None) -> Tensor:
    """Scale each direction (the dims after the first ``lead``) to unit RMS over its free coordinates.

    ``free`` (``(D,)``, for packed inputs) zeroes the frozen coordinates first.
    """
    directions = free_only(directions, free)
    count = directions[(0,) * lead].numel() if free is None else int(free.sum())
    rms = (directions.reshape(*directions.shape[:lead], -1).pow(2).sum(-1) / max(count, 1)).sqrt()
    return directions / rms.reshape(*rms.shape, *[1] * (directions.ndim - lead))


def _agree(first: Stencil, first_check: Comparison, rows: Tensor, second: Stencil, second_check: Comparison) -> Tensor:
    """Whether two stencils at different steps measure the same derivative within their own error bounds."""
    (a, length_a), (b, length_b) = central_derivative(first), central_derivative(second)
    bound_a = first_check.fd_error[rows] * first_check.scale[rows] / length_a
    bound_b = second_check.fd_error * second_check.scale / length_b
    return (a - b).norm(dim=-1) <= _AGREEMENT_BOUNDS * (bound_a + bound_b)


def _merge(first: Comparison, second: Comparison, take_second: Tensor) -> Comparison:
    """Field by field, ``second`` where ``take_second`` (``(n, k)``) else ``first``."""
    return Comparison(
        **{f.name: torch.where(take_second, getattr(second, f.name), getattr(first, f.name)) for f in fields(first)}
    )


def _subset(stencil: Stencil, mask: Tensor) -> Stencil:
    return Stencil(
        stencil.f0[mask],
        stencil.f_plus[mask],
        stencil.f_minus[mask],
        stencil.d_plus[mask],
        stencil.d_minus[mask],
        stencil.eps,
    )


def sample_verdicts(codes: Tensor) -> list[Verdict]:
    """Combine per-direction codes ``(n, k)``: any fail fails; all inconclusive is inconclusive."""
    fail = (codes == FAIL).any(1)
    inconclusive = (codes == INCONCLUSIVE).all(1)
    precision = (codes == PRECISION).any(1)
    return [
        Verdict.FAIL if f else Verdict.INCONCLUSIVE if i else Verdict.PRECISION_LIMITED if p else Verdict.PASS
        for f, i, p in zip(fail.tolist(), inconclusive.tolist(), precision.tolist(), strict=True)
    ]
