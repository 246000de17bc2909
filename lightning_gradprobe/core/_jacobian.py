"""Per-sample input Jacobians: ``vmap(jacrev)`` first, plain autograd with batched cotangents as fallback."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torch.func import jacrev, vmap

from ._functions import BatchFunction, Selection

__all__ = ["ENGINE_AUTOGRAD", "ENGINE_FUNC", "batch_leaks", "per_sample_jacobians"]

ENGINE_FUNC = "torch.func"
ENGINE_AUTOGRAD = "autograd"
_WARNED: set[tuple[str, str]] = set()


def per_sample_jacobians(
    function: BatchFunction,
    selection: Selection,
    x: Tensor,
    index: Tensor,
    *,
    engine: str = "auto",
    chunk_size: int | None = None,
    owner: str = "model",
) -> tuple[Tensor, str, str | None]:
    """Jacobians of each sample's selected outputs with respect to that sample's input.

    Args:
        function: The model as a function of a batch.
        selection: Which outputs to differentiate.
        x: Inputs ``(N, ...)`` (not modified).
        index: Per-sample output indices for ``selection`` (``(N,)``, long).
        engine: ``"auto"`` (``torch.func``, falling back to autograd), ``"torch.func"`` or ``"autograd"``.
        chunk_size: Samples per ``vmap`` chunk (bounds memory); ``None`` for all at once.
        owner: A name for the model, used in the one-time fallback warning.

    Returns:
        ``(jacobians, engine_used, fallback_reason)``: ``jacobians`` has shape ``(N, M, *x.shape[1:])``.

    """
    reason = None
    if engine in ("auto", ENGINE_FUNC):
        try:
            return _jacobians_func(function, selection, x, index, chunk_size), ENGINE_FUNC, None
        except Exception as error:  # any failure under the transforms: fall back, or report
            if engine == ENGINE_FUNC:
                raise
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
            key = (owner, type(error).__name__)
            if key not in _WARNED:
                _WARNED.add(key)
                warnings.warn(
                    f"gradprobe: {owner} cannot run under torch.func ({reason}); probing it with plain "
                    "autograd and batched cotangents instead (same verdicts, somewhat slower). "
                    "This warning is shown once.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _jacobians_autograd(function, selection, x, index), ENGINE_AUTOGRAD, reason


def _jacobians_func(
    function: BatchFunction, selection: Selection, x: Tensor, index: Tensor, chunk_size: int | None
) -> Tensor:
    def per_sample(sample: Tensor, sample_index: Tensor) -> Tensor:
        return selection(function(sample.unsqueeze(0)), sample_index.unsqueeze(0)).squeeze(0)

    return vmap(jacrev(per_sample), chunk_size=chunk_size)(x.detach(), index)


def _batched_grad(outputs: Tensor, leaf: Tensor, cotangents: Tensor) -> Tensor:
    """``d<cotangent_p, outputs>/d leaf`` for each cotangent ``p``: one vmapped backward, or a loop."""
    if not outputs.requires_grad:
        return torch.zeros((cotangents.shape[0], *leaf.shape), dtype=leaf.dtype, device=leaf.device)
    try:
        (grads,) = torch.autograd.grad(
            outputs, leaf, cotangents, is_grads_batched=True, retain_graph=True, materialize_grads=True
        )
        return grads
    except RuntimeError:
        rows = [
            torch.autograd.grad(outputs, leaf, cotangent, retain_graph=True, materialize_grads=True)[0]
            for cotangent in cotangents
        ]
        return torch.stack(rows)


def _jacobians_autograd(function: BatchFunction, selection: Selection, x: Tensor, index: Tensor) -> Tensor:
    # The batch-sum trick: exact per-sample rows when samples are independent (checked separately).
    leaf = x.detach().requires_grad_(True)
    outputs = selection(function(leaf.clone()), index)
    n_outputs = outputs.shape[1]
    eye = torch.eye(n_outputs, dtype=outputs.dtype, device=outputs.device)
    cotangents = eye[:, None, :].expand(n_outputs, outputs.shape[0], n_outputs)
    return _batched_grad(outputs, leaf, cotangents).transpose(0, 1)


def batch_leaks(
    function: BatchFunction,
    selection: Selection,
    x: Tensor,
    index: Tensor,
    *,
    generator: torch.Generator,
    tolerance: float = 1e-6,
    max_exact_sources: int = 16,
) -> list[tuple[int, int]]:
    """Find pairs ``(i, j)`` where sample ``i``'s outputs depend on sample ``j``'s input.

    One forward of the whole batch, then ``2 * ceil(log2 N)`` backwards: for each bit ``b`` of the
    sample index, a random cotangent on the samples whose bit ``b`` is 0 (then 1). Any gradient
    reaching a sample outside that group is a leak. Every leaking pair differs in some bit, so every
    leak is seen. The candidate sources this leaves are then confirmed exactly, one backward per
    candidate source with a cotangent on that sample alone, when there are at most
    ``max_exact_sources`` of them; past that (e.g. BatchNorm on batch statistics, where every
    sample reaches every other) the candidate pairs, a superset, are returned.

    Returns:
        The leaking pairs, sorted; empty when samples are independent.

    """
    n = x.shape[0]
    if n < 2:
        return []
    leaf = x.detach().requires_grad_(True)
    outputs = selection(function(leaf.clone()), index)
    n_bits = max(1, math.ceil(math.log2(n)))
    ids = torch.arange(n, device=x.device)
    bits = (ids[None, :] >> torch.arange(n_bits, device=x.device)[:, None]) & 1  # (B, N)
    groups = torch.cat([bits == 0, bits == 1])  # (2B, N): row p selects the samples given a cotangent
    weights = torch.randn(outputs.shape, generator=generator, dtype=torch.float64).to(outputs)
    cotangents = groups[:, :, None].to(outputs.dtype) * weights[None]
    grads = _batched_grad(outputs, leaf, cotangents)
    norms = grads.reshape(grads.shape[0], n, -1).double().norm(dim=2).nan_to_num(nan=math.inf)
    own_scale = (norms * groups).amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    leak = (norms > tolerance * own_scale) & ~groups  # (2B, N): some source in group p reaches input j
    if not leak.any():
        return []
    # Sample i can be a source for input j iff for every bit where they differ, the group holding i leaked into j.
    side = bits.T  # (N, B): bit b of sample i
    leak_by_side = leak.reshape(2, n_bits, n).permute(1, 0, 2)  # (B, side, N)
    differs = side[:, None, :] != side[None, :, :]  # (i, j, B)
    reached = leak_by_side[torch.arange(n_bits)[None, :], side, :]  # (i, B, j)
    candidate = (~differs | reached.permute(0, 2, 1)).all(dim=2) & differs.any(dim=2)
    candidate &= leak.any(dim=0)[None, :]
    sources = candidate.any(dim=1).nonzero().flatten()
    if len(sources) <= max_exact_sources:
        single = torch.zeros((len(sources), n), dtype=torch.bool, device=x.device)
        single[torch.arange(len(sources)), sources] = True
        grads = _batched_grad(outputs, leaf, single[:, :, None].to(outputs.dtype) * weights[None])
        norms = grads.reshape(len(sources), n, -1).double().norm(dim=2).nan_to_num(nan=math.inf)
        scale = (norms * single).amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        candidate = torch.zeros_like(candidate)
        candidate[sources] = (norms > tolerance * scale) & ~single
    return [(int(i), int(j)) for i, j in candidate.nonzero().tolist()]
