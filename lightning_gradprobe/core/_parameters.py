"""Parameter gradients, checked on the whole model at once: what training consumes.

A wrong *weight* gradient (a hand-written linear, convolution or normalisation whose ``grad_input`` is right and
whose ``grad_weight`` is not) passes every input check. Here the function under test is

    ``s(theta) = sum_i u_i . selected outputs_i(theta)``,

a random combination ``u`` of the checked outputs of a few samples, as a function of every trainable parameter.
Its gradient comes from one float64 backward (the same code on a float64 copy of the parameters); it is compared
along random directions ``v`` in parameter space with float64 central differences of ``s`` (two forwards of those
samples per direction), by the rules of every other check: a clean first check passes; anything else is checked
again with step / 8, where a failure must repeat with the same finite-difference derivative. Only when this fails
does localization check each submodule's own parameters, to name the culprit.

Frozen parameters (``requires_grad=False``) get no direction; parameters shared between modules (tied embeddings)
are one parameter, whose gradient sums both uses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ._finite_differences import Comparison, Stencil, compare, default_step
from ._functions import ParameterFunction
from ._verdicts import Problem, consistent, default_rtol, unit_rms
from .report import ParameterCheck, Verdict

__all__ = ["check_parameter_gradients", "judge_directional_derivatives"]

PARAMETER_SAMPLES = 2  # samples whose outputs carry the check: every weight is used by any sample
PARAMETER_DIRECTIONS = 2  # random directions in parameter space: one can miss a small block (1 in 100 measured)
# Directional derivatives below this fraction of the problem's own scale (|s| / |theta|) are round-off.
_FLOOR = 1e-6


def check_parameter_gradients(
    model: nn.Module,
    parameters: ParameterFunction,
    problem: Problem,
    x: Tensor,
    index: Tensor,
    *,
    n_outputs: int,
    generator: torch.Generator,
) -> ParameterCheck | None:
    """Judge the gradient of ``s(theta)`` (see the module docstring) on the first samples of ``x``.

    Returns ``None`` when the model has no trainable floating parameter.
    """
    trainable = _trainable_mask(model, parameters)
    if not bool(trainable.any()):
        return None
    ref = problem.reference_dtype
    theta = parameters.theta.to(ref)
    xs, ixs = x[:PARAMETER_SAMPLES].to(ref), index[:PARAMETER_SAMPLES]
    width = n_outputs
    combination = torch.randn((xs.shape[0], width), generator=generator, dtype=torch.float64) / width**0.5
    combination = combination.to(theta)

    def value_at(flat: Tensor) -> Tensor:
        return (problem.selection(parameters.call(flat, xs), ixs).to(ref) * combination).sum()

    leaf = theta.clone().requires_grad_(True)
    value = value_at(leaf)
    row = (
        torch.autograd.grad(value, leaf, allow_unused=True, materialize_grads=True)[0]
        if value.requires_grad
        else torch.zeros_like(theta)
    )
    directions = torch.randn((PARAMETER_DIRECTIONS, theta.numel()), generator=generator, dtype=torch.float64)
    directions = unit_rms(directions * trainable.to(directions), 1).to(theta)
    gain = (value.detach().abs() / theta.norm().clamp_min(theta.numel() ** 0.5)).reshape(1)
    rtol = default_rtol(ref)
    verdict, margin, relative_error = judge_directional_derivatives(
        value_at, value.detach(), row, theta, directions, rtol=rtol, gain=gain, floor=_FLOOR
    )
    return ParameterCheck(verdict, margin, relative_error, int(trainable.sum()), int((~trainable).sum()))


def _trainable_mask(model: nn.Module, parameters: ParameterFunction) -> Tensor:
    """``(P,)`` which coordinates of ``parameters.theta`` belong to parameters that require grad."""
    pieces = [
        torch.full((p.numel(),), p.requires_grad, dtype=torch.bool)
        for _, p in model.named_parameters()
        if p.is_floating_point()
    ]
    return torch.cat(pieces).to(parameters.theta.device) if pieces else torch.zeros(0, dtype=torch.bool)


def judge_directional_derivatives(
    value_at: Callable[[Tensor], Tensor],
    value: Tensor,
    row: Tensor,
    theta: Tensor,
    directions: Tensor,
    *,
    rtol: float,
    gain: Tensor,
    floor: float,
) -> tuple[Verdict, float, float]:
    """Autograd's ``row . v`` against central differences of ``value_at`` along each of ``directions``.

    A clean first check passes; anything else is checked again with step / 8, where a failure must repeat with
    the same finite-difference derivative (``D(h) = D(h/8)``). Returns the verdict, the worst margin of the
    deciding checks, and the worst relative error.
    """

    def check(step: Tensor) -> tuple[Stencil, Comparison]:
        with torch.no_grad():
            plus = torch.stack([value_at(theta + step * v) for v in directions])
            minus = torch.stack([value_at(theta - step * v) for v in directions])
        d_plus, d_minus = (theta + step * directions) - theta, theta - (theta - step * directions)
        stencil = Stencil(
            value.reshape(1, 1),
            plus.reshape(1, -1, 1),
            minus.reshape(1, -1, 1),
            d_plus[None],
            d_minus[None],
            torch.finfo(theta.dtype).eps,
        )
        return stencil, compare(row.reshape(1, 1, -1), stencil, rtol, gain=gain, floor=floor)

    step = default_step(theta.reshape(1, -1), theta.dtype).to(theta)
    stencil, first = check(step)
    clean = first.passed & first.reliable & first.resolved
    if bool(clean.all()):
        return Verdict.PASS, float(first.margin.max()), float(first.relative_error.max())
    finer_stencil, finer = check(step / 8)
    same = consistent(stencil, finer_stencil)
    failed = (first.reliable & ~first.passed) & (finer.reliable & ~finer.passed) & same
    judged = clean | (finer.passed & finer.reliable & finer.resolved)
    margin = float(torch.where(clean, first.margin, finer.margin).max())
    relative_error = float(torch.where(clean, first.relative_error, finer.relative_error).max())
    if bool(failed.any()):
        return Verdict.FAIL, margin, relative_error
    return (Verdict.PASS if bool(judged.all()) else Verdict.INCONCLUSIVE), margin, relative_error
