"""The package's exceptions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.report import ProbeReport

__all__ = ["GradProbeSetupError", "GradientCheckError"]


class GradientCheckError(RuntimeError):
    """Raised when input gradients cannot be trusted; carries the evidence.

    Attributes:
        report: The :class:`~lightning_gradprobe.ProbeReport` that failed.
        alerts: The alerts that fired, when raised by the callback (empty otherwise).

    """

    def __init__(self, message: str, report: ProbeReport | None = None, alerts: tuple[Any, ...] = ()) -> None:
        super().__init__(message)
        self.report = report
        self.alerts = alerts


class GradProbeSetupError(RuntimeError):
    """Raised under ``GradProbe(strict=True)`` when the callback cannot read the batch or run the probe."""
