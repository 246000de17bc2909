"""Rendering: the only place that knows TensorBoard, the other loggers' image APIs, and how pictures are drawn.

Scalars reach every logger through ``LightningModule.log``; pictures go to every logger that takes images
(``TensorBoardLogger``, ``WandbLogger``, ``MLFlowLogger``, any with ``log_image``; rank zero), histograms, the
alert log and the custom-scalars layout to TensorBoard; loggers without images get a one-time note.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from ..alerts import Alert
from ..core.report import ProbeReport
from .images import input_kind, robust_scale, saliency_picture, token_picture
from .sinks import ImageSink, image_sink
from .tensorboard import alert_markdown, custom_scalars_layout, labels_for, log_probe, write_layout

__all__ = [
    "ImageSink",
    "alert_markdown",
    "custom_scalars_layout",
    "input_kind",
    "logging_step",
    "Panels",
    "log_probe",
    "robust_scale",
    "saliency_picture",
    "token_picture",
    "write_layout",
]


@dataclass
class Panels:
    """What the TensorBoard panels remember between probes: the layout written once, the shared scale.

    Args:
        log_images: Draw saliency pictures.
        shared_scale: Keep the first probe's colour scale for every later picture.
        feature_names: Names of tabular features.
        tokens: ``ids -> list[str]`` for token heat maps (ids are shown otherwise).

    """

    log_images: bool = True
    shared_scale: bool = False
    feature_names: Sequence[str] | None = None
    scale: float | None = None
    announced: bool = False
    tokens: Callable[[list[int]], list[str]] | None = None

    def write(
        self, trainer: Any, report: ProbeReport, alerts: Sequence[Alert], inputs: Any, labels: Tensor | None
    ) -> None:
        """Write one probe's panels to every logger of the trainer that takes pictures (call on rank zero).

        TensorBoard gets everything (pictures, histograms, the alert log, the custom-scalars layout); W&B, MLflow
        and any logger with a ``log_image`` method get the pictures. Others get the scalars only, said once.
        """
        writers = self._writers(trainer, report)
        step = logging_step(trainer)
        for writer in writers:
            used = log_probe(
                writer,
                report,
                inputs,
                alerts,
                step,
                labels=labels_for(report, report.outputs, labels),
                feature_names=self.feature_names,
                scale=self.scale if self.shared_scale else None,
                images=self.log_images,
                tokens=self.tokens,
            )
            if self.shared_scale and self.scale is None:
                self.scale = used

    def _writers(self, trainer: Any, report: ProbeReport) -> list[Any]:
        writers: list[Any] = []
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                if not self.announced:
                    write_layout(logger.log_dir)
                    if report.exempt:  # what the check leaves out, said where the panels are
                        text = "Exempt (backward intentionally not the derivative): " + ", ".join(report.exempt)
                        logger.experiment.add_text("gradprobe/exempt", text, logging_step(trainer))
                writers.append(logger.experiment)
            elif (sink := image_sink(logger)) is not None:
                writers.append(sink)
        if not writers and trainer.loggers and not self.announced:
            rank_zero_info(
                "GradProbe: saliency pictures go to loggers that take images (TensorBoard, W&B, MLflow, any with "
                f"`log_image`); {type(trainer.loggers[0]).__name__} receives the gradprobe/ scalars."
            )
        self.announced = True
        return writers


def logging_step(trainer: Any) -> int:
    """The step Lightning writes this hook's scalars at, so pictures line up with them on the slider."""
    if trainer.state.fn == TrainerFn.FITTING:
        return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))
    return trainer.global_step
