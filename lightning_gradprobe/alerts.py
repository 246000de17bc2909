"""Alert conditions as plain data and pure functions: no Lightning, no I/O.

A probe's figures (:class:`ProbeFigures`, summable across processes) are judged against
:class:`AlertThresholds`, giving a list of :class:`Alert` records. What to do about them (warn,
stop, raise, call back) is the callback's business.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import torch

from .core.report import Culprit, CulpritKind, ProbeReport, Verdict

__all__ = ["Alert", "AlertCondition", "AlertThresholds", "ProbeFigures", "evaluate_alerts", "figures_from_report"]


class AlertCondition(str, Enum):
    """What an alert is about."""

    FAILED_CHECKS = "failed_checks"
    """Too many probed samples judged ``"fail"``: a backward disagrees with finite differences."""
    NONFINITE_GRADIENTS = "nonfinite_gradients"
    """Some input gradient holds NaN or Inf."""
    BATCH_LEAKAGE = "batch_leakage"
    """Some sample's outputs depend on another sample's input."""
    VANISHING_SALIENCY = "vanishing_saliency"
    """Too many probed samples have an input gradient that is exactly zero everywhere."""
    PARAMETER_GRADIENTS = "parameter_gradients"
    """The gradient with respect to the parameters disagrees with finite differences (the culprit is named)."""
    SECOND_ORDER_CHECKS = "second_order_checks"
    """Too many probed samples' double backward through the input is wrong or missing (``second_order=True``)."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class AlertThresholds:
    """When to alert. ``None`` switches a condition off.

    Args:
        fail_fraction: Alert when the fraction of checked samples judged ``"fail"`` exceeds this
            (``0.0``: any failure alerts).
        check_finite: Alert on any NaN/Inf input gradient.
        check_leakage: Alert when samples leak into each other through the batch.
        vanishing_fraction: Alert when the fraction of probed samples whose input gradient is
            exactly zero exceeds this.

    Example:
        >>> AlertThresholds(fail_fraction=0.25).fail_fraction
        0.25
        >>> AlertThresholds(fail_fraction=1.5)
        Traceback (most recent call last):
        ...
        ValueError: GradProbe: `fail_threshold` must be None or in [0, 1), got 1.5: it is a fraction of probed samples.

    """

    fail_fraction: float | None = 0.0
    check_finite: bool = True
    check_leakage: bool = True
    vanishing_fraction: float | None = 0.5

    def __post_init__(self) -> None:
        for name, value in (("fail_threshold", self.fail_fraction), ("vanishing_threshold", self.vanishing_fraction)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(
                    f"GradProbe: `{name}` must be None or in [0, 1), got {value!r}: it is a fraction of probed samples."
                )


_MAXIMA = ("worst_relative_error", "worst_margin", "worst_second_order_margin", "worst_parameter_margin")
_COUNTS = (
    "probed",
    "checked",
    "failed",
    "inconclusive",
    "nonfinite",
    "leaking_pairs",
    "mixing_pairs",
    "blind_pairs",
    "vanishing",
    "wrong_parameters",
    "second_order_checked",
    "second_order_failed",
)


@dataclass(frozen=True)
class ProbeFigures:
    """Counts from one probe, or from several processes' probes added together.

    ``failed_samples`` and ``culprits`` are this process's own (indices into its probe set, and the
    submodules localization named).
    """

    probed: int = 0
    checked: int = 0
    failed: int = 0
    inconclusive: int = 0
    nonfinite: int = 0
    leaking_pairs: int = 0
    mixing_pairs: int = 0
    blind_pairs: int = 0
    vanishing: int = 0
    wrong_parameters: int = 0
    second_order_checked: int = 0
    second_order_failed: int = 0
    worst_relative_error: float = float("nan")
    worst_margin: float = float("nan")
    worst_second_order_margin: float = float("nan")
    worst_parameter_margin: float = float("nan")
    second_order_finding: str | None = None
    failed_samples: tuple[int, ...] = field(default=())
    culprits: tuple[Culprit, ...] = field(default=())

    def to_tensor(self) -> torch.Tensor:
        """Pack the additive counts (and the worst error and margin) for a collective across processes."""
        worst = [-1.0 if math.isnan(getattr(self, name)) else getattr(self, name) for name in _MAXIMA]
        return torch.tensor([*(getattr(self, name) for name in _COUNTS), *worst], dtype=torch.float64)

    @staticmethod
    def from_gathered(
        rows: torch.Tensor, failed_samples: tuple[int, ...] = (), culprits: tuple[Culprit, ...] = ()
    ) -> ProbeFigures:
        """Combine ``(world_size, n)`` rows from :meth:`to_tensor`: counts add, the worst figures are maxima."""
        rows = rows.reshape(-1, len(_COUNTS) + len(_MAXIMA)).double().cpu()
        total: dict[str, Any] = dict(zip(_COUNTS, rows[:, : len(_COUNTS)].sum(0).round().long().tolist(), strict=True))
        for i, name in enumerate(_MAXIMA):
            worst = float(rows[:, len(_COUNTS) + i].max())
            total[name] = float("nan") if worst < 0 else worst
        return ProbeFigures(**total, failed_samples=failed_samples, culprits=culprits)


def figures_from_report(report: ProbeReport) -> ProbeFigures:
    """Count what a report found.

    Example:
        >>> import torch
        >>> from lightning_gradprobe import probe
        >>> figures = figures_from_report(probe(torch.nn.Linear(3, 2), torch.randn(4, 3)))
        >>> figures.probed, figures.checked, figures.failed
        (4, 4, 0)

    """
    errors = report.relative_error[report.checked].flatten()
    errors = errors[errors.isfinite()]
    margins = report.margin[report.checked].flatten()
    margins = margins[~margins.isnan()]
    second = report.second_order
    second_margins = second.margin[~second.margin.isnan()] if second is not None else torch.zeros(0)
    culprits = [*report.culprits, *(second.culprits if second is not None else ())]
    parameters = report.parameter_check
    return ProbeFigures(
        probed=len(report.verdicts),
        checked=len(report.checked),
        failed=len(report.failed),
        inconclusive=sum(v is Verdict.INCONCLUSIVE for v in report.verdicts),
        nonfinite=int((report.nonfinite_count > 0).sum()),
        leaking_pairs=len(report.leaking_pairs),
        mixing_pairs=len(report.mixing_pairs),
        blind_pairs=len(report.blind_pairs),
        vanishing=int((report.zero_fraction == 1).sum()),
        wrong_parameters=max(
            sum(1 for c in report.culprits if c.kind is CulpritKind.PARAMETER),
            # A wrong input-side backward sends wrong gradients to the weights before it: that failure is the
            # failed_checks alert's; the parameter alert is for weight gradients wrong on their own.
            int(parameters is not None and parameters.verdict is Verdict.FAIL and not report.failed),
        ),
        worst_parameter_margin=parameters.margin if parameters is not None else float("nan"),
        worst_relative_error=float(errors.max()) if errors.numel() else float("nan"),
        worst_margin=float(margins.max()) if margins.numel() else float("nan"),
        second_order_checked=sum(v is not Verdict.UNCHECKED for v in second.verdicts) if second is not None else 0,
        second_order_failed=len(second.failed) if second is not None else 0,
        worst_second_order_margin=float(second_margins.max()) if second_margins.numel() else float("nan"),
        second_order_finding=second.finding if second is not None else None,
        failed_samples=tuple(report.failed),
        culprits=tuple(c for c in culprits if not c.explained_by),
    )


@dataclass(frozen=True)
class Alert:
    """One condition that fired, with its evidence.

    Attributes:
        condition: What fired.
        value: The measured value (a fraction or a count).
        threshold: The threshold it crossed.
        step: The trainer's global step (``-1`` outside training).
        samples: Probed-sample indices involved, where known.
        message: One readable sentence.
        culprits: The submodules localization named, most specific first (:class:`~lightning_gradprobe.Culprit`).

    """

    condition: AlertCondition
    value: float
    threshold: float
    step: int
    samples: tuple[int, ...] = ()
    message: str = ""
    culprits: tuple[Culprit, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (checkpoints, loggers)."""
        out = asdict(self)
        out["condition"] = self.condition.value
        out["samples"] = list(self.samples)
        out["culprits"] = [culprit.to_dict() for culprit in self.culprits]
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Alert:
        """Inverse of :meth:`to_dict`."""
        return Alert(
            AlertCondition(data["condition"]),
            float(data["value"]),
            float(data["threshold"]),
            int(data["step"]),
            tuple(data.get("samples", ())),
            data.get("message", ""),
            tuple(Culprit.from_dict(c) for c in data.get("culprits", ()) if isinstance(c, dict)),  # (0.1: text)
        )


def evaluate_alerts(figures: ProbeFigures, thresholds: AlertThresholds, step: int) -> list[Alert]:
    """Judge a probe's figures against the thresholds.

    Example:
        >>> figures = ProbeFigures(probed=8, checked=8, failed=2, failed_samples=(1, 5), worst_margin=9.0)
        >>> [str(a.condition) for a in evaluate_alerts(figures, AlertThresholds(), step=100)]
        ['failed_checks']
        >>> evaluate_alerts(figures, AlertThresholds(fail_fraction=0.5), step=100)
        []

    """
    alerts = []
    if thresholds.fail_fraction is not None and figures.checked:
        fraction = figures.failed / figures.checked
        if fraction > thresholds.fail_fraction:
            inputs = _of_kind(figures.culprits, CulpritKind.INPUT)
            where = f"; culprit: {_labels(inputs)}" if inputs else ""
            mixing = (
                f"; it mixes samples the forward keeps apart ({figures.mixing_pairs} (output, input) pairs: a "
                "reduction over the batch axis in a hand-written backward?)"
                if figures.mixing_pairs
                else ""
            )
            message = (
                f"{figures.failed} of {figures.checked} probed samples fail the gradient check: the backward "
                f"disagrees with finite differences (worst margin {figures.worst_margin:.3g}: error / allowed "
                f"error){mixing}{where}"
            )
            condition = AlertCondition.FAILED_CHECKS
            alerts.append(
                Alert(condition, fraction, thresholds.fail_fraction, step, figures.failed_samples, message, inputs)
            )
    if thresholds.check_finite and figures.nonfinite:
        message = f"{figures.nonfinite} of {figures.probed} probed samples have NaN/Inf input gradients"
        alerts.append(Alert(AlertCondition.NONFINITE_GRADIENTS, figures.nonfinite, 0, step, (), message))
    if thresholds.check_leakage and figures.leaking_pairs:
        message = (
            f"{figures.leaking_pairs} (output, input) sample pairs leak through the batch: per-sample gradients "
            "mix samples (BatchNorm on batch statistics, or a reshape/transpose across the batch dimension?)"
        )
        if figures.blind_pairs:
            message += (
                f"; for {figures.blind_pairs} of them the backward claims no cross-sample gradient at all: it treats "
                "a batch statistic as a constant (a hand-written backward, or a detached batch statistic)"
            )
        alerts.append(Alert(AlertCondition.BATCH_LEAKAGE, figures.leaking_pairs, 0, step, (), message))
    if figures.wrong_parameters:
        weights = _of_kind(figures.culprits, CulpritKind.PARAMETER)
        where = _labels(weights) or "the whole-model check (not localized here)"
        message = (
            f"gradients with respect to parameters disagree with finite differences in {where} (worst margin "
            f"{figures.worst_parameter_margin:.3g}): training consumes these"
        )
        condition = AlertCondition.PARAMETER_GRADIENTS
        alerts.append(Alert(condition, figures.wrong_parameters, 0, step, (), message, weights))
    if thresholds.fail_fraction is not None and figures.second_order_checked:
        fraction = figures.second_order_failed / figures.second_order_checked
        if fraction > thresholds.fail_fraction:
            named = _of_kind(figures.culprits, CulpritKind.SECOND_ORDER)
            why = f": not twice differentiable ({figures.second_order_finding})" if figures.second_order_finding else ""
            message = (
                f"{figures.second_order_failed} of {figures.second_order_checked} probed samples fail the "
                f"second-order check: the double backward through the input disagrees with finite differences of "
                f"first-order gradients (worst margin {figures.worst_second_order_margin:.3g}){why}"
                + (f"; culprit: {_labels(named)}" if named else "")
            )
            condition = AlertCondition.SECOND_ORDER_CHECKS
            alerts.append(Alert(condition, fraction, thresholds.fail_fraction, step, (), message, named))
    if thresholds.vanishing_fraction is not None and figures.probed:
        fraction = figures.vanishing / figures.probed
        if fraction > thresholds.vanishing_fraction:
            message = (
                f"{figures.vanishing} of {figures.probed} probed samples have an input gradient that is exactly "
                "zero (a .detach() or a non-differentiable op cutting the input off?)"
            )
            condition = AlertCondition.VANISHING_SALIENCY
            alerts.append(Alert(condition, fraction, thresholds.vanishing_fraction, step, (), message))
    return alerts


def _of_kind(culprits: tuple[Culprit, ...], kind: CulpritKind) -> tuple[Culprit, ...]:
    return tuple(c for c in culprits if c.kind is kind)


def _labels(culprits: tuple[Culprit, ...]) -> str:
    return ", ".join(c.label for c in culprits)
