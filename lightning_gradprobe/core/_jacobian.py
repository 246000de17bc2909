"""Per-sample input Jacobians, and the check that the batch really holds independent samples.

Two engines:

- ``"autograd"`` (default): one forward of the whole batch, then one backward per selected output
  through that shared graph, each with a cotangent spanning the whole batch (Captum's batch-sum
  trick, generalised to every output row). Row ``m`` of sample ``i`` is exact when samples are
  independent, which is verified on every call (below). Runs any model autograd can run, classic
  ``torch.autograd.Function`` included.
- ``"torch.func"``: ``vmap`` over samples of ``jacrev`` of the per-sample function (each sample
  alone, through ``functional_call``). Falls back to ``"autograd"``, with a one-time warning, for
  models that cannot run under the transforms.

Independence check: one more batched cotangent, random ``u``. Through the batch graph it gives
``g_j = sum_i J_ij^T u_i``; from the per-sample rows, ``sum_m u_jm J_j[m]``. They differ exactly
when some sample's outputs depend on another sample's input (:func:`leaking_inputs`). Where a float64
reference computes the same rows anyway, no backward is added: the model's rows get a random factor per
sample on their cotangents, and differ from the reference's where samples mix (:func:`leaking_against`).
The offending pairs are then found with :func:`leaking_pairs`.

A forward can mix samples while its backward claims no cross-sample gradient at all (a hand-written backward that
treats batch statistics as constants): nothing above sees it, and the per-sample finite differences, which move
every sample at once, keep the batch's statistics in place. :func:`unclaimed_leaks` looks at the forward alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import jacrev, vmap

from ._finite_differences import Stencil, compare, default_step
from ._functions import BatchFunction
from ._notes import describe_error, subject_name, warn_once

Selector = Callable[[Tensor, Tensor], Tensor]
"""Maps a batch of outputs and per-sample indices to the rows to differentiate, ``(N, M)``."""

__all__ = [
    "ENGINE_AUTOGRAD",
    "ENGINE_FUNC",
    "CrossSampleCheck",
    "Gradients",
    "NondeterministicForward",
    "check_cross_sample",
    "compute_gradients",
    "jacobians_of",
    "leak_tolerance",
    "leaking_against",
    "leaking_inputs",
    "leaking_pairs",
    "unclaimed_leaks",
]

ENGINE_FUNC = "torch.func"
ENGINE_AUTOGRAD = "autograd"
# A forward dependence across samples counts when the finite difference shows it beyond twice its own error bound
# plus this fraction of the comparison's scale (the float64 resolution of a pass).
_RESOLVED_DEPENDENCE = 1e-6
# The forward-only leak test: a batch of this many samples, one of them moved by this fraction of the inputs' RMS (at
# least 1), or by 100 times the leak tolerance where that is more: a dependence of a tenth shows ten times above the
# tolerance, and a batch-independent model moves nothing else. Three samples show any mixing through batch
# statistics (two do not: normalised by their own mean and spread, two samples are +-1 whatever their values); a
# larger batch costs more where the model's forward is dear.
_UNCLAIMED_BATCH = 3
_UNCLAIMED_MOVE = 1e-2


@dataclass(frozen=True)
class Gradients:
    """Jacobians ``(N, M, ...)`` of the selected outputs, and how they were obtained."""

    jacobians: Tensor
    engine: str
    fallback_reason: str | None
    leaking_inputs: Tensor | None  # (N,) bool: inputs reached by another sample's outputs; None if unchecked


def compute_gradients(
    function: BatchFunction,
    selection: Selector,
    leaf: Tensor,
    outputs: Tensor,
    index: Tensor,
    *,
    engine: str,
    check_batch: bool,
    generator: torch.Generator,
    chunk_size: int | None = None,
    owner: Any = None,
    cotangents: Tensor | None = None,
) -> Gradients:
    """Per-sample Jacobians of ``selection(outputs)`` with respect to ``leaf``.

    Args:
        function: The model as a function of a batch (used by the ``torch.func`` engine).
        selection: Which outputs to differentiate.
        leaf: The input batch, a leaf that requires grad.
        outputs: ``function(leaf)``, with its graph.
        index: Per-sample output indices for ``selection``.
        engine: ``"auto"``/``"autograd"`` or ``"torch.func"``.
        check_batch: Whether to verify that samples are independent.
        generator: The probe's own generator.
        chunk_size: Samples per ``vmap`` chunk for the ``torch.func`` engine.
        owner: The model, for the fallback warning (said once per model).
        cotangents: ``(P, N, M)`` per-sample output combinations whose rows to compute instead of all ``M``
            (row ``p`` of sample ``i`` is ``cotangents[p, i] @ J_i``); ``None`` for the full Jacobians.

    """
    selected = selection(outputs, index)
    n, n_outputs = selected.shape
    if cotangents is None:
        eye = torch.eye(n_outputs, dtype=selected.dtype, device=selected.device)
        cotangents = eye[:, None, :].expand(n_outputs, n, n_outputs)
    cotangents = cotangents.to(selected)
    reason = None
    used = ENGINE_AUTOGRAD
    jac = None
    if engine == ENGINE_FUNC:
        try:
            full = _jacobians_func(function, selection, leaf, index, chunk_size)
            jac = torch.einsum("pnm,nm...->np...", cotangents, full)
            used = ENGINE_FUNC
        except Exception as error:  # any failure under the transforms: fall back, warn once
            reason = f"{describe_error(error, 200)}"
            warn_once(
                owner,
                f"torch.func fallback: {type(error).__name__}",
                f"gradprobe: {subject_name(owner)} cannot run under torch.func ({reason}); probing it with plain "
                "autograd and batched cotangents instead (same verdicts). This warning is shown once.",
                stacklevel=3,
            )
    if jac is None:
        jac = _batched_grad(selected, leaf, cotangents).transpose(0, 1)
    leaking = leaking_inputs(selected, leaf, cotangents, jac, generator) if check_batch and n > 1 else None
    return Gradients(jac, used, reason, leaking)


def leaking_inputs(
    selected: Tensor, leaf: Tensor, cotangents: Tensor, jac: Tensor, generator: torch.Generator
) -> Tensor:
    """``(N,)`` bool: the inputs that other samples' outputs reach, by one more backward through the batch graph.

    Its cotangent is a random per-sample combination of the rows' own (``cotangents``, ``(P, N, M)``): through the
    batch it reaches input ``j`` as ``sum_i J_ij^T u_i``, from the per-sample rows ``jac`` (``(N, P, ...)``) as
    ``sum_p c_jp row_jp``; they differ exactly when some sample's outputs depend on another sample's input.
    """
    n, n_rows = leaf.shape[0], cotangents.shape[0]
    probe_weights = torch.randn((n, n_rows), generator=generator, dtype=torch.float64).to(selected)
    combined = torch.einsum("np,pnm->nm", probe_weights, cotangents.to(selected))
    through_batch = _batched_grad(selected, leaf, combined[None])[0].reshape(n, -1).double()
    per_sample = torch.einsum("np,npd->nd", probe_weights.double(), jac.reshape(n, n_rows, -1).double())
    return _beyond_leak_tolerance(through_batch - per_sample, (through_batch, per_sample), selected.dtype)


def leaking_against(rows: Tensor, reference_rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``(N,)`` bool: the samples whose rows differ from the reference's beyond the leak tolerance of ``dtype``.

    ``rows`` (``(N, q, D)``) had their cotangents scaled by a random factor ``w`` per sample, divided out again;
    ``reference_rows`` were not scaled. Through the batch, sample ``j``'s row is ``sum_i (w_i / w_j) J_ij^T c``,
    the reference's ``sum_i J_ij^T c``: they differ by more than the model dtype's rounding exactly when some other
    sample's outputs reach input ``j`` (or where ``dtype`` itself is far off, which the search for pairs then tells
    apart).
    """
    model = rows.reshape(rows.shape[0], -1).double()
    reference = reference_rows[:, : rows.shape[1]].reshape(rows.shape[0], -1).double()
    return _beyond_leak_tolerance(model - reference, (model, reference), dtype)


def _beyond_leak_tolerance(gap: Tensor, sides: tuple[Tensor, Tensor], dtype: torch.dtype) -> Tensor:
    """Where ``gap`` (``(N, D)``) exceeds :func:`leak_tolerance` of the larger side's norm over the batch."""
    distance = gap.norm(dim=1).nan_to_num(nan=math.inf)
    scale = torch.maximum(sides[0].norm(dim=1), sides[1].norm(dim=1)).nan_to_num(nan=0.0).max()
    return distance > leak_tolerance(dtype) * scale.clamp_min(torch.finfo(torch.float64).tiny)


def leak_tolerance(dtype: torch.dtype) -> float:
    """Relative size of a cross-sample gradient that counts as a leak: 1000 eps of the dtype, at most 1%."""
    return min(1e3 * torch.finfo(dtype).eps, 1e-2)


def _jacobians_func(
    function: BatchFunction, selection: Selector, x: Tensor, index: Tensor, chunk_size: int | None
) -> Tensor:
    def per_sample(sample: Tensor, sample_index: Tensor) -> Tensor:
        return selection(function(sample.unsqueeze(0)), sample_index.unsqueeze(0)).squeeze(0)

    return vmap(jacrev(per_sample), chunk_size=chunk_size)(x.detach(), index)


def jacobians_of(
    function: BatchFunction,
    selection: Selector,
    x: Tensor,
    index: Tensor,
    *,
    engine: str,
    chunk_size: int | None,
) -> Tensor:
    """Jacobians on a fresh graph, with the engine that already ran once (no check, no warning)."""
    if engine == ENGINE_FUNC:
        return _jacobians_func(function, selection, x, index, chunk_size)
    leaf = x.detach().requires_grad_(True)
    outputs = function(leaf.clone())
    return compute_gradients(
        function,
        selection,
        leaf,
        outputs,
        index,
        engine=ENGINE_AUTOGRAD,
        check_batch=False,
        generator=torch.Generator(),
    ).jacobians


def _batched_grad(outputs: Tensor, leaf: Tensor, cotangents: Tensor) -> Tensor:
    """``d<cotangent_p, outputs>/d leaf`` for each cotangent ``p``, one backward each through the shared graph.

    (A loop, not ``is_grads_batched``: on CPU, vmapped convolution backwards measured 2x slower than
    plain ones, and the loop runs every op, batching rule or not.)
    """
    if not outputs.requires_grad:
        return torch.zeros((cotangents.shape[0], *leaf.shape), dtype=leaf.dtype, device=leaf.device)
    rows = [
        torch.autograd.grad(outputs, leaf, cotangent, retain_graph=True, materialize_grads=True)[0]
        for cotangent in cotangents
    ]
    return torch.stack(rows)


def leaking_pairs(
    selected: Tensor,
    leaf: Tensor,
    *,
    generator: torch.Generator,
    tolerance: float,
    max_exact_sources: int = 16,
) -> list[tuple[int, int]]:
    """Find pairs ``(i, j)`` where sample ``i``'s outputs depend on sample ``j``'s input.

    ``2 * ceil(log2 N)`` backwards through the batch graph: for each bit ``b`` of the sample index,
    a random cotangent on the samples whose bit ``b`` is 0 (then 1). Any gradient reaching a sample
    outside that group is a leak, and every leaking pair differs in some bit, so every leak is seen.
    The candidate sources this leaves are confirmed exactly, one backward per source with a
    cotangent on that sample alone, when there are at most ``max_exact_sources``; past that (e.g.
    BatchNorm on batch statistics, where every sample reaches every other) the candidate pairs, a
    superset, are returned.

    Args:
        selected: Selected outputs ``(N, M)`` with their graph.
        leaf: The input batch they were computed from.
        generator: The probe's own generator.
        tolerance: Relative size of a cross-sample gradient that counts as a leak.
        max_exact_sources: Most candidate sources confirmed one by one.

    """
    n = leaf.shape[0]
    if n < 2:
        return []
    n_bits = max(1, math.ceil(math.log2(n)))
    ids = torch.arange(n, device=leaf.device)
    bits = (ids[None, :] >> torch.arange(n_bits, device=leaf.device)[:, None]) & 1  # (B, N)
    groups = torch.cat([bits == 0, bits == 1])  # (2B, N): row p selects the samples given a cotangent
    weights = torch.randn(selected.shape, generator=generator, dtype=torch.float64).to(selected)
    leak = _reached(selected, leaf, groups, weights, tolerance)
    if not leak.any():
        return []
    # Sample i can be a source for input j iff, for every bit where they differ, i's group reached j.
    side = bits.T  # (N, B): bit b of sample i
    leak_by_side = leak.reshape(2, n_bits, n).permute(1, 0, 2)  # (B, side, N)
    differs = side[:, None, :] != side[None, :, :]  # (i, j, B)
    reached = leak_by_side[torch.arange(n_bits, device=leaf.device)[None, :], side, :]  # (i, B, j)
    candidate = (~differs | reached.permute(0, 2, 1)).all(dim=2) & differs.any(dim=2)
    candidate &= leak.any(dim=0)[None, :]
    sources = candidate.any(dim=1).nonzero().flatten()
    if len(sources) <= max_exact_sources:
        single = torch.zeros((len(sources), n), dtype=torch.bool, device=leaf.device)
        single[torch.arange(len(sources)), sources] = True
        candidate = torch.zeros_like(candidate)
        candidate[sources] = _reached(selected, leaf, single, weights, tolerance)
    return [(int(i), int(j)) for i, j in candidate.nonzero().tolist()]


def _reached(selected: Tensor, leaf: Tensor, groups: Tensor, weights: Tensor, tolerance: float) -> Tensor:
    """For each group of samples given a random cotangent: which *other* samples' inputs get gradient."""
    n = leaf.shape[0]
    grads = _batched_grad(selected, leaf, groups[:, :, None].to(selected.dtype) * weights[None])
    norms = grads.reshape(grads.shape[0], n, -1).double().norm(dim=2).nan_to_num(nan=math.inf)
    scale = (norms * groups).amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return (norms > tolerance * scale) & ~groups


def _claimed_direction(row: Tensor, fallback: Tensor, free: Tensor | None) -> Tensor:
    """The direction of the cross-sample gradient autograd claims, unit RMS over the free coordinates.

    Along it the claim is as large as it gets, so a forward that does not depend on the source sample cannot
    agree with it by chance (a random direction nearly orthogonal to the claim makes both look like zero).
    ``fallback`` (a random direction) serves when the claim has no finite direction.
    """
    direction = row.detach().double().reshape(-1)
    if not bool(direction.isfinite().all()) or not bool(direction.any()):
        direction = fallback.to(direction).reshape(-1)
    if free is not None:
        direction = direction * free.to(direction)
    return direction / direction.pow(2).mean().sqrt()


def _cross_sample_kind(result: Any, stencil: Stencil) -> str:
    """What finite differences across samples say of a claimed cross-sample gradient.

    ``"forward"``: the finite difference itself resolves a dependence (beyond its own error bound and the
    tolerance) and autograd agrees with it; ``"wrong forward"``: it resolves one and autograd reliably disagrees
    with it (the forward mixes samples, whatever the backward's cross terms); ``"backward"``: it
    resolves none and autograd reliably claims one (a backward that mixes samples the forward keeps apart);
    ``"negligible"``: the finite difference sees no dependence and the claim is within tolerance of none;
    ``"unverified"``: a kink inside the stencil.
    """
    if not bool(result.reliable):
        return "unverified"
    seen = float((stencil.f_plus - stencil.f_minus).abs().max())
    noise = float(result.fd_error * result.scale) * 2 + float(result.scale) * _RESOLVED_DEPENDENCE
    if not bool(result.passed):
        return "wrong forward" if seen > noise else "backward"
    return "forward" if seen > noise else "negligible"


@dataclass(frozen=True)
class CrossSampleCheck:
    """Cross-sample gradients that autograd claims, sorted by what finite differences say of them.

    Attributes:
        forward: ``(i, j)`` pairs where the *forward* really mixes samples (output ``i`` moves with input ``j``).
        backward_only: Pairs the backward claims but the forward does not have: a wrong backward.
        wrong_across: Those of ``forward`` where autograd's cross-sample gradient disagrees with the finite
            difference that shows the dependence (said in a note where every source disagrees; not judged: per-sample
            gradients are ill-defined, and a stencil across a kink can disagree by itself).
        unclaimed: Those of ``forward`` found by the forward alone, where autograd claims no cross-sample gradient
            at all (:func:`unclaimed_leaks`).
        unverified: Pairs whose finite differences were unreliable (kink) and not inherited.
        sources_checked: How many source samples were checked by finite differences.
        relative_error: Per source checked, the relative error of the claimed cross term.
        margin: Per source checked, that error over the error allowed.

    """

    forward: tuple[tuple[int, int], ...]
    backward_only: tuple[tuple[int, int], ...]
    unverified: tuple[tuple[int, int], ...]
    sources_checked: int
    relative_error: dict[int, float]
    margin: dict[int, float]
    wrong_across: tuple[tuple[int, int], ...] = ()
    unclaimed: tuple[tuple[int, int], ...] = ()


def check_cross_sample(
    pairs: list[tuple[int, int]],
    selected: Tensor,
    leaf: Tensor,
    reference: BatchFunction,
    selection: Selector,
    index: Tensor,
    x: Tensor,
    *,
    generator: torch.Generator,
    rtol: float,
    max_sources: int = 16,
    free: Tensor | None = None,
) -> CrossSampleCheck:
    """Check autograd's cross-sample gradients against finite differences across samples.

    For each source sample ``j`` (at most ``max_sources``): random cotangents ``u_i`` on the samples it
    reaches, and for its input the direction ``v`` of the cross-sample gradient autograd claims (where the
    claim is largest); autograd's ``sum_i u_i^T J_ij v`` (one backward through the batch graph) is compared
    with ``sum_i u_i^T (f_i(X + h v e_j) - f_i(X - h v e_j))``, two forwards of the whole batch in the reference
    dtype, with the same error bound as every other check. A forward leak needs the finite difference itself to
    show the dependence; agreeing with a finite difference of zero is no leak. Pairs of unchecked sources take
    the classification their checked sources agree on.

    Args:
        pairs: ``(i, j)`` pairs where autograd says output ``i`` depends on input ``j``.
        selected: The selected outputs ``(N, M)`` with their graph (model dtype).
        leaf: The input batch they were computed from.
        reference: The model as a function of a batch, in the reference dtype.
        selection: Which outputs to compare.
        index: Per-sample output indices.
        x: The input batch in the reference dtype.
        generator: The probe's own generator.
        rtol: Tolerance granted to the model-dtype backward.
        max_sources: Most source samples checked.
        free: ``(D,)`` the differentiated coordinates of packed inputs (``None``: all).

    """
    sources = sorted({j for _, j in pairs})
    if len(sources) > max_sources:
        pick = torch.randperm(len(sources), generator=generator)[:max_sources].sort().values.tolist()
        sources = [sources[p] for p in pick]
    with torch.no_grad():
        f0 = selection(reference(x), index).double()
    n, width = f0.shape
    kinds: dict[int, str] = {}
    errors: dict[int, float] = {}
    margins: dict[int, float] = {}
    for j in sources:
        receivers = torch.tensor([i for i, s in pairs if s == j], device=x.device)
        weights = torch.zeros((n, width), dtype=torch.float64, device=x.device)
        weights[receivers] = torch.randn((len(receivers), width), generator=generator, dtype=torch.float64).to(x.device)
        claimed = torch.autograd.grad(selected, leaf, weights.to(selected), retain_graph=True, materialize_grads=True)
        row = claimed[0][j].reshape(1, 1, -1)
        direction = _claimed_direction(row, torch.randn(x.shape[1:], generator=generator, dtype=torch.float64), free)
        direction = direction.reshape(x.shape[1:]).to(x)
        step = default_step(x[j : j + 1], x.dtype, free=free).to(x)
        plus, minus = x.clone(), x.clone()
        plus[j] = x[j] + step * direction
        minus[j] = x[j] - step * direction
        with torch.no_grad():
            f_plus = (selection(reference(plus), index).double() * weights).sum()
            f_minus = (selection(reference(minus), index).double() * weights).sum()
        stencil = Stencil(
            (f0 * weights).sum().reshape(1, 1),
            f_plus.reshape(1, 1, 1),
            f_minus.reshape(1, 1, 1),
            (plus[j] - x[j]).double().reshape(1, 1, -1),
            (x[j] - minus[j]).double().reshape(1, 1, -1),
            torch.finfo(x.dtype).eps,
        )
        result = compare(row, stencil, rtol)
        errors[j], margins[j] = float(result.relative_error), float(result.margin)
        kinds[j] = _cross_sample_kind(result, stencil)
    agreed = set(kinds.values()) - {"negligible"}
    inherited = next(iter(agreed)) if len(agreed) == 1 else "unverified" if agreed else "negligible"
    sorted_pairs: dict[str, list[tuple[int, int]]] = {
        kind: [] for kind in ("forward", "wrong forward", "backward", "unverified", "negligible")
    }
    for pair in pairs:
        sorted_pairs[kinds.get(pair[1], inherited)].append(pair)
    return CrossSampleCheck(
        tuple(sorted_pairs["forward"] + sorted_pairs["wrong forward"]),
        tuple(sorted_pairs["backward"]),
        tuple(sorted_pairs["unverified"]),
        len(sources),
        errors,
        margins,
        wrong_across=tuple(sorted_pairs["wrong forward"]),
    )


def unclaimed_leaks(
    reference: BatchFunction,
    selection: Selector,
    x: Tensor,
    index: Tensor,
    *,
    generator: torch.Generator,
    free: Tensor | None = None,
    tolerance: float | None = None,
) -> tuple[tuple[int, int], ...]:
    """``(i, j)`` pairs where output ``i`` moves with input ``j``, seen by the forward alone.

    For a model whose backward claims no cross-sample gradient: a batch of three of the samples, drawn at random,
    runs twice through ``reference`` (no grad), as it is and with one of them moved along a random direction by
    ``1e-2`` of the inputs' RMS (or 100 ``tolerance``). A batch-independent model computes the other bit for bit
    alike (the same kernels on the same shapes); where their outputs move beyond ``tolerance`` of the outputs' scale
    (the model dtype's :func:`leak_tolerance`, as for the leaks autograd claims: a dependence below the model's own
    precision, as an adaptive ODE solver's step size chosen over the batch gives, is none), it depends on the moved
    sample, unless a third run of the unmoved batch moves them too: then the forward is not a function of its
    inputs (random numbers drawn in eval mode, state kept between calls), and :class:`NondeterministicForward` is
    raised. Three samples show any mixing through batch statistics (a mean, a variance, a sum); a dependence on an
    extreme of the batch shows when the moved sample holds it.

    Example:
        >>> centred = lambda batch: batch - batch.mean(0)  # mixes samples; a backward may still claim it does not
        >>> x, index = torch.randn(6, 3, dtype=torch.float64), torch.zeros(6, dtype=torch.long)
        >>> len(unclaimed_leaks(centred, lambda out, _: out, x, index, generator=torch.Generator().manual_seed(0)))
        2
        >>> unclaimed_leaks(torch.tanh, lambda out, _: out, x, index, generator=torch.Generator().manual_seed(0))
        ()

    """
    n = x.shape[0]
    if n < 2:
        return ()
    batch = torch.randperm(n, generator=generator)[:_UNCLAIMED_BATCH].sort().values
    m = len(batch)
    moved = torch.zeros(m, dtype=torch.bool)
    moved[int(torch.randint(m, (), generator=generator))] = True
    direction = torch.randn((int(moved.sum()), *x.shape[1:]), generator=generator, dtype=torch.float64)
    if free is not None:
        direction = direction * free.cpu().to(direction).reshape(x.shape[1:])
    direction = direction / direction.pow(2).mean().sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    batch, moved = batch.to(x.device), moved.to(x.device)
    xs = x[batch].detach()
    inputs = xs[moved].double().reshape(int(moved.sum()), -1)
    if free is not None:  # (the RMS of the differentiated coordinates, not of packed token ids)
        inputs = inputs[:, free.to(device=x.device, dtype=torch.bool)]
    tolerance = leak_tolerance(x.dtype) if tolerance is None else tolerance
    move = max(_UNCLAIMED_MOVE, 100 * tolerance)
    size = move * max(1.0, float(inputs.pow(2).mean().sqrt().nan_to_num(1.0)))
    shifted = xs.clone()
    shifted[moved] += (size * direction).to(device=x.device, dtype=x.dtype)
    watched = ~moved

    def outputs(batch_inputs: Tensor) -> Tensor:
        with torch.no_grad():
            return selection(reference(batch_inputs), index[batch]).double().reshape(m, -1)[watched]

    before = outputs(xs)
    bound = tolerance * before.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    moves = (outputs(shifted) - before).abs().amax(dim=1) > bound
    if not bool(moves.any()):
        return ()
    if bool(((outputs(xs) - before).abs().amax(dim=1) > bound).any()):  # the same batch again: not the same
        raise NondeterministicForward(
            "the forward is not deterministic (the same batch twice gave different outputs: random numbers drawn in "
            "eval mode, or state kept between calls), so whether samples mix cannot be told from it"
        )
    receivers, sources = batch[watched][moves].tolist(), batch[moved].tolist()
    return tuple((i, j) for i in receivers for j in sources)


class NondeterministicForward(RuntimeError):
    """The same batch through the forward twice gave different outputs (see :func:`unclaimed_leaks`)."""
