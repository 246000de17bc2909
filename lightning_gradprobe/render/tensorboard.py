"""TensorBoard panels: histograms, saliency figures, the alert log and the custom-scalars layout."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..alerts import Alert
from ..core.report import ProbeReport
from .images import input_kind, robust_scale, saliency_figure, saliency_grid

__all__ = ["LAYOUT_RUN", "PREFIX", "alert_markdown", "custom_scalars_layout", "log_probe", "write_layout"]

PREFIX = "gradprobe"
LAYOUT_RUN = "gradprobe_layout"


def custom_scalars_layout() -> dict[str, dict[str, list[Any]]]:
    """The dashboard: worst margin against 1, fail fraction against its threshold, norm band.

    The margin is error / allowed error of the very checks the verdicts were decided on: above 1 fails.
    """
    return {
        "gradprobe": {
            "margin (error / allowed) vs 1": [
                "Multiline",
                [f"{PREFIX}/checks/margin_max", f"{PREFIX}/second_order/margin_max", f"{PREFIX}/checks/margin_limit"],
            ],
            "fail fraction vs threshold": [
                "Multiline",
                [f"{PREFIX}/checks/fail_fraction", f"{PREFIX}/checks/fail_threshold"],
            ],
            "input-gradient norm (p50, band p10-p90)": [
                "Margin",
                [f"{PREFIX}/health/grad_norm_p50", f"{PREFIX}/health/grad_norm_p10", f"{PREFIX}/health/grad_norm_p90"],
            ],
        }
    }


def write_layout(log_dir: str) -> str:
    """Write the custom-scalars layout once, to its own sub-run, so it never clashes with the user's own."""
    from torch.utils.tensorboard import SummaryWriter

    path = os.path.join(log_dir, LAYOUT_RUN)
    writer = SummaryWriter(path)
    try:
        writer.add_custom_scalars(custom_scalars_layout())
    finally:
        writer.close()
    return path


def alert_markdown(alerts: Sequence[Alert]) -> str:
    """One markdown table for the alerts of one probe.

    Example:
        >>> from lightning_gradprobe.alerts import AlertCondition
        >>> print(alert_markdown([Alert(AlertCondition.FAILED_CHECKS, 0.5, 0.0, 40, (1, 3), "2 of 4 fail")]))
        | step | condition | value | threshold | samples | culprit | what |
        |---:|---|---:|---:|---|---|---|
        | 40 | failed_checks | 0.5 | 0 | 1, 3 | - | 2 of 4 fail |

    """
    rows = [
        "| step | condition | value | threshold | samples | culprit | what |",
        "|---:|---|---:|---:|---|---|---|",
    ]
    for alert in alerts:
        samples = ", ".join(str(s) for s in alert.samples[:16]) or "-"
        culprits = ", ".join(f"`{c}`" for c in alert.culprits) or "-"
        rows.append(
            f"| {alert.step} | {alert.condition} | {alert.value:.3g} | {alert.threshold:.3g} | {samples} | "
            f"{culprits} | {alert.message.replace('|', '/')} |"
        )
    return "\n".join(rows)


def log_probe(
    writer: Any,
    report: ProbeReport,
    inputs: Tensor,
    alerts: Sequence[Alert],
    step: int,
    *,
    labels: Sequence[str] | None = None,
    feature_names: Sequence[str] | None = None,
    scale: float | None = None,
    images: bool = True,
) -> float:
    """Write one probe's histograms, saliency figure and alert log; return the colour scale used."""
    errors = report.relative_error[report.checked].flatten()
    errors = errors[errors.isfinite()]
    if errors.numel():
        writer.add_histogram(f"{PREFIX}/histograms/log10_relative_error", errors.clamp_min(1e-16).log10(), step)
    magnitude = report.saliency.detach().abs().float().flatten().cpu()
    magnitude = magnitude[magnitude.isfinite()]
    if magnitude.numel():
        writer.add_histogram(f"{PREFIX}/histograms/abs_input_gradient", magnitude, step)
    used = scale if scale is not None else robust_scale(report.saliency)
    if images and input_kind(tuple(inputs.shape)) == "image":
        grid = saliency_grid(inputs, report.saliency, labels=labels, scale=used)
        writer.add_image(f"{PREFIX}/saliency", grid, step, dataformats="HWC")
    elif images:
        figure = saliency_figure(
            inputs,
            report.saliency,
            labels=labels,
            feature_names=feature_names,
            scale=used,
            title=f"step {step}: " + ", ".join(f"{v} {c}" for v, c in report.counts.items() if c),
        )
        writer.add_figure(f"{PREFIX}/saliency", figure, step, close=True)
    if alerts:
        writer.add_text(f"{PREFIX}/alerts", alert_markdown(alerts), step)
    writer.flush()
    return used


def labels_for(report: ProbeReport, outputs: Tensor | None, labels: Tensor | None) -> list[str]:
    """Captions "y=3 pred=3 pass" per probed sample."""
    captions = []
    for i, verdict in enumerate(report.verdicts):
        parts = []
        if labels is not None and labels.ndim == 1:
            parts.append(f"y={int(labels[i])}")
        if outputs is not None:
            parts.append(f"pred={int(outputs[i].reshape(-1).argmax())}")
        parts.append(str(verdict))
        captions.append(" ".join(parts))
    return captions
