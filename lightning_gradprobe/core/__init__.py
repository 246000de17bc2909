"""The torch-only engine: per-sample Jacobians, finite differences, verdicts and the report."""

from ._probe import jacobians, probe, saliency
from ._verdicts import default_rtol
from .report import ProbeReport, Verdict

__all__ = ["ProbeReport", "Verdict", "default_rtol", "jacobians", "probe", "saliency"]
