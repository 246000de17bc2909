"""Engines, targets, projections, batch independence, health, side effects and input errors."""

import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from zoo import Act, SmallCNN, TanhFunction

from lightning_gradprobe import Verdict, jacobians, probe, saliency


def _loop_jacobians(model, x):
    """Independent oracle: one autograd.grad per sample and output, in a Python loop."""
    rows = []
    for sample in x:
        leaf = sample.unsqueeze(0).clone().requires_grad_()
        out = model(leaf).reshape(-1)
        rows.append(torch.stack([torch.autograd.grad(o, leaf, retain_graph=True)[0][0] for o in out]))
    return torch.stack(rows)


def test_func_engine_matches_loop_oracle_and_fallback():
    torch.manual_seed(0)
    model = SmallCNN(n_classes=5, side=8).eval()
    x = torch.randn(4, 1, 8, 8)
    expected = _loop_jacobians(model, x)
    torch.testing.assert_close(jacobians(model, x, engine="torch.func"), expected)
    torch.testing.assert_close(jacobians(model, x, engine="autograd"), expected)
    torch.testing.assert_close(jacobians(model, x, chunk_size=1), expected)


def test_torch_func_engine_falls_back_with_one_warning():
    model = nn.Sequential(nn.Linear(10, 16), Act("classic"), nn.Linear(16, 3))
    x = torch.randn(6, 10)
    with pytest.warns(RuntimeWarning, match="cannot run under torch.func"):
        report = probe(model, x, engine="torch.func")
    assert report.engine == "autograd" and "setup_context" in report.engine_note
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = probe(model, x, engine="torch.func")
        default = probe(model, x)
    assert again.verdicts == report.verdicts == default.verdicts == (Verdict.PASS,) * 6
    assert default.engine == "autograd" and default.engine_note is None


@pytest.mark.parametrize("name", ["scaled-1.1", "sign-one-coordinate", "stray-detach"])
def test_both_engines_reach_the_same_verdicts(name):
    from zoo import buggy_models, correct_models

    for model, x in (correct_models(3)["tanh-mlp"], buggy_models(3)[name]):
        func = probe(model, x, engine="torch.func")
        assert func.engine == "torch.func"
        assert func.verdicts == probe(model, x).verdicts
        torch.testing.assert_close(func.saliency, probe(model, x).saliency)


def test_targets_select_the_right_rows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))
    x = torch.randn(6, 5)
    full = _loop_jacobians(model, x)  # (6, 4, 5)
    predicted = model(x).argmax(1)
    rows = torch.arange(6)
    torch.testing.assert_close(saliency(model, x), full[rows, predicted])
    torch.testing.assert_close(saliency(model, x, target=2), full[:, 2])
    per_sample = torch.tensor([0, 1, 2, 3, 0, 1])
    torch.testing.assert_close(saliency(model, x, target=per_sample), full[rows, per_sample])
    torch.testing.assert_close(saliency(model, x, target=lambda out: out[:, 1] - out[:, 0]), full[:, 1] - full[:, 0])
    report = probe(model, x)  # target=None: every output compared; saliency of the predicted class
    assert report.n_outputs == 4 and not report.projected
    torch.testing.assert_close(report.saliency, full[rows, predicted])


def test_many_outputs_use_projections_and_still_catch_bugs():
    class Wide(nn.Module):
        def __init__(self, bug):
            super().__init__()
            self.a, self.b, self.bug = nn.Linear(6, 16), nn.Linear(16, 200), bug

        def forward(self, x):
            return TanhFunction.apply(self.b(self.a(x)), "scale" if self.bug else "ok")

    torch.manual_seed(0)
    x = torch.randn(8, 6)
    good = probe(Wide(False), x)
    assert good.projected and good.n_outputs == 5 and good.ok
    bad = probe(Wide(True), x)
    assert bad.projected and bad.verdicts == (Verdict.FAIL,) * 8


def test_tuple_and_dict_outputs_need_a_selector():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 3)

        def forward(self, x):
            h = self.body(x)
            return {"logits": h, "aux": h.sum(1)}

    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="pass `output=`"):
        probe(TwoHeads(), x)
    assert probe(TwoHeads(), x, output="logits").n_outputs == 3
    assert probe(TwoHeads(), x, output=lambda out: out["aux"]).n_outputs == 1


class Leaky(nn.Module):
    """Sample 2 sees sample 4's input: a batch-mixing bug."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 3)

    def forward(self, x):
        mixed = x.clone()
        mixed[2] = mixed[2] + 0.5 * x[4]
        return self.linear(mixed)


def test_batch_independence_finds_the_offending_pair():
    x = torch.randn(8, 5)
    assert probe(nn.Linear(5, 3), x).batch_independent is True
    report = probe(Leaky(), x)
    assert report.batch_independent is False and report.leaking_pairs == ((2, 4),)
    assert not report.ok and "not independent" in str(report)
    assert set(report.verdicts) == {Verdict.INCONCLUSIVE}


def test_batchnorm_on_batch_statistics_mixes_samples():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False))
    report = probe(model, torch.randn(6, 5))
    assert report.batch_independent is False
    assert len(report.leaking_pairs) == 30  # everyone reaches everyone


def test_gradient_health_nan_and_zeros():
    class NaNBackward(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            out = g * 2
            out[..., 0] = float("nan")
            return out

    class Model(nn.Module):
        def forward(self, x):
            return NaNBackward.apply(x).sum(1, keepdim=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = probe(Model(), torch.randn(4, 3))
    assert report.nonfinite_count.tolist() == [1, 1, 1, 1]
    assert report.verdicts == (Verdict.FAIL,) * 4 and not report.ok
    masked = probe(lambda t: (t * torch.tensor([1.0, 0.0, 0.0, 2.0])).sum(1, keepdim=True), torch.randn(3, 4))
    assert masked.zero_fraction.tolist() == [0.5, 0.5, 0.5]
    torch.testing.assert_close(masked.grad_norm, torch.full((3,), 5**0.5, dtype=torch.float64))


def test_check_samples_subset():
    model = nn.Linear(4, 2)
    report = probe(model, torch.randn(10, 4), check_samples=3)
    assert len(report.checked) == 3
    assert sum(v is Verdict.UNCHECKED for v in report.verdicts) == 7
    assert probe(model, torch.randn(10, 4), check_samples=[1, 5]).checked.tolist() == [1, 5]


def _state(model):
    return {
        "modes": [m.training for m in model.modules()],
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
    }


def _assert_same(before, after):
    assert before["modes"] == after["modes"]
    for key, value in before["tensors"].items():
        assert torch.equal(value, after["tensors"][key]), key
    for a, b in zip(before["grads"], after["grads"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert before["requires_grad"] == after["requires_grad"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert np.array_equal(before["numpy_rng"], after["numpy_rng"])
    assert before["python_rng"] == after["python_rng"]


class Noisy(nn.Module):
    """Draws from every global RNG in its forward, and has Dropout and BatchNorm."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x):
        random.random()
        np.random.rand()
        torch.rand(1)
        return self.net(x)


def test_no_side_effects_in_train_mode_with_mixed_submodule_modes():
    torch.manual_seed(0)
    model = Noisy().train()
    model.net[2].eval()  # a submodule in its own mode must keep it
    model.net[0].weight.requires_grad_(False)
    model(torch.randn(5, 6)).sum().backward()  # existing .grad must survive untouched
    x = torch.randn(5, 6)
    x_before = x.clone()
    before = _state(model)
    report = probe(model, x)
    _assert_same(before, _state(model))
    assert torch.equal(x, x_before)
    assert report.ok, str(report)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_works_under_no_grad_and_inference_mode(context):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    reference = probe(model, torch.ones(4, 6))
    manager = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with manager:
        x = torch.ones(4, 6)  # an inference tensor under inference_mode
        report = probe(model, x)
    assert report.verdicts == reference.verdicts == (Verdict.PASS,) * 4
    assert report.saliency.abs().sum() > 0
    torch.testing.assert_close(report.saliency, reference.saliency)


@pytest.mark.parametrize(
    ("inputs", "kwargs", "error", "match"),
    [
        (torch.arange(6).reshape(2, 3), {}, TypeError, "embedding"),
        (torch.randn(0, 3), {}, ValueError, "non-empty batch"),
        (torch.tensor([[1.0, float("nan"), 0.0]]), {}, ValueError, "NaN/Inf"),
        (torch.randn(2, 3), {"target": 7}, ValueError, r"`target`=7 is out of range.*\[0, 1\]"),
        (torch.randn(2, 3), {"target": "max"}, ValueError, "'argmax'"),
        (torch.randn(2, 3), {"n_directions": 0}, ValueError, "n_directions"),
        (torch.randn(2, 3), {"engine": "jax"}, ValueError, "engine"),
        (torch.randn(2, 3), {"check_samples": [5]}, ValueError, "check_samples"),
        (torch.randn(2, 3), {"target": torch.tensor([0, 1, 1])}, ValueError, r"shape \(2,\)"),
    ],
)
def test_bad_input_gets_a_clear_error(inputs, kwargs, error, match):
    with pytest.raises(error, match=match):
        probe(nn.Linear(3, 2), inputs, **kwargs)


def test_outputs_without_batch_dimension():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="without the batch dimension"):
        probe(lambda x: model(x).sum(), torch.randn(4, 3))


def test_memory_budget_switches_to_projections(monkeypatch):
    import lightning_gradprobe.core._forward as forward_module

    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
    x = torch.randn(4, 3, 4, 4)
    assert not probe(model, x).projected  # 4 x 10 x 48 floats: well within the budget
    monkeypatch.setattr(forward_module, "MAX_JACOBIAN_BYTES", 4 * 48 * 4 * 5)  # room for 5 output rows
    report = probe(model, x)
    assert report.projected and report.n_outputs == 5 and report.ok


def test_jacobians_stay_full_whatever_the_budget(monkeypatch):
    import lightning_gradprobe.core._forward as forward_module

    monkeypatch.setattr(forward_module, "MAX_JACOBIAN_BYTES", 16)
    model = nn.Linear(6, 3)
    x = torch.randn(4, 6)
    torch.testing.assert_close(jacobians(model, x), model.weight.detach().expand(4, 3, 6))


def test_an_error_without_a_message_is_said_not_raised():
    class NeedsThree(nn.Module):  # an exception whose message is empty
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x):
            if x.shape[0] <= 2:
                raise RuntimeError
            return self.linear(x)

    report = probe(NeedsThree(), torch.randn(6, 4))  # the parameter check runs on two samples: it cannot
    assert report.ok and report.parameter_check is None
    assert "parameter gradients not checked: RuntimeError" in report.notes


def test_float32_constants_do_not_make_a_float64_reference_weaker():
    class WithConstants(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            mask = torch.ones(3).bool() & (torch.arange(3).float() >= 0)  # made in float32, no data
            return torch.tanh(self.linear(x)) * mask

    assert probe(WithConstants(), torch.randn(5, 4)).fd_dtype == torch.float64
