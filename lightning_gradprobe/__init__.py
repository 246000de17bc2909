"""lightning-gradprobe: trustworthy per-sample input-gradient checks for PyTorch and Lightning.

The torch-only engine (:func:`probe`, :func:`jacobians`, :func:`saliency`) imports without Lightning;
the :class:`GradProbe` callback is imported on first use.
"""

from typing import Any

from ._errors import GradientCheckError
from .core import ProbeReport, Verdict, default_rtol, jacobians, probe, saliency

__version__ = "0.1.0"

__all__ = [
    "GradProbe",
    "GradientCheckError",
    "ProbeReport",
    "Verdict",
    "__version__",
    "default_rtol",
    "jacobians",
    "probe",
    "saliency",
]


def __dir__() -> list[str]:
    return sorted(__all__)


def __getattr__(name: str) -> Any:
    if name == "GradProbe":
        from .callback import GradProbe

        return GradProbe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
