"""TensorBoard panels: histograms, saliency pictures, the alert log and the custom-scalars layout."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..alerts import Alert
from ..core.report import ProbeReport
from .images import robust_scale, saliency_picture, token_picture

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
                [
                    f"{PREFIX}/checks/margin_max",
                    f"{PREFIX}/checks/parameter_margin_max",
                    f"{PREFIX}/second_order/margin_max",
                    f"{PREFIX}/checks/margin_limit",
                ],
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
    if os.path.isdir(path) and any(name.startswith("events.out.tfevents") for name in os.listdir(path)):
        return path  # a resumed run: the layout is there already
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
        culprits = ", ".join(f"`{c.label}`" for c in alert.culprits) or "-"
        rows.append(
            f"| {alert.step} | {alert.condition} | {alert.value:.3g} | {alert.threshold:.3g} | {samples} | "
            f"{culprits} | {alert.message.replace('|', '/')} |"
        )
    return "\n".join(rows)


def log_probe(
    writer: Any,
    report: ProbeReport,
    inputs: Any,
    alerts: Sequence[Alert],
    step: int,
    *,
    labels: Sequence[str] | None = None,
    feature_names: Sequence[str] | None = None,
    scale: float | None = None,
    images: bool = True,
    tokens: Callable[[list[int]], list[str]] | None = None,
) -> float:
    """Write one probe's histograms, saliency pictures and alert log; return the colour scale used.

    ``inputs`` is the probed tensor, or the tuple/dict of tensors a model with several inputs takes (one
    picture per differentiated input, ``gradprobe/saliency/<key>``); a token model (``report.token_scores``)
    gets a token heat map.
    """
    errors = report.relative_error[report.checked].flatten()
    errors = errors[errors.isfinite()]
    if errors.numel():
        writer.add_histogram(f"{PREFIX}/histograms/log10_relative_error", errors.clamp_min(1e-16).log10(), step)
    pictures = _saliency_entries(report.saliency, inputs)
    magnitude = torch.cat([s.detach().abs().float().flatten().cpu() for _, s, _ in pictures] or [torch.zeros(0)])
    magnitude = magnitude[magnitude.isfinite()]
    if magnitude.numel():
        writer.add_histogram(f"{PREFIX}/histograms/abs_input_gradient", magnitude, step)
    if alerts:  # before the pictures: a probe whose picture cannot be drawn still has its alert log
        writer.add_text(f"{PREFIX}/alerts", alert_markdown(alerts), step)
    title = f"step {step}: " + ", ".join(f"{v} {c}" for v, c in report.counts.items() if c)
    if report.token_scores is not None:
        scores = report.token_scores["grad_x_input"]
        used = scale if scale is not None else robust_scale(scores)
        ids, mask = _token_inputs(inputs, scores.shape) if images else (None, None)
        if ids is not None:
            picture = token_picture(ids, scores, mask=mask, tokens=tokens, labels=labels, scale=used, title=title)
            writer.add_image(f"{PREFIX}/saliency", picture, step, dataformats="HWC")
    else:
        used = scale if scale is not None else robust_scale(pictures[0][1]) if pictures else 1.0
        for position, (tag, saliency, probed) in enumerate(pictures if images else []):
            # Several inputs each get their own colour scale (their gradients live in their own units).
            own = used if position == 0 or scale is not None else robust_scale(saliency)
            picture = saliency_picture(
                probed, saliency, labels=labels, feature_names=feature_names, scale=own, title=title
            )
            writer.add_image(tag, picture, step, dataformats="HWC")
    writer.flush()
    return used


def _saliency_entries(saliency: Any, inputs: Any) -> list[tuple[str, Tensor, Tensor]]:
    """``(tag, saliency, inputs)`` per differentiated input: one for a tensor, one per entry of a tuple/dict."""
    if isinstance(saliency, Tensor):
        probed = inputs if isinstance(inputs, Tensor) and inputs.shape == saliency.shape else saliency
        return [(f"{PREFIX}/saliency", saliency, probed)]
    items = saliency.items() if isinstance(saliency, Mapping) else enumerate(saliency)
    return [(f"{PREFIX}/saliency/{key}", value, inputs[key]) for key, value in items if value is not None]


def _token_inputs(inputs: Any, shape: Sequence[int]) -> tuple[Tensor | None, Tensor | None]:
    """The token ids and the attention mask among a token model's inputs (``None`` when not found)."""
    values = (
        inputs.items() if isinstance(inputs, Mapping) else enumerate([inputs] if isinstance(inputs, Tensor) else inputs)
    )
    candidates = {k: v for k, v in values if isinstance(v, Tensor) and tuple(v.shape[:2]) == tuple(shape)}
    integers = {k: v for k, v in candidates.items() if not v.is_floating_point()}
    mask = integers.get("attention_mask")
    ids = integers.get("input_ids", next((v for k, v in integers.items() if k != "attention_mask"), None))
    return ids, mask


def labels_for(report: ProbeReport, outputs: Tensor | None, labels: Tensor | None) -> list[str]:
    """Captions per probed sample: label, prediction, verdict.

    A classifier's prediction is its argmax; a regression's (one output per sample) is its value.

    Example:
        >>> from lightning_gradprobe.core.report import Verdict
        >>> report = type("Report", (), {"verdicts": (Verdict.PASS, Verdict.FAIL)})()
        >>> labels_for(report, torch.tensor([[0.1, 2.0], [3.0, 0.2]]), torch.tensor([1, 0]))
        ['y=1 pred=1 pass', 'y=0 pred=0 fail']
        >>> labels_for(report, torch.tensor([[151.2], [-0.5]]), torch.tensor([[150.0], [0.25]]))
        ['y=150 pred=151 pass', 'y=0.25 pred=-0.5 fail']

    """
    captions = []
    for i, verdict in enumerate(report.verdicts):
        parts = []
        if labels is not None and labels[i].numel() == 1:
            parts.append(f"y={_number(labels[i])}")
        if outputs is not None:
            row = outputs[i].reshape(-1)
            parts.append(f"pred={_number(row) if row.numel() == 1 else int(row.argmax())}")
        parts.append(str(verdict))
        captions.append(" ".join(parts))
    return captions


def _number(value: Tensor) -> str:
    """One value as a caption shows it: an integer as is, a real number to 3 significant digits."""
    number = value.reshape(-1)[0].item()
    return str(number) if isinstance(number, int) else f"{number:.3g}"
