"""Judging: each checked sample along each direction, then one verdict per sample.

Per direction: compare autograd with the stencil at step ``h``; anything short of a clean pass is
re-checked at a nearby point with step ``h/8``; a remaining failure must survive ``D(h) = D(2h)``
(finite differences consistent with themselves) and, for float32 models, the same backward in float64
(else the code is right and only the dtype is coarse: ``precision-limited``). For float16/bfloat16
models, whose backward noise is as large as a real bug, the formula is judged through the same code run
in float64 throughout, and the half-precision Jacobian separately against it (``precision-limited``
when it strays beyond its dtype's tolerance).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._finite_differences import RESOLUTION, Stencil, compare, default_step, evaluate_stencil
from ._jacobian import jacobians_of
from .report import Verdict

__all__ = ["FAIL", "INCONCLUSIVE", "PASS", "PRECISION", "default_rtol", "judge_samples", "sample_verdicts", "unit_rms"]

_DEFAULT_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}
_RETRY_STEP_DIVISOR = 8.0
_MIN_GROWTH, _MAX_GROWTH = 64.0, 4096.0  # step growth when round-off limited the first check
_JITTER = 1e-2  # distance of the nearby re-check point, relative to the input's scale
# Direction status codes, ordered by severity.
PASS, PRECISION, INCONCLUSIVE, FAIL = 0, 1, 2, 3


def default_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance granted to a backward computed in ``dtype``.

    Example:
        >>> default_rtol(torch.float32), default_rtol(torch.float64)
        (0.001, 1e-06)

    """
    return _DEFAULT_RTOL.get(dtype, 3e-2)


def judge_samples(
    jac: Tensor,
    function: Callable[[Tensor], Tensor],
    fd_function: Callable[[Tensor], Tensor],
    selection: Any,
    x: Tensor,
    index: Tensor,
    checked: Tensor,
    *,
    generator: torch.Generator,
    n_directions: int,
    rtol: float,
    fd_dtype: torch.dtype,
    model_dtype: torch.dtype,
    engine: str,
    chunk_size: int | None,
    out: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
) -> None:
    """Judge each checked sample along each direction; write codes and evidence into ``out``."""
    status, relative_error, fd_error, steps, moved = out
    device = x.device
    rows = checked.to(device)
    xc, ic = x[rows].to(fd_dtype), index[rows]
    # Directions need no precision: drawn in float32 (5x cheaper), normalised in float64.
    shape = (len(checked), n_directions, *x.shape[1:])
    directions = unit_rms(torch.randn(shape, generator=generator).double(), 2).to(device)
    step = default_step(xc, fd_dtype).to(device)

    # A half-precision backward is noise at the level of a real bug: judge its formula through the same code
    # run in float64, and its precision separately (against that float64 Jacobian), below.
    low_precision = model_dtype in (torch.float16, torch.bfloat16) and fd_dtype == torch.float64
    model_jac = jac
    if low_precision:
        jac = jacobians_of(fd_function, selection, xc, ic, engine=engine, chunk_size=chunk_size)
        function, rtol = fd_function, default_rtol(torch.float64)

    stencil = evaluate_stencil(fd_function, selection, xc, ic, directions, step)
    first = compare(jac, stencil, rtol)
    code = torch.full(first.passed.shape, PASS, device=device)
    rel, bound = first.relative_error, first.fd_error
    used_step = step.clone()
    redo = ~(first.passed & first.reliable & first.resolved)
    if redo.any():
        # Anything short of a clean pass is checked again at a nearby point. Ties (max-pool over a flat
        # image region, ReLU at exactly 0) and kinks sit on sets of measure zero: moving off them makes
        # the function differentiable where we check it, while a wrong backward stays wrong nearby. The
        # new step depends on what limited the first check: curvature or a kink wants a step 8x smaller,
        # round-off (a gradient tiny next to the output, e.g. through saturated units) a larger one.
        again = redo.any(1).nonzero().flatten()
        jitter = unit_rms(torch.randn((len(again), *x.shape[1:]), generator=generator, dtype=torch.float64), 1)
        scale = (step[again] / step.new_tensor(torch.finfo(fd_dtype).eps ** (1 / 3))).reshape(-1, *[1] * (x.ndim - 1))
        point_dtype = fd_dtype if low_precision else x.dtype
        nearby = (xc[again] + _JITTER * scale * jitter.to(device, fd_dtype)).to(point_dtype)  # representable in both
        noisy = (first.roundoff_limited & redo)[again].any(1)
        # Round-off error falls as 1/h: grow the step until it should sit at a quarter of the resolution.
        worst = torch.where(redo[again], first.fd_error[again], 0.0).amax(1).nan_to_num(nan=1.0, posinf=1e12)
        growth = (worst / (RESOLUTION / 4)).clamp(_MIN_GROWTH, _MAX_GROWTH)
        small = torch.where(noisy, step[again] * growth, step[again] / _RETRY_STEP_DIVISOR)
        stencil2 = evaluate_stencil(fd_function, selection, nearby.to(fd_dtype), ic[again], directions[again], small)
        jac2 = jacobians_of(function, selection, nearby, ic[again], engine=engine, chunk_size=chunk_size)
        second = compare(jac2, stencil2, rtol)
        # Fail needs a reliable stencil; pass needs one that could have seen an error; else nothing is known.
        verdict = torch.where(second.passed, torch.where(second.resolved, PASS, INCONCLUSIVE), FAIL)
        code2 = torch.where(second.reliable, verdict, torch.full_like(code[again], INCONCLUSIVE))
        suspects = ((code2 == FAIL) & redo[again]).any(1)
        if suspects.any():
            # A verdict of "fail" needs finite differences that agree with themselves: D(h) = D(2h) for a
            # differentiable function, while a jump inside the stencil does not scale with the step.
            sub = again[suspects]
            stencil3 = evaluate_stencil(
                fd_function,
                selection,
                nearby[suspects].to(fd_dtype),
                ic[sub],
                directions[sub],
                2 * small[suspects],
                f0=stencil2.f0[suspects],
            )
            consistent = _consistent(_subset(stencil2, suspects), stencil3)
            code2[suspects] = torch.where((code2[suspects] == FAIL) & ~consistent, INCONCLUSIVE, code2[suspects])
            suspects = ((code2 == FAIL) & redo[again]).any(1)
        if suspects.any() and not low_precision and model_dtype != torch.float64 and fd_dtype == torch.float64:
            # (Half-precision models were judged in float64 already: this check would repeat the same one.)
            # Same backward formula in float64: agreement means only the model dtype's precision fell short.
            sub = again[suspects]
            jac64 = jacobians_of(
                fd_function, selection, nearby[suspects].to(fd_dtype), ic[sub], engine=engine, chunk_size=chunk_size
            )
            third = compare(jac64, _subset(stencil2, suspects), default_rtol(torch.float64))
            code2[suspects] = torch.where(
                (code2[suspects] == FAIL) & third.passed & third.resolved, PRECISION, code2[suspects]
            )
        mask = redo[again]
        code[again] = torch.where(mask, code2, code[again])
        rel[again] = torch.where(mask, second.relative_error, rel[again])
        bound[again] = torch.where(mask, second.fd_error, bound[again])
        used_step[again] = small
        moved[checked[again.cpu()]] = True
    if low_precision:
        code = _judge_precision(code, model_jac, jac, model_dtype)
    status[checked] = code.cpu()
    relative_error[checked] = rel.double().cpu()
    fd_error[checked] = bound.double().cpu()
    steps[checked] = used_step.double().cpu()


def _judge_precision(code: Tensor, model_jac: Tensor, reference: Tensor, model_dtype: torch.dtype) -> Tensor:
    """Judge a half-precision Jacobian against the same backward run in float64.

    Beyond the dtype's tolerance a passing sample becomes ``precision-limited``, never ``fail``: at a
    tie (max-pool over a flat region) bfloat16 and float64 may route the gradient to different inputs,
    a large difference that is no bug. The backward's formula was already judged in float64.
    """
    n = reference.shape[0]
    ref = reference.reshape(n, -1).double()
    gap = (model_jac.reshape(n, -1).double() - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(
        torch.finfo(torch.float64).tiny
    )
    tolerance = default_rtol(model_dtype)
    per_sample = torch.where(gap > tolerance, PRECISION, PASS)
    return torch.maximum(code, per_sample[:, None].expand_as(code).to(code))


def _consistent(fine: Any, coarse: Any, tolerance: float = 1e-2) -> Tensor:
    """Whether two stencils along the same directions (steps h and 2h) give the same derivative, ``(n, k)``."""

    def derivative(stencil: Any) -> Tensor:
        length = (stencil.d_plus + stencil.d_minus).norm(dim=-1, keepdim=True)
        return (stencil.f_plus - stencil.f_minus) / length

    a, b = derivative(fine), derivative(coarse)
    gap = (a - b).norm(dim=-1)
    return gap <= tolerance * torch.maximum(a.norm(dim=-1), b.norm(dim=-1))


def unit_rms(directions: Tensor, lead: int) -> Tensor:
    """Scale each direction (the dims after the first ``lead``) to unit RMS."""
    rms = directions.reshape(*directions.shape[:lead], -1).pow(2).mean(-1).sqrt()
    return directions / rms.reshape(*rms.shape, *[1] * (directions.ndim - lead))


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
