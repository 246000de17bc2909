"""Localization: the wrong submodule named exactly and first; wrong weight gradients; forward mode."""

import warnings

import pytest
import torch
from torch import nn
from zoo import Act, correct_models

from lightning_gradprobe import CulpritKind, Verdict, probe
from lightning_gradprobe.core.localize import localize


class Block(nn.Module):
    def __init__(self, kind: str = "ok"):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.act = Act(kind)

    def forward(self, x):
        return self.act(self.lin(x))


class Encoder(nn.Module):
    def __init__(self, bad: str):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block(), Block(bad)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Deep(nn.Module):
    def __init__(self, bad: str):
        super().__init__()
        self.encoder = Encoder(bad)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


@pytest.mark.parametrize("bad", ["scale", "dropped-term"])  # modern-style and classic-style Function
def test_culprit_three_levels_deep_is_named_first(bad):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = probe(Deep(bad), torch.randn(6, 8), localize=True)
    assert set(report.verdicts) == {Verdict.FAIL}
    first = report.culprits[0]
    assert first.module == "encoder.blocks.2.act" and first.kind == "input" and first.module_type == "Act"
    assert not first.explained_by
    containers = [c.module for c in report.culprits[1:]]
    assert containers == ["encoder.blocks.2", "encoder", ""]  # each explained by the failing child
    assert all("encoder.blocks.2.act" in c.explained_by for c in report.culprits[1:])
    assert "encoder.blocks.0" not in {c.module for c in report.culprits}
    assert "culprit: encoder.blocks.2.act (Act)" in str(report)


class WeightGradBug(torch.autograd.Function):
    """A linear layer whose input gradient is right and whose weight gradient is 10% off."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return x @ weight.T + bias

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight
        grad_w = 1.1 * grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_w, grad.reshape(-1, grad.shape[-1]).sum(0)


class CustomLinear(nn.Linear):
    def forward(self, x):
        return WeightGradBug.apply(x, self.weight, self.bias)


class WeightBugModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), CustomLinear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(x))


def test_wrong_weight_gradient_missed_by_input_check_caught_by_parameter_check():
    torch.manual_seed(0)
    x = torch.randn(6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        input_only = probe(WeightBugModel(), x, check_parameters=False)
        with_parameters = probe(WeightBugModel(), x)  # the default checks parameter gradients
    assert input_only.ok and set(input_only.verdicts) == {Verdict.PASS}  # the input gradient is right
    assert [(c.module, c.kind) for c in with_parameters.culprits] == [("body.2", "parameter")]
    assert with_parameters.culprits[0].relative_error > 0.05
    assert not with_parameters.ok and "parameter gradients disagree" in str(with_parameters)


@pytest.mark.parametrize("name", ["tanh-mlp", "cnn-bn-eval", "classic-function", "digits-cnn-flat-regions"])
def test_correct_models_name_no_culprit(name):
    for seed in range(3):
        model, x = correct_models(seed)[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            found = localize(model, x[:1], check=probe, parameters=True, seed=seed)
        assert found.culprits == (), [str(c) for c in found.culprits]
        assert len(found.checked) >= 3


class BadJvp(torch.autograd.Function):
    """tanh with a right backward and a wrong forward-mode rule."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)

    @staticmethod
    def jvp(ctx, tangent):
        (y,) = ctx.saved_tensors
        return 1.1 * tangent * (1 - y * y)


class JvpModel(nn.Module):
    def __init__(self, n_outputs: int = 2):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, n_outputs)

    def forward(self, x):
        return self.b(BadJvp.apply(self.a(x)))


def test_forward_mode_disagreement_is_its_own_finding():
    torch.manual_seed(0)
    x = torch.randn(5, 5)
    report = probe(JvpModel(), x, check_forward_mode=True)
    assert set(report.verdicts) == {Verdict.PASS}  # reverse mode is right
    assert report.forward_mode_mismatch == (0, 1, 2, 3, 4) and not report.ok
    assert "forward mode (jvp) disagrees" in str(report)
    healthy = probe(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)), x, check_forward_mode=True)
    assert healthy.forward_mode_mismatch == () and healthy.ok
    classic, y = correct_models(0)["classic-function"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        unsupported = probe(classic, y, check_forward_mode=True)
    assert unsupported.forward_mode_mismatch is None and any("forward mode not checked" in n for n in unsupported.notes)


def test_forward_mode_with_gradients_whose_squares_underflow():
    """float64 gradients near 1e-170: the tangent along the reverse-mode row is scaled before its RMS is taken (its
    squares underflowed to 0, the tangent became NaN, and every sample was reported as a forward-mode mismatch)."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3).double()

        def forward(self, x):
            return torch.exp(self.linear(x) - 460.0)

    torch.manual_seed(0)
    x = torch.randn(4, 4, dtype=torch.float64)
    report = probe(Tiny(), x, check_forward_mode=True, check_parameters=False)
    assert report.forward_mode_mismatch == () and report.ok, str(report)


def test_forward_mode_through_output_projections():
    """Ten outputs: the check sees them through random output projections (the model's dtype computes one)."""
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    report = probe(JvpModel(n_outputs=10), x, check_forward_mode=True)
    assert set(report.verdicts) == {Verdict.PASS} and report.forward_mode_mismatch == (0, 1, 2, 3, 4, 5)
    healthy = probe(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 10)), x, check_forward_mode=True)
    assert healthy.forward_mode_mismatch == () and healthy.ok


def test_localization_budget_is_reported():
    torch.manual_seed(0)
    report = probe(Deep("scale"), torch.randn(4, 8), localize=True, localize_budget=(6, 30.0))
    assert "module budget reached: checked 6 of 12" in report.localization_note
    # Deepest first: the six leaves of the blocks used the budget, and the culprit is among them.
    assert [c.module for c in report.culprits] == ["encoder.blocks.2.act"]


class LitWrapper(__import__("lightning.pytorch", fromlist=["LightningModule"]).LightningModule):
    """Digits through a given body: (N, 1, 8, 8) -> flatten -> Linear(64, 8) -> body -> logits."""

    def __init__(self, body: nn.Module, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(64, width))
        self.net = body
        self.out = nn.Linear(body_out(body, width), 10)

    def forward(self, x):
        return self.out(self.net(self.stem(x)))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        from lit_models import digits

        x, y = digits(160)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:128], y[:128]), batch_size=32)

    def val_dataloader(self):
        from lit_models import digits

        x, y = digits(160)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[128:], y[128:]), batch_size=32)


def body_out(body: nn.Module, width: int) -> int:
    with torch.no_grad():
        return body(torch.zeros(1, width)).shape[-1]


def test_callback_alert_names_the_culprit(tmp_path):
    from lit_models import trainer

    from lightning_gradprobe import GradProbe
    from lightning_gradprobe.alerts import AlertCondition

    received = []
    callback = GradProbe(on_alert=received.append, max_overhead=None)
    trainer(tmp_path, [callback], max_epochs=1).fit(LitWrapper(Encoder("scale")))
    (alert,) = received
    assert alert.condition is AlertCondition.FAILED_CHECKS
    assert [c.label for c in alert.culprits] == ["net.blocks.2.act (Act, input)"]
    assert alert.culprits[0].kind is CulpritKind.INPUT
    assert "culprit: net.blocks.2.act (Act, input)" in alert.message


def test_callback_parameter_gradient_alert(tmp_path):
    from lit_models import trainer

    from lightning_gradprobe import GradProbe
    from lightning_gradprobe.alerts import AlertCondition

    received = []
    body = nn.Sequential(nn.Tanh(), CustomLinear(8, 8), nn.Tanh())
    callback = GradProbe(on_alert=received.append, max_overhead=None, check_parameters=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer(tmp_path, [callback], max_epochs=1).fit(LitWrapper(body))
    assert [a.condition for a in received] == [AlertCondition.PARAMETER_GRADIENTS]
    assert [c.label for c in received[0].culprits] == ["net.1 (CustomLinear, parameter)"]


def test_localization_failure_keeps_the_verdicts():
    class HookHostile(nn.Module):
        """Refuses to run with forward hooks attached (a stand-in for exotic modules localization cannot
        record): the verdicts must survive, the failure be noted."""

        def __init__(self):
            super().__init__()
            self.inner = Deep("scale")

        def forward(self, x):
            if self._forward_pre_hooks:
                raise RuntimeError("no hooks, please")
            return self.inner(x)

    torch.manual_seed(0)
    report = probe(HookHostile(), torch.randn(4, 8), localize=True, check_batch=False)
    assert set(report.verdicts) == {Verdict.FAIL}
    assert report.culprits == () and "localization failed" in report.localization_note


class _MaskedFillForgetsMask(torch.autograd.Function):
    """``x.masked_fill(~mask, 0)`` whose backward forgets the mask."""

    @staticmethod
    def forward(x, mask):
        return x.masked_fill(~mask, 0.0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _RootBug(nn.Module):
    """The wrong backward sits in the root's own forward, between its submodules."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, features, mask):
        hidden = _MaskedFillForgetsMask.apply(torch.tanh(self.proj(features)), mask)
        return self.head(hidden.mean(1))


def _root_bug_inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, 6, generator=generator), torch.rand(6, 5, 8, generator=generator) > 0.3


@pytest.mark.parametrize("convention", ["dict", "tuple", "keywords", "layer"])
def test_the_root_itself_is_named_for_every_calling_convention(convention):
    torch.manual_seed(0)
    model = _RootBug().eval()
    features, mask = _root_bug_inputs()
    arguments = {
        "dict": ({"features": features, "mask": mask}, {}),
        "tuple": ((features, mask), {}),
        "keywords": (
            features,
            {"forward": lambda m, x: m(features=x, mask=(x.sum(-1, keepdim=True) > 0).expand(-1, -1, 8))},
        ),
        "layer": ({"features": features, "mask": mask}, {"layer": "proj"}),
    }[convention]
    report = probe(model, arguments[0], localize=True, **arguments[1])
    assert report.counts["fail"] == 6
    assert [(c.module, c.kind) for c in report.culprits] == [("", CulpritKind.INPUT)], report.localization_note
