"""Stage 8 of a probe: name the submodules to blame, when asked (``localize``, ``check_parameters``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ._first_order import FirstOrder
from ._notes import describe_error
from ._options import ProbeOptions
from ._prepare import Forward, PreparedBatch
from ._sharding import is_sharded
from .localize import Check, localize
from .report import Culprit, CulpritKind, ParameterCheck, SecondOrderReport, Verdict

__all__ = ["Culprits", "find_culprits"]


@dataclass(frozen=True)
class Culprits:
    """The submodules localization named.

    Attributes:
        first_order: Culprits of the first-order check (input and, with ``check_parameters``, parameter gradients).
        second_order: Culprits of the second-order check.
        note: What localization checked, skipped or cut short (``None``: it did not run).

    """

    first_order: tuple[Culprit, ...] = ()
    second_order: tuple[Culprit, ...] = ()
    note: str | None = None


def find_culprits(
    model: Any,
    batch: PreparedBatch,
    first: FirstOrder,
    second: SecondOrderReport | None,
    parameters: ParameterCheck | None,
    options: ProbeOptions,
    *,
    check: Check,
) -> Culprits:
    """Localize with ``check`` on each submodule, on one sample.

    Input gradients on the first failing sample (with ``localize``); each submodule's own parameters where the
    whole-model parameter check failed; the double backward (with ``localize``).
    """
    failing = first.failed
    wanted = {CulpritKind.INPUT} if options.localize and failing else set()
    if parameters is not None and parameters.verdict is Verdict.FAIL:
        wanted.add(CulpritKind.PARAMETER)
    first_order: tuple[Culprit, ...] = ()
    second_order: tuple[Culprit, ...] = ()
    note = None
    if wanted:
        first_order, note = _localize(
            model, batch, (failing or first.checked.tolist())[0], options, check, wanted, second_order=False
        )
    if second is not None and options.localize and not second.ok:
        sample = (second.failed or first.checked.tolist())[0]
        second_order, second_note = _localize(
            model, batch, sample, options, check, {CulpritKind.SECOND_ORDER}, second_order=True
        )
        note = f"{note}; second order: {second_note}" if note else f"second order: {second_note}"
    return Culprits(first_order, second_order, note)


def _localize(
    model: Any,
    batch: PreparedBatch,
    sample: int,
    options: ProbeOptions,
    check: Check,
    wanted: set[CulpritKind],
    *,
    second_order: bool,
) -> tuple[tuple[Culprit, ...], str]:
    if not isinstance(model, nn.Module):
        return (), "not localized: the model is a plain callable, not an nn.Module"
    x: Tensor = batch.x
    forward: Forward | None = batch.forward
    try:
        result = localize(
            model,
            x[sample : sample + 1],
            check=check,
            forward=forward,
            n_directions=options.n_directions,
            seed=options.seed,
            max_modules=options.localize_budget[0],
            # A sharded model is localized in lockstep by every process: a clock would decide differently on each.
            time_budget=float("inf") if is_sharded(model) else options.localize_budget[1],
            parameters=CulpritKind.PARAMETER in wanted,
            second_order=second_order,
        )
    except Exception as error:  # localization is a help, never a reason to lose the verdicts
        return (), f"localization failed on sample {sample}: {describe_error(error)}"
    culprits = tuple(c for c in result.culprits if c.kind in wanted)
    note = f"sample {sample}: {len(result.checked)} submodules checked on their own"
    if result.skipped:
        note += f", {len(result.skipped)} skipped ({next(iter(result.skipped.values()))}, ...)"
    if result.cut_short:
        note += f"; cut short: {result.cut_short}"
    return culprits, note
