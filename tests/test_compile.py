"""Compiled models (``torch.compile``) are probed through their eager code, leaving training's compiled graphs,
their recompile budget and the user's functorch config as they were."""

from __future__ import annotations

import warnings

import pytest
import torch
from lit_models import NetModule, digits, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import TanhFunction

from lightning_gradprobe import GradProbe, GradProbeStoppingReason, Verdict, probe

pytestmark = pytest.mark.slow  # each test compiles graphs (seconds on a CPU)


class _Activation(nn.Module):
    def __init__(self, bug: str) -> None:
        super().__init__()
        self.bug = bug

    def forward(self, x):
        return TanhFunction.apply(x, self.bug)


def _net(bug: str = "ok") -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), _Activation(bug), nn.Linear(16, 10))


@pytest.mark.parametrize("donated", [True, False])
def test_a_compiled_model_after_a_training_step_gets_the_eager_verdicts_and_the_config_comes_back(donated):
    import torch._functorch.config as functorch_config
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    x = digits(8)[0]
    with functorch_config.patch(donated_buffer=donated):
        for bug, expected in (("ok", Verdict.PASS), ("scale", Verdict.FAIL)):
            eager = _net(bug)
            compiled = torch.compile(eager, backend="aot_eager")
            compiled(x).square().sum().backward()  # a training step compiles the graph, buffers donated
            graphs = dict(counters["stats"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = probe(compiled, x, localize=True)
            assert dict(counters["stats"]) == graphs  # nothing compiled for the probe: training's budget intact
            assert report.verdicts == (expected,) * 8 == probe(eager, x).verdicts
            assert any("torch.compile'd" in note for note in report.notes)
            named = [c.module for c in report.culprits if not c.explained_by]
            assert named == ([] if bug == "ok" else ["2"])  # as the user named it
            assert functorch_config.donated_buffer is donated


def _loaders():
    x, y = digits(160)
    return (
        DataLoader(TensorDataset(x[:128], y[:128]), batch_size=32),
        DataLoader(TensorDataset(x[128:], y[128:]), batch_size=32),
    )


@pytest.mark.parametrize("compile_whole", [False, True])
def test_a_compiled_fit_is_probed_caught_when_wrong_and_trains_through_when_right(tmp_path, compile_whole):
    results = {}
    for bug in ("scale", "ok"):
        module = NetModule(_net(bug) if compile_whole else torch.compile(_net(bug)))
        if compile_whole:
            module = torch.compile(module)  # the whole LightningModule, default backend
        callback = GradProbe(max_overhead=None, on_alert="stop")
        run = trainer(tmp_path / bug, [callback], max_epochs=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run.fit(module, *_loaders())
        results[bug] = (run.current_epoch, callback)
    epochs, caught = results["scale"]
    assert epochs == 1 and caught.stopping_reason is GradProbeStoppingReason.ALERT
    epochs, clean = results["ok"]
    assert epochs == 3 and clean.probes_done == 3 and clean.schedule.failures == 0
    assert clean.last_report is not None and clean.last_report.ok
