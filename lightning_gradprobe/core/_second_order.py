"""Second order: the judging of first order, applied to the input gradient instead of the output.

Training that differentiates *through* input gradients (physics-informed losses with ``d2u/dx2``, gradient
penalties, double backpropagation) consumes the backward of the backward. Here the function under test is

    ``g(x) = R^T grad_x s(x)``,   ``s(x) = w . selected outputs``,

``q`` random projections ``R`` of each sample's input gradient of one random combination ``w`` of its selected
outputs. Its Jacobian, ``R^T H``, comes from autograd's double backward (one per projection); its finite
differences are differences of first-order gradients, computed in float64. Everything else (steps, error
bounds, re-checks, margins, the float64 formula check and the model-dtype check) is :func:`judge_samples`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._functions import ParameterFunction
from ._inputs import free_only
from ._jacobian import compute_gradients
from ._notes import describe_error
from ._parameters import ParameterSpace
from ._verdicts import Judgement, Problem, default_rtol, judge_samples, sample_verdicts, unit_rms
from .report import SecondOrderReport, Verdict

__all__ = ["check_second_order"]

_PROJECTIONS = 2  # double backwards per sample
# Hessian-vector products below this fraction of the problem's own scale (|grad| / |x|) are round-off: a
# gradient is itself computed by a backward pass, and resolving a ReLU network's zero Hessian to 1e-6 of its
# gradient's scale needs no step that would cross its kinks.
_FLOOR = 1e-6
# The mixed term is a property of the weights, not of a sample: a few samples carry it (each of its finite
# differences is a forward and a backward of these samples in float64).
_MIXED_SAMPLES = 2


class _GradientRows:
    """``(x, index) -> R^T grad_x (w . selection(f(x)))`` per sample: the function second order judges.

    A selection in the sense of the first-order engine (it receives the inputs as "outputs"): it runs the model
    itself, in the dtype of its argument (the model-dtype function, or the float64 reference), with a graph
    when its argument has one (so that autograd can take the double backward) and without one otherwise.
    """

    def __init__(
        self,
        function: Callable[[Tensor], Tensor],
        reference: Callable[[Tensor], Tensor],
        selection: Callable[[Tensor, Tensor], Tensor],
        weights: Tensor,
        projections: Tensor,
        reference_dtype: torch.dtype,
    ) -> None:
        self.function, self.reference, self.selection = function, reference, selection
        self.weights, self.projections, self.reference_dtype = weights, projections, reference_dtype
        self.n_outputs = projections.shape[1]

    def __call__(self, x: Tensor, index: Tensor) -> Tensor:
        function = self.reference if x.dtype == self.reference_dtype else self.function
        outer = x.requires_grad and torch.is_grad_enabled()
        with torch.enable_grad():
            point = x if outer else x.detach().requires_grad_(True)
            selected = self.selection(function(point), index)
            scalar = selected @ self.weights.to(selected.dtype)
            (gradient,) = torch.autograd.grad(
                scalar.sum(), point, create_graph=outer, allow_unused=True, materialize_grads=True
            )
        flat = gradient.reshape(gradient.shape[0], -1)
        return flat @ self.projections.to(flat.dtype)


def _identity(x: Tensor) -> Tensor:
    return x


def _hessian_scale(problem: Problem, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
    """The problem's own scale of ``H v`` per unit displacement: ``|s(x)| / max(|x|, sqrt(D))^2``.

    The gradient's own size is no measure of round-off in a Hessian: behind saturated units the gradient is
    ~1e-9 of the output while the rounding of the output's own size is what the backward of the backward sees.
    """
    xr = x.to(problem.reference_dtype)
    with torch.no_grad():
        scalar = problem.selection(problem.reference(xr), index) @ weights.to(problem.reference_dtype)
    flat = free_only(xr.reshape(xr.shape[0], -1), problem.free)
    width = flat.shape[1] if problem.free is None else int(problem.free.sum())
    return scalar.abs().double() / flat.norm(dim=1).clamp_min(width**0.5).double().pow(2)


def check_second_order(
    problem: Problem,
    x: Tensor,
    index: Tensor,
    checked: Tensor,
    *,
    n_outputs: int,
    generator: torch.Generator,
    n_directions: int,
    parameters: ParameterFunction | None = None,
) -> tuple[SecondOrderReport, Judgement | None]:
    """Judge the double backward through the input on the ``checked`` samples of ``x``.

    Args:
        problem: The first-order problem (model functions, selection, dtypes, engine).
        x: The whole input batch (model dtype of the inputs).
        index: Per-sample output indices of the first-order selection.
        checked: Which samples to check.
        n_outputs: Outputs per sample of the first-order selection.
        generator: The probe's own generator.
        n_directions: Random directions per sample.
        parameters: The model as a function of its parameters, for the mixed term (``None``: not checked).

    Returns:
        The report, and the judgement it was made from (``None`` when the model cannot be differentiated twice).

    """
    n = x.shape[0]
    weights = unit_rms(torch.randn(n_outputs, generator=generator, dtype=torch.float64), 0) / n_outputs**0.5
    width = x[0].numel()
    projections = torch.randn((width, min(_PROJECTIONS, width)), generator=generator, dtype=torch.float64)
    projections = (projections / width**0.5).to(x.device)
    rows_of = _GradientRows(
        problem.function,
        problem.reference,
        problem.selection,
        weights.to(x.device),
        projections,
        problem.reference_dtype,
    )
    rows = checked.to(x.device)
    xc, ic = x[rows].detach(), index[rows]
    second = Problem(
        function=_identity,
        reference=_identity,
        selection=rows_of,
        model_dtype=problem.model_dtype,
        reference_dtype=problem.reference_dtype,
        rtol=problem.rtol,
        engine="autograd",  # double backward under vmap is rarely supported by custom Functions
        chunk_size=None,
        floor=_FLOOR,
        gain=_hessian_scale(problem, xc, ic, weights.to(x.device)),
        free=problem.free,
    )
    empty = torch.full((n, n_directions), float("nan"), dtype=torch.float64)
    try:
        leaf = xc.clone().requires_grad_(True)
        gradient_rows = rows_of(leaf.clone(), ic)
        hessian_rows = compute_gradients(
            _identity, rows_of, leaf, leaf.clone(), ic, engine="autograd", check_batch=False, generator=generator
        ).jacobians.detach()
    except Exception as error:  # once_differentiable, an op without a double backward: a finding, not a crash
        reason = f"{describe_error(error, 160)}"
        verdicts = [Verdict.UNCHECKED] * n
        for i in checked.tolist():
            verdicts[i] = Verdict.FAIL
        return SecondOrderReport(tuple(verdicts), empty, empty.clone(), empty.clone(), reason), None
    judgement = judge_samples(second, hessian_rows, xc, ic, generator=generator, n_directions=n_directions)
    verdicts = [Verdict.UNCHECKED] * n
    for i, verdict in zip(checked.tolist(), sample_verdicts(judgement.codes), strict=True):
        verdicts[i] = verdict
    finding = None
    if not gradient_rows.requires_grad and Verdict.FAIL in verdicts:
        # Piecewise-linear models legitimately have a gradient without a graph (a zero Hessian); a gradient
        # that finite differences show to vary, yet carries no graph, was cut from it.
        finding = (
            "the input gradient carries no autograd graph back to the input although it varies with the input "
            "(a @once_differentiable backward, or one computed from detached tensors or under no_grad)"
        )
    margin, relative_error, resolution = empty.clone(), empty.clone(), empty.clone()
    margin[checked] = judgement.margin
    relative_error[checked] = judgement.relative_error
    resolution[checked] = judgement.resolution
    mixed, mixed_margin = (
        _check_mixed_term(
            parameters,
            problem,
            xc[:_MIXED_SAMPLES],
            ic[:_MIXED_SAMPLES],
            weights.to(x.device),
            projections,
            generator,
            n_directions,
        )
        if parameters is not None and any(parameters.trainable)
        else (None, float("nan"))
    )
    report = SecondOrderReport(
        tuple(verdicts), margin, relative_error, resolution, finding, mixed_term=mixed, mixed_margin=mixed_margin
    )
    return report, judgement


def _check_mixed_term(
    parameters: ParameterFunction,
    problem: Problem,
    x: Tensor,
    index: Tensor,
    weights: Tensor,
    projections: Tensor,
    generator: torch.Generator,
    n_directions: int,
) -> tuple[Verdict, float]:
    """The mixed term: ``d/dtheta`` of ``c . R^T grad_x s``, autograd against central differences, in float64.

    ``c`` combines the checked samples and projections at random; the directions in parameter space are random.

    Judged by :meth:`~._parameters.ParameterSpace.judge`'s rules: a clean check passes; anything else is checked
    again with step / 8, where a failure must repeat with the same finite-difference derivative
    (``D(h) = D(h/8)``), stand out of their spread, and not pass with step x 8 at a 4x smaller error.
    """
    ref = problem.reference_dtype
    xr = x.to(ref)
    combination = torch.randn((x.shape[0], projections.shape[1]), generator=generator, dtype=torch.float64)
    combination = combination.to(xr) / combination.numel() ** 0.5  # (on the inputs' device)

    def penalty(values: Sequence[Tensor]) -> Tensor:
        outer = torch.is_grad_enabled()  # differentiated (the gradient) or not (the finite differences)
        with torch.enable_grad():
            point = xr.detach().requires_grad_(True)
            scalar = problem.selection(parameters.call(values, point), index) @ weights.to(ref)
            (gradient,) = torch.autograd.grad(
                scalar.sum(), point, create_graph=outer, allow_unused=True, materialize_grads=True
            )
        return ((gradient.reshape(x.shape[0], -1) @ projections.to(ref)) * combination).sum()

    space = ParameterSpace(parameters, ref, generator, n_directions, per_tensor=False)
    verdict, margin, _ = space.judge(penalty, rtol=default_rtol(ref), floor=_FLOOR)
    return verdict, margin
