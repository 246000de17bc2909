"""The scalars a probe logs, by TensorBoard tag group (``gradprobe/checks``, ``/health``, ``/second_order``)."""

from __future__ import annotations

from ..alerts import AlertThresholds, ProbeFigures
from ..core.report import ProbeReport

__all__ = ["probe_metrics"]


def probe_metrics(
    figures: ProbeFigures,
    report: ProbeReport | None,
    thresholds: AlertThresholds,
    *,
    second_order: bool,
    nonfinite_inputs: int,
) -> dict[str, float]:
    """The ``gradprobe/...`` scalars of one probe: the same keys on every process, whether its own probe ran.

    Example:
        >>> metrics = probe_metrics(ProbeFigures(probed=8, checked=8, failed=2), None, AlertThresholds(),
        ...                         second_order=False, nonfinite_inputs=0)
        >>> metrics["gradprobe/checks/fail_fraction"], metrics["gradprobe/checks/margin_limit"]
        (0.25, 1.0)

    """
    checked = max(figures.checked, 1)
    metrics = {
        "gradprobe/checks/fail_fraction": figures.failed / checked,
        "gradprobe/checks/inconclusive_fraction": figures.inconclusive / checked,
        "gradprobe/checks/margin_max": figures.worst_margin,
        "gradprobe/checks/parameter_margin_max": figures.worst_parameter_margin,
        "gradprobe/checks/relative_error_max": figures.worst_relative_error,
        "gradprobe/health/nonfinite_samples": float(figures.nonfinite),
        "gradprobe/health/vanishing_samples": float(figures.vanishing),
        "gradprobe/health/leaking_pairs": float(figures.leaking_pairs),
        "gradprobe/health/nonfinite_inputs": float(nonfinite_inputs),
    }
    if thresholds.fail_fraction is not None:
        metrics["gradprobe/checks/fail_threshold"] = thresholds.fail_fraction
    if second_order:
        second_checked = max(figures.second_order_checked, 1)
        metrics["gradprobe/second_order/fail_fraction"] = figures.second_order_failed / second_checked
        metrics["gradprobe/second_order/margin_max"] = figures.worst_second_order_margin
    summary = report.summary() if report is not None else {}
    metrics["gradprobe/checks/margin_limit"] = 1.0
    metrics["gradprobe/checks/relative_error_median"] = summary.get("relative_error_median", float("nan"))
    for key in ("grad_norm_p10", "grad_norm_p50", "grad_norm_p90"):
        metrics[f"gradprobe/health/{key}"] = summary.get(key, float("nan"))
    return metrics
