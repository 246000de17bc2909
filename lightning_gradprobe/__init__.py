"""lightning-gradprobe: trustworthy per-sample input-gradient checks for PyTorch and Lightning.

The torch-only engine (:func:`probe`, :func:`jacobians`, :func:`saliency`) imports without Lightning;
the :class:`GradProbe` callback (and its :class:`GradProbeStoppingReason`) are imported on first use.
"""

from typing import Any

from ._errors import GradientCheckError, GradProbeSetupError
from .core import (
    Culprit,
    CulpritKind,
    ParameterCheck,
    ProbeReport,
    SecondOrderReport,
    Verdict,
    default_rtol,
    jacobians,
    probe,
    saliency,
)

__version__ = "0.1.0"

__all__ = [
    "Culprit",
    "CulpritKind",
    "GradProbe",
    "GradProbeSetupError",
    "GradProbeStoppingReason",
    "GradientCheckError",
    "ParameterCheck",
    "ProbeReport",
    "SecondOrderReport",
    "Verdict",
    "__version__",
    "default_rtol",
    "jacobians",
    "probe",
    "saliency",
]

_CALLBACK_NAMES = ("GradProbe", "GradProbeStoppingReason")


def __dir__() -> list[str]:
    return sorted(__all__)


def __getattr__(name: str) -> Any:
    if name in _CALLBACK_NAMES:
        from . import callback

        return getattr(callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
