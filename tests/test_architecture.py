"""The layers show themselves: the engine and the alert logic import without Lightning or TensorBoard."""

import subprocess
import sys

CODE = """
import sys
for name in ("lightning", "pytorch_lightning", "tensorboard", "matplotlib"):
    sys.modules[name] = None  # any import of these now fails
import torch
import lightning_gradprobe
from lightning_gradprobe import probe, jacobians, saliency, ProbeReport, GradientCheckError
from lightning_gradprobe.alerts import evaluate_alerts, figures_from_report, AlertThresholds
report = probe(torch.nn.Linear(3, 2), torch.randn(4, 3))
assert report.ok and evaluate_alerts(figures_from_report(report), AlertThresholds(), step=0) == []
print("ok")
"""


def test_core_and_alerts_need_neither_lightning_nor_tensorboard():
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_public_surface_is_declared():
    import lightning_gradprobe

    assert set(lightning_gradprobe.__all__) == {
        "GradProbe",
        "GradientCheckError",
        "ProbeReport",
        "Verdict",
        "__version__",
        "default_rtol",
        "jacobians",
        "probe",
        "saliency",
    }
    assert lightning_gradprobe.GradProbe.__module__ == "lightning_gradprobe.callback"
    for name in lightning_gradprobe.__all__:
        obj = getattr(lightning_gradprobe, name)
        if name != "__version__":
            assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
