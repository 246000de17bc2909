"""The torch-only engine: per-sample Jacobians, finite differences, verdicts and the report."""

from .probe import default_rtol, jacobians, probe, saliency
from .report import ProbeReport, Verdict

__all__ = ["ProbeReport", "Verdict", "default_rtol", "jacobians", "probe", "saliency"]
