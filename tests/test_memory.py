"""A probe fits in the memory of a training step: peak RSS in fresh processes, on a model where a float64 copy shows."""

import json

import pytest
from side_by_side import BACKGROUND

pytestmark = [pytest.mark.slow, pytest.mark.launched]
LAUNCH_TIMEOUT = 300

CHILD = r"""
import json, sys
import torch
from torch import nn
import lightning_gradprobe
import torch._dynamo  # as `import lightning` does (a standalone first probe imports it: ~90 MiB once)

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

def peak_resident():  # (VmHWM: this process image's own peak; ru_maxrss keeps the launching process's from before exec)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

torch.manual_seed(0)
model = nn.Sequential(*[nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)) for _ in range(6)])
model = nn.Sequential(model, nn.Linear(1024, 10)).eval()
x, y = torch.randn(8, 1024), torch.randint(0, 10, (8,))
before = resident()
if sys.argv[1] == "step":
    nn.functional.cross_entropy(model.train()(x), y).backward()
    verdicts = None
else:
    report = lightning_gradprobe.probe(model, x)
    verdicts = [report.ok, report.parameter_check.verdict.value, report.fd_dtype == torch.float64, report.notes]
peak = peak_resident()
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"extra": peak - before, "model": model_bytes, "verdicts": verdicts}))
"""


def launch(root):
    """Each measurement in its own fresh process (peak RSS is per process)."""
    return {what: ["-c", CHILD, what] for what in ("step", "probe")}


def _measured(what):
    return json.loads(BACKGROUND.launches(__name__).succeeded(what).stdout.strip().splitlines()[-1])


def test_probe_needs_no_more_memory_than_a_training_step():
    """A 50M-parameter MLP (192 MiB in float32; ``benchmarks/bench_memory.py`` measures 200M and 400M): a float64
    copy alone would be 384 MiB, about twice what a training step needs (its gradients and activations, ~210 MiB);
    the probe needs about half a step."""
    step, probe = _measured("step"), _measured("probe")
    ok, parameter_verdict, float64, notes = probe["verdicts"]
    assert ok and parameter_verdict == "pass" and float64 and not any("weaker" in note for note in notes)
    assert probe["extra"] < step["extra"], (probe["extra"] / 2**20, step["extra"] / 2**20)
    assert probe["extra"] < probe["model"]  # no copy of the model, let alone a float64 one
