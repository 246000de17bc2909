"""Stage 3 of a probe: one forward of the batch, the outputs to differentiate, and their per-sample Jacobians."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._functions import BatchFunction, OutputSelector, Selection, Target, build_batch_function, build_selection
from ._jacobian import ENGINE_FUNC, Gradients, compute_gradients, leak_tolerance
from ._notes import Notes
from ._verdicts import output_projection

__all__ = ["ForwardPass", "forward_and_jacobians", "saliency_rows"]

MAX_JACOBIAN_BYTES = 1 << 30  # full per-sample Jacobians beyond this are replaced by random projections


@dataclass(frozen=True)
class ForwardPass:
    """The batch's forward (with its graph) and the Jacobian rows computed through it.

    Attributes:
        function: The model as a function of a batch, in the model's dtype.
        leaf: The batch, a leaf that requires grad.
        outputs: ``function(leaf)``, with its graph.
        selection: Which outputs are differentiated.
        index: ``(N,)`` per-sample output indices for ``selection``.
        gradients: The Jacobian rows, the engine that computed them, and the batch-independence evidence.
        projection: ``(M, q)`` random output projections the checked rows are seen through, or ``None`` when the
            rows are the full Jacobians (then row 0 of ``gradients`` is not a separate saliency row).
        sample_factors: ``(N,)`` random factors the checked rows' cotangents were scaled by, one per sample (and
            divided out again), when batch independence is to be read from a comparison with the reference's
            rows (see :func:`~._jacobian.leaking_against`); ``None`` when ``gradients`` checked it on their own.
        cotangents: ``(P, N, M)`` the rows' cotangents, unscaled (for an independence check of their own).

    """

    function: BatchFunction
    leaf: Tensor
    outputs: Tensor
    selection: Selection
    index: Tensor
    gradients: Gradients
    projection: Tensor | None
    sample_factors: Tensor | None = None
    cotangents: Tensor | None = None

    @property
    def first_checked_row(self) -> int:
        """Index of the first checked row in ``gradients.jacobians`` (after the saliency row, if separate)."""
        return 0 if self.projection is None else 1

    @property
    def jacobians(self) -> Tensor:
        """``(N, rows, ...)`` every row computed (detached)."""
        return self.gradients.jacobians.detach()

    @property
    def saliency(self) -> Tensor:
        """``(N, ...)`` each sample's saliency: the input gradient of its target."""
        jac = self.jacobians
        if self.projection is not None:
            return jac[:, 0]
        return saliency_rows(jac, self.selection.kind, self.outputs.detach())

    @property
    def checked_rows(self) -> Tensor:
        """``(N, q, ...)`` the rows the check compares (all of them, or their random projections)."""
        return self.jacobians[:, self.first_checked_row :]


def forward_and_jacobians(
    model: Any,
    leaf: Tensor,
    *,
    target: Target,
    forward: Any,
    output: OutputSelector,
    engine: str,
    chunk_size: int | None,
    max_full_outputs: int,
    n_projections: int,
    check_batch: bool,
    generator: torch.Generator,
    bounded: bool = True,
    notes: Notes | None = None,
    check_rows: bool = False,
    model_projections: int | None = None,
    independence_from_reference: bool = False,
) -> ForwardPass:
    """One forward of the batch (the model gets a copy it may write into), the selection, the Jacobians.

    With ``check_rows`` and more outputs than the check compares, only the rows a probe needs are computed:
    the saliency row, then the random output projections the check sees (``ForwardPass.projection``), the first
    ``model_projections`` of them (all with ``None``: when a float64 reference judges the formula, the model's
    own dtype is only compared with it, and one projection does that).

    With ``independence_from_reference`` (a float64 reference will compute the checked rows of every sample), batch
    independence costs no backward here: the checked rows get a random factor per sample
    (``ForwardPass.sample_factors``), to be compared with the reference's rows. Not in half precision, whose
    rounding reaches the leak tolerance, nor under ``torch.func``, whose rows never see the batch.
    """
    function = build_batch_function(model, forward=forward, output=output, dtype=None)
    outputs = function(leaf.clone())
    _check_outputs(outputs, leaf.shape[0])
    # Memory bound: full Jacobians are N x M x D; past the budget, compare random output projections instead.
    bytes_per_row = leaf.numel() * leaf.element_size()
    affordable = max(1, MAX_JACOBIAN_BYTES // max(bytes_per_row, 1)) if bounded else max_full_outputs
    selection, index = build_selection(
        target,
        outputs.detach(),
        max_full_outputs=min(max_full_outputs, affordable),
        n_projections=n_projections,
        generator=generator,
    )
    if notes is not None and selection.kind == "projected":
        _note_projection(notes, outputs[0].numel(), selection.n_outputs, max_full_outputs)
    projection = output_projection(selection.n_outputs, generator, leaf.device) if check_rows else None
    n, first = leaf.shape[0], 0 if projection is None else 1
    cotangents = None
    if projection is not None:
        salient = _saliency_cotangent(selection, outputs.detach(), index).double()
        computed = projection.T[:model_projections]
        cotangents = torch.cat([salient[None], computed[:, None, :].expand(-1, n, -1)])
    fold = independence_from_reference and check_batch and n > 1 and engine != ENGINE_FUNC
    foldable = _foldable(outputs.dtype) and _foldable(leaf.dtype)
    factors = _sample_factors(n, generator).to(leaf.device) if fold and foldable else None
    scaled = cotangents
    if factors is not None:
        if cotangents is None:  # every output's row: the full Jacobians
            eye = torch.eye(selection.n_outputs, dtype=torch.float64, device=leaf.device)
            cotangents = eye[:, None, :].expand(-1, n, -1)
        scaled = torch.cat([cotangents[:first], cotangents[first:] * factors[None, :, None]])
    gradients = compute_gradients(
        function,
        selection,
        leaf,
        outputs,
        index,
        engine=engine,
        check_batch=check_batch and factors is None,
        generator=generator,
        chunk_size=chunk_size,
        owner=model,
        cotangents=scaled,
    )
    if factors is not None:  # (in place: the rows are this call's own, with no graph)
        jac = gradients.jacobians
        jac[:, first:] /= factors.to(jac.dtype).reshape((n, 1) + (1,) * (jac.ndim - 2))
    if notes is not None and gradients.fallback_reason:
        notes.add(f"torch.func could not run the model ({gradients.fallback_reason}); plain autograd was used")
    return ForwardPass(function, leaf, outputs, selection, index, gradients, projection, factors, cotangents)


def _foldable(dtype: torch.dtype) -> bool:
    """Whether the dtype's rounding sits far below its leak tolerance (not capped at 1%: not half precision)."""
    return leak_tolerance(dtype) < 1e-2


def _sample_factors(n: int, generator: torch.Generator) -> Tensor:
    """``(N,)`` random factors of either sign and magnitude in [1, 2): two samples' ratio is never 1 but by chance."""
    uniform = torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1
    return torch.where(uniform >= 0, uniform + 1, uniform - 1)


def _note_projection(notes: Notes, n_outputs: int, n_compared: int, max_full_outputs: int) -> None:
    why = (
        f"more than `max_full_outputs`={max_full_outputs}"
        if n_outputs > max_full_outputs
        else "full Jacobians past the 1 GiB memory budget"
    )
    notes.add(
        f"{n_outputs} outputs per sample were compared through {n_compared} random "
        f"projections ({why}); pass `target=` to check chosen outputs in full",
        weaker=True,
    )


def _check_outputs(outputs: Tensor, n: int) -> None:
    if outputs.ndim == 0 or outputs.shape[0] != n:
        raise ValueError(
            f"probe: the model's output has shape {tuple(outputs.shape)}, without the batch dimension "
            f"({n}) first. Return per-sample outputs (N, ...) - e.g. not a loss already reduced over the batch."
        )
    if not outputs.is_floating_point():
        raise TypeError(f"probe: the model's output must be floating, got {outputs.dtype}.")


def _saliency_cotangent(selection: Selection, outputs: Tensor, index: Tensor) -> Tensor:
    """``(N, M)``: the combination of selected outputs whose input gradient is each sample's saliency."""
    n, m = outputs.shape[0], selection.n_outputs
    if selection.kind == "all":
        return torch.nn.functional.one_hot(outputs.reshape(n, -1).argmax(1), m).to(outputs.device)
    if selection.kind == "callable":
        return torch.ones((n, m), device=outputs.device)
    return torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long, device=outputs.device), m)


def saliency_rows(jac: Tensor, kind: str, outputs: Tensor) -> Tensor:
    """Each sample's saliency from its full Jacobian.

    The row of its largest output (``"all"``), the sum of the rows (``"callable"``), or the only row.
    """
    if kind == "all" and jac.shape[1] > 1:
        rows = outputs.reshape(outputs.shape[0], -1).argmax(1).to(jac.device)
        return jac[torch.arange(jac.shape[0], device=jac.device), rows]
    if kind == "callable":
        return jac.sum(1)
    return jac[:, 0]
