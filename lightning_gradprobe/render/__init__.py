"""Rendering: the only place that knows TensorBoard and matplotlib.

Scalars reach every logger through ``LightningModule.log``; pictures, histograms, the alert log and
the custom-scalars layout go to a ``TensorBoardLogger`` only (rank zero), and other loggers get a
one-time note.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..alerts import Alert
from ..core.report import ProbeReport
from .images import input_kind, robust_scale, saliency_figure
from .tensorboard import alert_markdown, custom_scalars_layout, labels_for, log_probe, write_layout

__all__ = [
    "alert_markdown",
    "custom_scalars_layout",
    "input_kind",
    "log_probe",
    "render_report",
    "robust_scale",
    "saliency_figure",
    "write_layout",
]


def render_report(trainer: Any, report: ProbeReport, alerts: Sequence[Alert], callback: Any) -> None:
    """Write a probe's panels to the trainer's TensorBoard logger, if it has one (call on rank zero)."""
    tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    if tensorboard is None:
        if trainer.loggers and not callback._layout_written:
            callback._layout_written = True
            rank_zero_info(
                "GradProbe: saliency images, histograms and the alert log are written to TensorBoard only; "
                f"{type(trainer.loggers[0]).__name__} receives the gradprobe/ scalars."
            )
        return
    if not callback._layout_written:
        callback._layout_written = True
        write_layout(tensorboard.log_dir)
    inputs = callback.probe_inputs[: len(report.verdicts)]
    labels = callback.probe_labels[: len(report.verdicts)] if callback.probe_labels is not None else None
    scale = callback.saliency_scale if callback.shared_scale else None
    used = log_probe(
        tensorboard.experiment,
        report,
        inputs,
        alerts,
        _logging_step(trainer),
        labels=labels_for(report, report.outputs, labels),
        feature_names=callback.feature_names,
        scale=scale,
        images=callback.log_images,
    )
    if callback.shared_scale and callback.saliency_scale is None:
        callback.saliency_scale = used


def _logging_step(trainer: Any) -> int:
    """The step Lightning writes this hook's scalars at, so pictures line up with them on the slider."""
    if trainer.state.fn == "fit":
        return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))
    return trainer.global_step
