"""Stages 5 and 6 of a probe: whether samples are independent, and whether each checked sample's backward is right.

Stage 5 checks the cross-sample gradients autograd claims against finite differences across samples: a
dependence only the backward has is a wrong backward (both samples fail); one the forward really has makes
per-sample gradients ill-defined (every checked sample is inconclusive). Stage 6 judges the remaining checked
samples along random directions (:func:`~._verdicts.judge_samples`) and combines the directions into verdicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ._forward import ForwardPass
from ._jacobian import (
    CrossSampleCheck,
    check_cross_sample,
    leak_tolerance,
    leaking_against,
    leaking_inputs,
    leaking_pairs,
    unclaimed_leaks,
)
from ._notes import Notes, describe_error
from ._verdicts import (
    FAIL,
    INCONCLUSIVE,
    Judgement,
    Problem,
    ReferenceRows,
    judge_samples,
    sample_verdicts,
    unit_rms,
)
from .report import Verdict

__all__ = [
    "FirstOrder",
    "check_batch_independence",
    "choose_samples",
    "compare_forward_mode",
    "judge_first_order",
    "reference_rows",
]

NO_CROSS_SAMPLE_GRADIENTS = CrossSampleCheck((), (), (), 0, {}, {})
# Forward mode and reverse mode compute the same derivative with different round-off: a gap beyond this many
# times the backward's tolerance is a disagreement, not rounding.
_FORWARD_MODE_TOLERANCE = 10.0


@dataclass(frozen=True)
class FirstOrder:
    """The first-order judgement of a batch.

    Attributes:
        checked: Indices of the samples spot-checked against finite differences.
        judged: Those of them judged one by one (not settled by the cross-sample check).
        evidence: Per-direction codes and figures of every sample (NaN where unchecked).
        verdicts: One verdict per sample (``unchecked`` outside ``checked``).

    """

    checked: Tensor
    judged: Tensor
    evidence: Judgement
    verdicts: tuple[Verdict, ...]

    @property
    def failed(self) -> list[int]:
        """Indices of the samples judged ``fail``."""
        return [i for i, v in enumerate(self.verdicts) if v is Verdict.FAIL]


def reference_rows(forward: ForwardPass, problem: Problem, x: Tensor) -> ReferenceRows | None:
    """The reference's rows of every sample, computed before the checks that read them.

    When the forward pass left batch independence to a comparison with them; ``None`` otherwise (the first check
    computes its own).
    """
    if forward.sample_factors is None or not problem.separate_reference:
        return None
    return ReferenceRows.compute(problem, x, forward.index)


def check_batch_independence(
    forward: ForwardPass,
    problem: Problem,
    x: Tensor,
    generator: torch.Generator,
    reference: ReferenceRows | None = None,
    *,
    notes: Notes | None = None,
    forward_only: bool = False,
) -> CrossSampleCheck:
    """Cross-sample gradients autograd claims, checked against finite differences across samples.

    Where the forward pass scaled its rows per sample, the inputs other samples reach are read from a comparison
    with the ``reference`` rows; without them (no reference, or its backward failed), from a backward of their own.
    With ``forward_only``, where autograd claims no cross-sample gradient, the forward alone is tested for a
    dependence across samples too (:func:`~._jacobian.unclaimed_leaks`): a backward blind to one the forward has is
    not a pass.
    """
    claimed = _claimed_cross_sample(forward, problem, x, generator, reference)
    if not forward_only or claimed.forward or claimed.backward_only or claimed.unverified:
        return claimed
    try:
        unclaimed = unclaimed_leaks(
            problem.reference,
            problem.selection,
            x.to(problem.reference_dtype),
            forward.index,
            generator=generator,
            free=problem.free,
            tolerance=leak_tolerance(forward.outputs.dtype),
        )
    except Exception as error:  # a model that cannot run on part of its batch: autograd's claims alone, said
        if notes is not None:
            notes.add(
                f"batch independence checked through autograd's cross-sample gradients only: {describe_error(error)}"
            )
        return claimed
    if not unclaimed:
        return claimed
    return replace(claimed, forward=claimed.forward + unclaimed, unclaimed=unclaimed)


def _claimed_cross_sample(
    forward: ForwardPass, problem: Problem, x: Tensor, generator: torch.Generator, reference: ReferenceRows | None
) -> CrossSampleCheck:
    """The cross-sample gradients autograd claims, each checked against finite differences across samples."""
    leaking = forward.gradients.leaking_inputs
    if forward.sample_factors is not None:
        leaking = _leaking_inputs(forward, reference, generator)
    if leaking is None or not bool(leaking.any()):
        return NO_CROSS_SAMPLE_GRADIENTS
    selected = forward.selection(forward.outputs, forward.index)
    pairs = leaking_pairs(selected, forward.leaf, generator=generator, tolerance=leak_tolerance(forward.outputs.dtype))
    if not pairs:
        return NO_CROSS_SAMPLE_GRADIENTS
    return check_cross_sample(
        pairs,
        selected,
        forward.leaf,
        problem.reference,
        problem.selection,
        forward.index,
        x.to(problem.reference_dtype),
        generator=generator,
        rtol=problem.rtol,
        free=problem.free,
    )


def _leaking_inputs(forward: ForwardPass, reference: ReferenceRows | None, generator: torch.Generator) -> Tensor:
    """``(N,)`` the inputs other samples' outputs reach, for a forward pass whose rows were scaled per sample.

    Rows that match the reference's show no leak. A gap (a leak, or the model dtype's own rounding, as on deeply
    saturated units) or no reference rows: the batch graph tells, by a backward of its own.
    """
    rows = forward.checked_rows
    theirs = reference.rows if reference is not None else None
    coarser = max(rows.dtype, forward.outputs.dtype, key=lambda dtype: torch.finfo(dtype).eps)
    if theirs is not None and not bool(leaking_against(rows, theirs, coarser).any()):
        return torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
    assert forward.cotangents is not None
    selected = forward.selection(forward.outputs, forward.index)
    return leaking_inputs(selected, forward.leaf, forward.cotangents, forward.jacobians, generator)


def choose_samples(check_samples: int | Sequence[int] | None, n: int, generator: torch.Generator) -> Tensor:
    """The samples to spot-check: all, ``check_samples`` drawn at random, or the given indices."""
    if check_samples is None:
        return torch.arange(n)
    if isinstance(check_samples, int):
        return torch.randperm(n, generator=generator)[: min(check_samples, n)].sort().values
    chosen = torch.as_tensor(list(check_samples), dtype=torch.long)
    if chosen.numel() and (chosen.min() < 0 or chosen.max() >= n):
        raise ValueError(f"probe: `check_samples` indices must be in [0, {n - 1}], got {chosen.tolist()}.")
    return chosen.unique()


def judge_first_order(
    problem: Problem,
    forward: ForwardPass,
    x: Tensor,
    cross: CrossSampleCheck,
    checked: Tensor,
    n_directions: int,
    generator: torch.Generator,
    notes: Notes,
    reference: ReferenceRows | None = None,
) -> FirstOrder:
    """Settle the samples the cross-sample check implicates, judge the others one by one.

    ``reference``: the reference's rows of every sample, when already computed.
    """
    n = x.shape[0]
    evidence = Judgement.empty(n, n_directions)
    implicated = _settle_cross_sample(cross, checked, evidence, notes)
    judged = torch.tensor([i for i in checked.tolist() if i not in implicated], dtype=torch.long)
    if len(judged):
        rows = judged.to(x.device)
        judgement = judge_samples(
            problem,
            forward.checked_rows[rows],
            x[rows],
            forward.index[rows],
            generator=generator,
            n_directions=n_directions,
            reference=reference.take(rows) if reference is not None else None,
        )
        evidence.fill(judged, judgement)
        notes.extend(judgement.notes)
    verdicts = [Verdict.UNCHECKED] * n
    for i, verdict in zip(checked.tolist(), sample_verdicts(evidence.codes[checked]), strict=True):
        verdicts[i] = verdict
    return FirstOrder(checked, judged, evidence, tuple(verdicts))


def _settle_cross_sample(cross: CrossSampleCheck, checked: Tensor, evidence: Judgement, notes: Notes) -> set[int]:
    """Codes for samples the per-sample check cannot judge, which it then leaves out."""
    chosen = set(checked.tolist())
    if cross.forward or cross.unverified:
        evidence.codes[checked] = INCONCLUSIVE
        shown = "moving one of three samples run as a batch" if cross.unclaimed else "finite differences across samples"
        notes.add(
            f"samples leak into each other through the forward (shown by {shown}), so per-sample gradients are "
            "ill-defined: not checked"
        )
        if cross.unclaimed:
            notes.add(
                f"outputs move with other samples' inputs (pairs {list(cross.unclaimed[:6])}: of three samples run "
                "as a batch, moving one moved another's outputs beyond the model dtype's precision), yet autograd "
                "claims no cross-sample gradient at all: the backward treats something computed across the batch "
                "as a constant (batch statistics in a hand-written backward, a deliberate stop-gradient, or a choice "
                "made over the whole batch, such as an adaptive solver's step size)"
            )
        disagreeing = {j for _, j in cross.wrong_across}
        if disagreeing and len(disagreeing) == cross.sources_checked:
            notes.add(
                f"autograd's cross-sample gradients disagree with those finite differences for every source "
                f"sample checked ({cross.sources_checked}; pairs {list(cross.wrong_across[:6])}): the backward may be "
                "wrong across samples too (not judged: the forward mixes them)"
            )
        return chosen
    wrong = {i for pair in cross.backward_only for i in pair} & chosen
    for i in wrong:
        evidence.codes[i] = FAIL
        evidence.relative_error[i] = max(cross.relative_error.values(), default=float("nan"))
        evidence.margin[i] = max(cross.margin.values(), default=float("nan"))
    if cross.backward_only:
        notes.add(
            f"the backward mixes samples that the forward keeps apart: {len(cross.backward_only)} (output, input) "
            f"pairs {list(cross.backward_only[:6])} have autograd gradients that finite differences across samples "
            f"do not show ({cross.sources_checked} source samples checked): a wrong backward"
        )
    return wrong


def compare_forward_mode(
    problem: Problem,
    forward: ForwardPass,
    x: Tensor,
    checked: Tensor,
    *,
    generator: torch.Generator,
    notes: Notes,
) -> tuple[int, ...] | None:
    """Samples whose jvp disagrees with the reverse-mode rows (``None``: not checked).

    Compared along the output projections the forward pass computed rows for (the first, where a float64
    reference judges the formula). The tangent is half the first reverse-mode row's direction, half a random
    one: along a random direction alone the rows' product can be near zero by chance, and a wrong jvp with it
    (a row that is zero, or has no free coordinate, leaves the random half alone).
    """
    sub = checked.to(x.device)
    xc, ic = x[sub], forward.index[sub]
    rows = forward.checked_rows
    rows_c = rows[sub].reshape(len(sub), rows.shape[1], -1).double()
    claimed = rows_c[:, 0].reshape(len(sub), -1).nan_to_num(0.0, 0.0, 0.0)
    claimed = claimed / claimed.abs().amax(1, keepdim=True)  # (first to 1: tiny rows' squares underflow)
    claimed = unit_rms(claimed.reshape(xc.shape), 1, problem.free)
    random = unit_rms(torch.randn(xc.shape, generator=generator).double(), 1, problem.free)
    usable = claimed.reshape(len(sub), -1).isfinite().all(1).reshape(-1, *[1] * (xc.ndim - 1))
    tangent = unit_rms(torch.where(usable, claimed, 0.0) + random.to(claimed), 1, problem.free).to(xc)
    try:
        forward_mode = torch.func.jvp(lambda t: problem.selection(problem.function(t), ic), (xc,), (tangent,))[1]
        forward_mode = forward_mode.double()
    except Exception as error:  # custom Functions without a jvp rule, ops without forward AD
        notes.add(f"forward mode not checked: {describe_error(error)}")
        return None
    if forward.projection is not None:
        forward_mode = forward_mode @ forward.projection[:, : rows.shape[1]].to(forward_mode)
    flat_tangent = tangent.reshape(len(sub), -1).double()
    reverse = torch.einsum("nmd,nd->nm", rows_c, flat_tangent)
    typical = rows_c.norm(dim=(1, 2)) * flat_tangent.norm(dim=1) / rows_c.shape[-1] ** 0.5
    scale = torch.maximum(reverse.norm(dim=1), typical).clamp_min(torch.finfo(torch.float64).tiny)
    gap = (forward_mode - reverse).norm(dim=1) / scale
    bad = (gap > _FORWARD_MODE_TOLERANCE * problem.rtol) | ~forward_mode.isfinite().all(1)
    return tuple(int(checked[i]) for i in bad.nonzero().flatten().tolist())
