"""Parameter gradients, checked by default: weight-only bugs caught and named, correct twins never flagged."""

from __future__ import annotations

import warnings

import pytest
import torch
from lit_models import DigitsModule, trainer
from torch import nn
from zoo import FusedEmbedding, FusedLinear, correct_models, weight_bug_classes

from lightning_gradprobe import CulpritKind, GradProbe, GradProbeStoppingReason, Verdict, probe
from lightning_gradprobe.alerts import AlertCondition
from lightning_gradprobe.core import _parameters as parameters_module
from lightning_gradprobe.core._functions import build_parameter_function
from lightning_gradprobe.core._parameters import ParameterSpace


@pytest.mark.parametrize("name", sorted(weight_bug_classes(0)))
def test_weight_only_bugs_are_caught_and_named_while_the_input_check_passes(name):
    for seed in range(3):
        (twin, x), (wrong, _), culprit = weight_bug_classes(seed)[name]
        good = probe(twin, x, seed=seed, localize=True)
        assert good.ok and good.parameter_check.verdict is Verdict.PASS, str(good)
        bad = probe(wrong, x, seed=seed, localize=True)
        assert Verdict.FAIL not in bad.verdicts  # the input gradient is right
        assert bad.parameter_check.verdict is Verdict.FAIL and not bad.ok
        assert [(c.module, c.kind) for c in bad.culprits] == [(culprit, CulpritKind.PARAMETER)], str(bad)


@pytest.mark.parametrize("name", ["tanh-mlp", "cnn-bn-eval", "transformer-encoder", "lstm", "classic-function"])
def test_correct_models_pass_the_parameter_check(name):
    for seed in range(3):
        model, x = correct_models(seed)[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            report = probe(model, x, seed=seed)
        assert report.parameter_check is not None and report.parameter_check.verdict is not Verdict.FAIL


class _Counted(nn.Module):
    """A model that counts its own forwards."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def _parameter_check_forwards(model: nn.Module, x: torch.Tensor, seed: int):
    """The default probe's report, and how many forwards its parameter check ran (against the same probe without)."""
    counted = _Counted(model)
    probe(counted, x, seed=seed, check_parameters=False)
    without, counted.calls = counted.calls, 0
    report = probe(counted, x, seed=seed)
    return report, counted.calls - without


@pytest.mark.parametrize("seed", [30, 37])
def test_a_correct_model_passes_at_the_screen_and_a_wrong_one_goes_on_to_both_directions(seed):
    """The screen (one direction at step sqrt(eps)) passes a correct model in two forwards after the gradient's; a
    layer norm's affine weight x1.1, which one direction at the default step passed on these seeds (its error under
    that step's curvature bound), is not clean there and fails in the two-direction checks."""
    (twin, x), (wrong, _), _ = weight_bug_classes(seed)["layernorm-grad-affine-weight-x1.1"]
    good, forwards = _parameter_check_forwards(twin, x, seed)
    assert good.parameter_check.verdict is Verdict.PASS and forwards == 1 + 2
    bad, forwards = _parameter_check_forwards(wrong, x, seed)
    assert bad.parameter_check.verdict is Verdict.FAIL and forwards >= 1 + 2 + 4 + 4


def test_frozen_parameters_are_left_out_and_the_check_can_be_switched_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), FusedLinear(8, 8, "scale"), nn.Tanh(), nn.Linear(8, 3)).eval()
    model[2].requires_grad_(False)  # the wrong weight gradient is never used by training
    x = torch.randn(8, 6)
    report = probe(model, x)
    assert report.ok and report.parameter_check.frozen == 8 * 8 + 8
    assert report.parameter_check.parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert probe(model, x, check_parameters=False).parameter_check is None


def test_grad_probe_defaults_stop_a_fit_whose_weight_gradient_is_wrong(tmp_path):
    callback = GradProbe(max_overhead=None, on_alert="stop")
    run = trainer(tmp_path, [callback], max_epochs=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(DigitsModule(weight_bug="scale"))
    assert run.current_epoch == 1 and callback.stopping_reason is GradProbeStoppingReason.ALERT
    alert = next(a for a in callback.alerts if a.condition is AlertCondition.PARAMETER_GRADIENTS)
    assert [c.label for c in alert.culprits] == ["fc1 (FusedLinear, parameter)"]
    assert float(run.callback_metrics["gradprobe/checks/parameter_margin_max"]) > 1


def test_grad_probe_defaults_train_through_a_correct_model(tmp_path):
    callback = GradProbe(max_overhead=None, on_alert="stop")
    run = trainer(tmp_path, [callback], max_epochs=3)
    run.fit(DigitsModule())
    assert run.current_epoch == 3 and callback.stopping_reason is GradProbeStoppingReason.NOT_STOPPED
    assert 0 <= float(run.callback_metrics["gradprobe/checks/parameter_margin_max"]) <= 1


class _SharedHead(nn.Module):
    """An output head holding the embedding *module* itself (one module, two paths)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, h):
        return h @ self.embedding.weight.T


class _SharedModuleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.encode = nn.Linear(3, 4)
        self.head = _SharedHead(self.embedding)

    def forward(self, x):
        return self.head(torch.tanh(self.encode(x)))


def test_a_shared_submodule_is_left_exactly_as_it_was_and_checked_as_one_parameter():
    torch.manual_seed(0)
    model = _SharedModuleModel()
    weight = model.embedding.weight
    report = probe(model, torch.randn(4, 3))
    assert model.embedding.weight is weight and model.head.embedding.weight is weight  # the same Parameter
    assert weight.dtype == torch.float32 and weight.requires_grad
    assert report.ok and report.parameter_check.frozen == 0
    assert report.parameter_check.parameters == sum(p.numel() for p in model.parameters())
    model(torch.randn(2, 3)).sum().backward()  # training goes on
    assert weight.grad is not None


def test_a_big_models_signs_moves_and_reductions_agree(monkeypatch):
    """Directions drawn again a chunk at a time (a big model's path), on tensors whose sizes are not multiples of
    the eight signs a random byte gives: the move and the reduction read the same direction."""
    monkeypatch.setattr(parameters_module, "_KEPT_DIRECTION_BYTES", 0)
    monkeypatch.setattr(parameters_module, "_CHUNK", 5)
    model = nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 1))  # 28, 7, 7 and 1 weights
    function = build_parameter_function(model, forward=None, output=None)
    space = ParameterSpace(function, torch.float64, torch.Generator().manual_seed(0), 2)
    for i, source in enumerate(space.sources):
        for d in range(2):
            direction = space.direction(d, i, torch.float64)
            assert direction.shape == source.shape and set(direction.abs().unique().tolist()) == {space.sizes[i]}
            gradient = torch.randn(source.shape, dtype=torch.float64)
            along, square = space.reduce(i, gradient)
            assert along[d].item() == pytest.approx(float((gradient * direction).sum()), rel=1e-12)
            assert square.item() == pytest.approx(float(gradient.pow(2).sum()), rel=1e-12)
            moved = space.displace_(source.double().clone(), d, i, 1e-3)
            assert torch.allclose(moved, source.double() + 1e-3 * direction, rtol=0, atol=1e-15)
    signs = torch.cat([space.signs(d, i) for d in range(2) for i in range(len(space.sources))])
    assert 0.3 < signs.float().mean().item() < 0.7  # both signs drawn


@pytest.mark.parametrize("path", ["kept", "drawn"])
def test_an_embeddings_padding_row_is_not_moved(monkeypatch, path):
    """PyTorch gives an embedding's ``padding_idx`` row no gradient, on purpose; where pad tokens reach the outputs,
    moving that row moves the outputs. The check leaves the row where it is (it failed every probe), and a wrong
    gradient of the other rows is still caught, on a small model's kept directions and a big one's drawn ones."""
    if path == "drawn":
        monkeypatch.setattr(parameters_module, "_KEPT_DIRECTION_BYTES", 0)
    ids = torch.randint(1, 10, (8, 5), generator=torch.Generator().manual_seed(0))
    ids[:, 3:] = 0  # padding, not masked: it reaches the head
    for seed in range(3):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Embedding(10, 4, padding_idx=0), nn.Flatten(), nn.Linear(20, 3))
        report = probe(model, ids, seed=seed)
        assert report.ok and report.parameter_check.verdict is Verdict.PASS, str(report)
        wrong = nn.Sequential(FusedEmbedding(10, 4, scale=1.1), nn.Flatten(), nn.Linear(20, 3))
        wrong[0].padding_idx = 0
        assert probe(wrong, ids, seed=seed).parameter_check.verdict is Verdict.FAIL
