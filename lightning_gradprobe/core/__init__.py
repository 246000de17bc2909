"""The torch-only engine: per-sample Jacobians, finite differences, verdicts and the report."""

from ._probe import jacobians, probe, saliency
from ._verdicts import default_rtol
from .report import Culprit, CulpritKind, ParameterCheck, ProbeReport, SecondOrderReport, Verdict

__all__ = [
    "Culprit",
    "CulpritKind",
    "ParameterCheck",
    "ProbeReport",
    "SecondOrderReport",
    "Verdict",
    "default_rtol",
    "jacobians",
    "probe",
    "saliency",
]
