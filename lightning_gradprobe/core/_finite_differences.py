"""Central differences along random directions, with an error bound measured from the stencil itself.

For a direction ``v`` and step ``h`` the stencil evaluates ``f0 = f(x)``, ``f+ = f(x + h v)`` and
``f- = f(x - h v)`` (one ``f0`` per sample, shared by all directions). With the *realized*
displacements ``d+ = (x + h v) - x`` and ``d- = x - (x - h v)`` (the perturbed inputs are rounded):

- autograd predicts ``a = J (d+ + d-)``; the finite difference measures ``d = f+ - f-``;
- the second difference ``s = f+ - 2 f0 + f- - J (d+ - d-)`` bounds the difference's own error:
  exactly so for a piecewise-linear function with one kink inside the stencil (``d - a = s``), and
  conservatively for a smooth one (``s ~ h^2 f''`` while the truncation error is ``~ h^3 f'''``);
- round-off adds ``~ eps * (|f+| + 2|f0| + |f-|)``.

A direction passes when ``|a - d| <= allowed = rtol * scale + 2 (|s| + round-off)``; its *margin* is
``|a - d| / allowed``. Since the true ``J v`` lies within the bound of ``d``, a pass certifies the
backward to within ``allowed + bound``; that *resolution* must be at most 1% of ``scale`` for a pass
(a check that could not have seen a 1% error verifies nothing). ``scale`` is the larger of ``|a|``,
``|d|``, the typical size of ``J v`` (a backward's round-off scales with its terms, not with a result
that happens to cancel) and the round-off floor of the problem's own scale (see :class:`Comparison`).
A direction whose ``s`` stands well above both round-off and a tenth of the signal has a kink (or a
discontinuity) inside its stencil: it proves nothing either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ._functions import BatchFunction

__all__ = [
    "RESOLUTION",
    "Comparison",
    "Directional",
    "Stencil",
    "compare",
    "compare_directional",
    "default_step",
    "directional",
    "evaluate_stencil",
    "noise_floor",
    "project",
]

_ROUNDOFF_FACTOR = 8.0
_KINK_FRACTION = 0.1
RESOLUTION = 0.01  # a pass certifies the backward to within 1% of the scale of J d


def default_step(x: Tensor, dtype: torch.dtype, *, free: Tensor | None = None) -> Tensor:
    """Per-sample central-difference step: ``eps(dtype)^(1/3) * max(1, rms(x_i))``.

    Balances truncation (``~h^2``) against round-off (``~eps/h``); scales with the input's size.

    Example:
        >>> import torch
        >>> step = default_step(torch.ones(2, 3) * torch.tensor([[1.0], [1e3]]), torch.float64)
        >>> [f"{s:.1e}" for s in step.tolist()]
        ['6.1e-06', '6.1e-03']

    """
    squares = x.detach().to(torch.float64).reshape(x.shape[0], -1).pow(2)
    if free is not None:  # packed inputs: the frozen coordinates (ids, masks) do not set the step
        squares = squares[:, free.to(squares.device)]
    rms = squares.mean(1).sqrt()
    return torch.finfo(dtype).eps ** (1 / 3) * rms.clamp_min(1.0)


@dataclass(frozen=True)
class Stencil:
    """Evaluated stencil for ``n`` samples and ``k`` directions (all in the finite-difference dtype)."""

    f0: Tensor  # (n, M)
    f_plus: Tensor  # (n, k, M)
    f_minus: Tensor  # (n, k, M)
    d_plus: Tensor  # (n, k, D) realized displacement x+ - x
    d_minus: Tensor  # (n, k, D) realized displacement x - x-
    eps: float


def evaluate_stencil(
    function: BatchFunction,
    selection: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    index: Tensor,
    directions: Tensor,
    steps: Tensor,
    *,
    f0: Tensor | None = None,
    rows_per_call: int = 64,
) -> Stencil:
    """Evaluate ``f(x)``, ``f(x + h v)``, ``f(x - h v)`` in as few batched forward calls as memory allows.

    Args:
        function: The model as a function of a batch, already in the finite-difference dtype.
        selection: Which outputs to compare.
        x: The checked samples ``(n, ...)``, in the finite-difference dtype.
        index: Their per-sample output indices ``(n,)``.
        directions: ``(n, k, ...)`` directions.
        steps: ``(n,)`` steps.
        f0: Reuse already evaluated ``f(x)``.
        rows_per_call: Rows per forward call (64 measured fastest on CPU: the batch stays in cache).

    """
    n, k = directions.shape[:2]
    scaled = steps.to(x.dtype).reshape(n, 1, *([1] * (x.ndim - 1))) * directions.to(x.dtype)
    x_plus = x.unsqueeze(1) + scaled
    x_minus = x.unsqueeze(1) - scaled
    d_plus = (x_plus - x.unsqueeze(1)).reshape(n, k, -1)
    d_minus = (x.unsqueeze(1) - x_minus).reshape(n, k, -1)
    parts = [x_plus.flatten(0, 1), x_minus.flatten(0, 1)]
    part_index = [index.repeat_interleave(k), index.repeat_interleave(k)]
    if f0 is None:
        parts.insert(0, x)
        part_index.insert(0, index)
    stacked, stacked_index = torch.cat(parts), torch.cat(part_index)
    with torch.no_grad():
        values = torch.cat(
            [
                selection(function(stacked[i : i + rows_per_call]), stacked_index[i : i + rows_per_call])
                for i in range(0, stacked.shape[0], rows_per_call)
            ]
        )
    if f0 is None:
        f0, values = values[:n], values[n:]
    f_plus, f_minus = values[: n * k].reshape(n, k, -1), values[n * k :].reshape(n, k, -1)
    return Stencil(f0, f_plus, f_minus, d_plus, d_minus, torch.finfo(values.dtype).eps)


def project(stencil: Stencil, projection: Tensor | None) -> Stencil:
    """The stencil of ``f @ projection`` (``None``: unchanged); directions and displacements are shared."""
    if projection is None:
        return stencil
    p = projection.to(stencil.f0)
    return replace(stencil, f0=stencil.f0 @ p, f_plus=stencil.f_plus @ p, f_minus=stencil.f_minus @ p)


@dataclass(frozen=True)
class Comparison:
    """Per-direction comparison of autograd with a stencil; every field is ``(n, k)``.

    ``scale`` is what errors are measured against: the larger of ``|J d|``, the finite difference, the
    typical size of ``J d`` over random directions, and ``noise_floor(dtype)`` times the problem's own scale
    along ``d`` (``|f(x)| |d| / |x|`` or the batch's typical ``|J| |d|``), so that round-off residue on a
    Jacobian that is zero in exact arithmetic is never mistaken for an error.
    """

    passed: Tensor  # bool: |a - d| <= allowed
    reliable: Tensor  # bool: finite, and no kink or discontinuity inside the stencil
    resolved: Tensor  # bool: a pass here certifies the backward to within RESOLUTION of scale
    roundoff_limited: Tensor  # bool: round-off, not curvature, dominates the bound (a larger step helps)
    relative_error: Tensor  # |a - d| / scale
    fd_error: Tensor  # the stencil's own error bound, relative to scale
    margin: Tensor  # |a - d| / allowed: <= 1 passes
    resolution: Tensor  # (allowed + bound) / scale: the backward's error a pass certifies, relative
    scale: Tensor  # absolute scale (see above)
    natural: Tensor  # absolute: the problem's own scale of J d


def noise_floor(dtype: torch.dtype) -> float:
    """Smallest ``|J d|``, relative to the problem's own scale, that a check in ``dtype`` can resolve.

    Central differences resolve ``~eps / h = eps^(2/3)`` of the output-per-input scale at the default step;
    ``3 eps^(2/3)`` leaves room for a grown step to certify an exact-zero Jacobian.

    Example:
        >>> f"{noise_floor(torch.float64):.1e}"
        '1.1e-10'

    """
    return 3.0 * torch.finfo(dtype).eps ** (2 / 3)


@dataclass(frozen=True)
class Directional:
    """Autograd's side of a stencil: what :func:`compare` needs of the Jacobian and the displacements.

    ``predicted`` and ``asymmetry`` are ``(n, k, M)``: ``J (d+ + d-)`` and ``J (d+ - d-)``; ``displacement`` and
    ``typical`` are ``(n, k)``: ``|d+ + d-|`` and the typical size of ``J (d+ + d-)`` over random directions,
    ``||J||_F |d+ + d-| / sqrt(D)``. A check that never holds its Jacobian or displacements whole (the parameter
    check, over every weight) computes these four itself.
    """

    predicted: Tensor
    asymmetry: Tensor
    displacement: Tensor
    typical: Tensor


def directional(jacobians: Tensor, stencil: Stencil) -> Directional:
    """:class:`Directional` of ``(n, M, ...)`` Jacobians along the stencil's realized displacements."""
    # (In the wider of the outputs' and the inputs' dtypes: a half-precision model may return float32 outputs.)
    dtype = torch.promote_types(stencil.f0.dtype, stencil.d_plus.dtype)
    jac = jacobians.to(dtype).reshape(jacobians.shape[0], jacobians.shape[1], -1)
    d_plus, d_minus = stencil.d_plus.to(dtype), stencil.d_minus.to(dtype)
    predicted = torch.einsum("nmd,nkd->nkm", jac, d_plus + d_minus)
    # A tiny correction; a non-finite Jacobian must not make the stencil itself look unreliable.
    asymmetry = torch.einsum("nmd,nkd->nkm", jac.nan_to_num(0.0, 0.0, 0.0), d_plus - d_minus)
    # A backward's round-off scales with its terms, not with a result that cancelled by chance:
    # the typical size of J v over random directions is ||J||_F ||v|| / sqrt(D).
    displacement = (d_plus + d_minus).norm(dim=-1)
    typical = (jac.norm(dim=(1, 2)).unsqueeze(1) * displacement / jac.shape[-1] ** 0.5).nan_to_num(nan=0.0)
    return Directional(predicted, asymmetry, displacement, typical)


def compare(
    jacobians: Tensor,
    stencil: Stencil,
    rtol: float,
    *,
    gain: Tensor | None = None,
    floor: float | None = None,
    resolution: float = RESOLUTION,
) -> Comparison:
    """Compare ``J (d+ + d-)`` with ``f+ - f-`` for each sample and direction (whole output vectors).

    Args:
        jacobians: ``(n, M, ...)`` autograd Jacobians of the checked samples (any dtype).
        stencil: The evaluated stencil.
        rtol: Relative tolerance granted to the autograd side (its own dtype's precision).
        gain: ``(n,)`` the problem's own output change per unit input displacement (``|f| / |x|``); the
            scale below which differences are round-off. ``None``: only the Jacobian's own scale counts.
        floor: ``|J v|`` below this fraction of ``gain |v|`` is round-off (default :func:`noise_floor`).
        resolution: Largest certified relative error that still counts as resolved.

    """
    autograd = directional(jacobians, stencil)
    return compare_directional(autograd, stencil, rtol, gain=gain, floor=floor, resolution=resolution)


def compare_directional(
    autograd: Directional,
    stencil: Stencil,
    rtol: float,
    *,
    gain: Tensor | None = None,
    floor: float | None = None,
    resolution: float = RESOLUTION,
) -> Comparison:
    """:func:`compare`, given autograd's side as a :class:`Directional` (only the stencil's values are read)."""
    predicted, asymmetry, displacement, typical = (autograd.predicted, autograd.asymmetry, autograd.displacement,
                                                   autograd.typical)  # fmt: skip
    measured = stencil.f_plus - stencil.f_minus
    f0 = stencil.f0.unsqueeze(1)
    second = stencil.f_plus - 2 * f0 + stencil.f_minus - asymmetry
    roundoff = _ROUNDOFF_FACTOR * stencil.eps * (stencil.f_plus.abs() + 2 * f0.abs() + stencil.f_minus.abs())

    error = (predicted - measured).norm(dim=-1).nan_to_num(nan=math.inf)
    # (A non-finite Jacobian must not make the function look kinked: the measured side still has a size.)
    magnitude = torch.maximum(
        predicted.norm(dim=-1).nan_to_num(nan=0.0, posinf=0.0), measured.norm(dim=-1).nan_to_num(nan=0.0, posinf=0.0)
    )
    natural = torch.zeros_like(displacement) if gain is None else gain.to(displacement).unsqueeze(1) * displacement
    floor_scale = (noise_floor(stencil.f0.dtype) if floor is None else floor) * natural
    scale = torch.maximum(torch.maximum(magnitude, typical), floor_scale)
    curvature = second.norm(dim=-1)
    bound = (second.abs() + roundoff).norm(dim=-1)
    finite = measured.isfinite().all(-1) & second.isfinite().all(-1) & f0.isfinite().all(-1)
    kink = (curvature > _KINK_FRACTION * torch.maximum(magnitude, floor_scale)) & (
        curvature > 4 * roundoff.norm(dim=-1)
    )
    allowed = rtol * scale + 2 * bound
    tiny = torch.finfo(magnitude.dtype).tiny
    safe_scale = scale.clamp_min(tiny)
    certified = (allowed + bound) / safe_scale
    return Comparison(
        passed=(error <= allowed) & finite,  # False when autograd is non-finite
        reliable=finite & ~kink,
        resolved=certified <= max(resolution, 3 * rtol),
        roundoff_limited=roundoff.norm(dim=-1) >= curvature,
        relative_error=error / safe_scale,
        fd_error=bound / safe_scale,
        margin=torch.where(error == 0, 0.0, error / allowed.clamp_min(tiny)),
        resolution=certified,
        scale=scale,
        natural=natural,
    )
