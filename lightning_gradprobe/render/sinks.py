"""Where pictures go: TensorBoard's ``SummaryWriter``, or any other logger that takes images.

``log_probe`` writes through a writer with TensorBoard's methods (``add_image``, ``add_histogram``,
``add_text``). :class:`ImageSink` gives a logger that only takes images those methods: pictures are handed to the
logger's own image API as ``(H, W, 3)`` uint8 arrays, and what it cannot show (histograms, the markdown alert
log) is left out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["ImageSink", "image_sink"]


class ImageSink:
    """TensorBoard's writer methods over a function ``log(tag, image, step)`` taking an ``(H, W, 3)`` uint8 array."""

    def __init__(self, log: Callable[[str, np.ndarray, int], None]) -> None:
        self._log = log

    def add_image(self, tag: str, image: Any, step: int, dataformats: str = "CHW") -> None:
        """Log an image given as TensorBoard takes it (``HWC`` or ``CHW``, floats in [0, 1] or uint8)."""
        array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
        if dataformats == "CHW":
            array = array.transpose(1, 2, 0)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
        self._log(tag, array[..., :3], step)

    def add_histogram(self, *args: Any, **kwargs: Any) -> None:
        """Histograms are TensorBoard's: left out."""

    def add_text(self, *args: Any, **kwargs: Any) -> None:
        """The markdown alert log is TensorBoard's (alerts reach every logger as scalars and warnings)."""

    def flush(self) -> None:
        """Nothing is buffered here."""


def image_sink(logger: Any) -> ImageSink | None:
    """An :class:`ImageSink` for a Lightning logger that takes images, else ``None``.

    ``MLFlowLogger``: PNG artifacts of the run (``MlflowClient.log_image``); any logger with a ``log_image(key,
    images, step)`` method (``WandbLogger``, and others alike).
    """
    if type(logger).__name__ == "MLFlowLogger" and getattr(logger, "run_id", None) is not None:

        def to_mlflow(tag: str, image: np.ndarray, step: int) -> None:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", tag)
            logger.experiment.log_image(logger.run_id, image, artifact_file=f"{name}/step_{step:08d}.png")

        return ImageSink(to_mlflow)
    log_image = getattr(logger, "log_image", None)
    if callable(log_image):
        return ImageSink(lambda tag, image, step: log_image(key=tag, images=[image], step=step))
    return None
