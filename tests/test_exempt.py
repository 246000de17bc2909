"""``exempt=``: intentional surrogate gradients (straight-through estimators, gradient reversal) are declared;
the rest of the model is still checked, and a wrong backward elsewhere is still caught and named."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lit_models import NetModule, trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import TanhFunction

from lightning_gradprobe import GradProbe, GradProbeStoppingReason, Verdict, probe


class RoundSTE(torch.autograd.Function):
    """Quantization-aware training: round in the forward, identity in the backward (on purpose)."""

    @staticmethod
    def forward(x):
        return torch.round(x * 4) / 4

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


class FakeQuant(nn.Module):
    def forward(self, x):
        return RoundSTE.apply(x)


class ReverseGradient(torch.autograd.Function):
    """Domain adaptation: identity in the forward, the gradient reversed in the backward (on purpose)."""

    @staticmethod
    def forward(x):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return -0.5 * grad


class GradientReversal(nn.Module):
    def forward(self, x):
        return ReverseGradient.apply(x)


class Tanh(nn.Module):
    def __init__(self, wrong: bool = False) -> None:
        super().__init__()
        self.wrong = wrong

    def forward(self, x):
        return TanhFunction.apply(x, "scale" if self.wrong else "ok")  # the zoo's, x1.1 when wrong


def qat(wrong: str | None = None) -> nn.Module:
    """Fake quantization after each hidden layer; ``wrong`` = "before"/"after" plants a bug around them."""
    return nn.Sequential(
        nn.Linear(6, 8), Tanh(wrong == "before"), FakeQuant(),
        nn.Linear(8, 8), Tanh(wrong == "after"), FakeQuant(),
        nn.Linear(8, 3),
    ).eval()  # fmt: skip


class DomainAdversarial(nn.Module):
    """Features -> (label head, gradient reversal -> domain head); the probed output is both heads."""

    def __init__(self, wrong: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 8), Tanh(wrong))
        self.labels = nn.Linear(8, 3)
        self.reverse = GradientReversal()
        self.domain = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x):
        h = self.features(x)
        return torch.cat([self.labels(h), self.domain(self.reverse(h))], 1)


@pytest.mark.parametrize("exempt", [FakeQuant, ["2", "5"], None])
def test_qat_model_passes_with_its_straight_through_estimators_exempt(exempt):
    torch.manual_seed(0)
    model, x = qat(), torch.randn(8, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = probe(model, x, exempt=exempt if exempt is not None else [model[2], model[5]])
    assert report.ok and report.exempt == ("2", "5"), str(report)
    assert set(report.verdicts) == {Verdict.PASS}
    assert probe(model, x).counts["fail"] == 8  # without exempt=, the surrogate is (rightly) a wrong backward


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_wrong_backward_elsewhere_in_a_qat_model_is_caught_and_named(where):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = probe(qat(where), torch.randn(8, 6), exempt=FakeQuant, localize=True)
    assert not report.ok and Verdict.FAIL in report.verdicts
    assert [c.module for c in report.culprits] == ["1" if where == "before" else "4"]


def test_gradient_reversal_exempt_and_a_wrong_feature_backward_still_named():
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        right = probe(DomainAdversarial(), x, exempt="reverse")
        wrong = probe(DomainAdversarial(wrong=True), x, exempt=GradientReversal, localize=True)
    assert right.ok and right.exempt == ("reverse",), str(right)
    assert not wrong.ok and "features.1" in [c.module for c in wrong.culprits]


def test_exempt_errors_name_exempt():
    with pytest.raises(ValueError, match="`exempt` names 'nope'"):
        probe(qat(), torch.randn(4, 6), exempt="nope")
    with pytest.raises(TypeError, match="`exempt`"):
        GradProbe(exempt=3)


@pytest.mark.slow
def test_qat_fit_with_exempt_trains_through_and_a_wrong_layer_stops_it(tmp_path):
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 6, generator=generator), torch.randint(0, 3, (96,), generator=generator)
    loaders = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16), DataLoader(TensorDataset(x[64:], y[64:]))
    outcomes = {}
    for wrong in (None, "after"):
        callback = GradProbe(max_overhead=None, on_alert="stop", exempt=FakeQuant)
        logger = TensorBoardLogger(tmp_path, name=str(wrong), version=0)
        run = trainer(tmp_path, [callback], max_epochs=3, logger=logger)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run.fit(NetModule(qat(wrong).train(), lr=0.05), *loaders)
        outcomes[wrong] = (run.current_epoch, callback, tmp_path / str(wrong) / "version_0")
    epochs, clean, run_dir = outcomes[None]
    assert epochs == 3 and clean.probes_done == 3 and not clean.alerts
    assert clean.stopping_reason is GradProbeStoppingReason.NOT_STOPPED
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    said = events.Tensors("gradprobe/exempt/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "net.2" in said and "net.5" in said
    epochs, caught, _ = outcomes["after"]
    assert epochs == 1 and caught.stopping_reason is GradProbeStoppingReason.ALERT
    assert "net.4" in caught.stopping_reason_message


def test_an_exempt_submodule_off_the_probed_path_leaves_the_check_whole():
    class AuxHead(nn.Module):  # a gradient-reversal head used in training_step only
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
            self.aux = nn.Sequential(GradientReversal(), nn.Linear(8, 2))

        def forward(self, x):
            return self.body(x)

    report = probe(AuxHead(), torch.randn(4, 6), exempt="aux")
    assert report.ok and report.exempt == () and "none is called by the forward" in report.notes[-1]
