"""The bug zoo: correct models and models with a planted wrong backward, shared by tests and benchmarks."""

from __future__ import annotations

import torch
from torch import nn


def _mlp(n_in: int, width: int, n_out: int, act: type[nn.Module], dtype=torch.float32) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, width), act(), nn.Linear(width, width), act(), nn.Linear(width, n_out)).to(
        dtype
    )


class TanhFunction(torch.autograd.Function):
    """tanh with a hand-written backward (modern style, vmap-able); ``mode`` plants a bug."""

    @staticmethod
    def forward(x, mode):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mode = inputs[1]
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        g = grad * (1 - y * y)
        if ctx.mode == "scale":
            g = g * 1.1
        elif ctx.mode == "sign":
            g = torch.cat([-g[..., :1], g[..., 1:]], dim=-1)
        return g, None

    @staticmethod
    def vmap(info, in_dims, x, mode):
        return TanhFunction.apply(x.movedim(in_dims[0], 0) if in_dims[0] is not None else x, mode), 0


class ClassicMulTanh(torch.autograd.Function):
    """y = x * tanh(x), classic style (no setup_context): torch.func cannot run it."""

    @staticmethod
    def forward(ctx, x, drop_term):
        ctx.save_for_backward(x)
        ctx.drop_term = drop_term
        return x * torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        t = torch.tanh(x)
        full = t + x * (1 - t * t)
        return grad * (t if ctx.drop_term else full), None


class Act(nn.Module):
    def __init__(self, kind: str = "ok") -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "classic":
            return ClassicMulTanh.apply(x, False)
        if self.kind == "dropped-term":
            return ClassicMulTanh.apply(x, True)
        return TanhFunction.apply(x, self.kind)


class DetachMLP(nn.Module):
    """A residual block whose skip path is cut by a stray ``.detach()`` (in the forward of the gradient)."""

    def __init__(self, n_in: int, bug: bool) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(n_in, 16), nn.Tanh(), nn.Linear(16, n_in))
        self.head = nn.Linear(n_in, 3)
        self.bug = bug

    def forward(self, x):
        skip = x.detach() if self.bug else x
        # The value is the same either way; only the gradient path differs: y = x + f(x).
        return self.head(torch.tanh(skip + self.inner(x)))


class SmallCNN(nn.Module):
    def __init__(self, n_classes: int = 10, side: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(16 * (side // 4) ** 2, n_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class LSTMHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 16, batch_first=True, num_layers=2)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def _transformer(activation: str = "ok") -> nn.Module:
    act = nn.functional.relu if activation == "ok" else Act(activation)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True, activation=act)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return nn.Sequential(encoder, nn.Flatten(), nn.Linear(160, 4)).eval()


def _conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(4, 16, 5, padding=2),
        nn.GELU(),
        nn.Conv1d(16, 16, 3),
        nn.LayerNorm(30),
        nn.SiLU(),
        nn.AdaptiveMaxPool1d(4),
        nn.Flatten(),
        nn.Linear(64, 5),
    ).eval()


def _digits(seed: int) -> torch.Tensor:
    """Eight real 8x8 digit images: flat zero regions give exact max-pool ties at the sample itself."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[8 * seed : 8 * seed + 8], dtype=torch.float32)
    return images.unsqueeze(1) / 16.0


def correct_models(seed: int) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Correct models with inputs: none of them may ever be judged "fail"."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cnn = SmallCNN(side=12)
    with torch.no_grad():  # non-trivial running statistics, then eval mode
        cnn.train()
        cnn(torch.randn(32, 1, 12, 12, generator=g))
    cnn.eval()
    saturated = _mlp(6, 16, 2, nn.Tanh)
    with torch.no_grad():
        saturated[0].weight.mul_(8.0)
    scaled_out = _mlp(6, 16, 3, nn.Tanh)
    with torch.no_grad():
        scaled_out[-1].weight.mul_(1e6)
    digits_cnn = SmallCNN(side=8).eval()
    return {
        "digits-cnn-flat-regions": (digits_cnn, _digits(seed)),
        "transformer-encoder": (_transformer(), torch.randn(8, 10, 16, generator=g)),
        "lstm": (LSTMHead().eval(), torch.randn(8, 12, 6, generator=g)),
        "conv1d-gelu-layernorm": (_conv1d(), torch.randn(8, 4, 32, generator=g)),
        "tanh-mlp": (_mlp(10, 32, 3, nn.Tanh), torch.randn(8, 10, generator=g)),
        "relu-mlp": (_mlp(10, 32, 1, nn.ReLU), torch.randn(8, 10, generator=g)),
        "cnn-bn-eval": (cnn, torch.randn(8, 1, 12, 12, generator=g)),
        "float64-mlp": (
            _mlp(10, 32, 3, nn.Tanh, torch.float64),
            torch.randn(8, 10, generator=g, dtype=torch.float64),
        ),
        "custom-function": (
            nn.Sequential(nn.Linear(10, 16), Act("ok"), nn.Linear(16, 3)),
            torch.randn(8, 10, generator=g),
        ),
        "classic-function": (
            nn.Sequential(nn.Linear(10, 16), Act("classic"), nn.Linear(16, 3)),
            torch.randn(8, 10, generator=g),
        ),
        "saturated": (saturated, 3 * torch.randn(8, 6, generator=g)),
        "outputs-1e6": (scaled_out, torch.randn(8, 6, generator=g)),
        "deep-saturation": (_saturated("ok"), torch.randn(8, 6, generator=g)),
        "inputs-1e3": (_mlp(6, 16, 3, nn.ReLU), 1e3 * torch.randn(8, 6, generator=g)),
        "detach-free": (DetachMLP(10, bug=False), torch.randn(8, 10, generator=g)),
    }


def _saturated(kind: str) -> nn.Module:
    """Every tanh unit saturated at z ~ 11 (tanh' ~ 1e-9): input gradients sit near float64 round-off of the
    output at the usual step, so a check at that step cannot see a 10% error."""
    model = nn.Sequential(nn.Linear(6, 16), Act(kind), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].weight.mul_(0.1)
        model[0].bias.fill_(11.0)
    return model


def buggy_models(seed: int) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Models whose backward is wrong: every sample should be judged "fail"."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return {
        "scaled-1.1": (
            nn.Sequential(nn.Linear(10, 16), Act("scale"), nn.Linear(16, 3)),
            torch.randn(8, 10, generator=g),
        ),
        "sign-one-coordinate": (
            nn.Sequential(nn.Linear(10, 16), Act("sign"), nn.Linear(16, 3)),
            torch.randn(8, 10, generator=g),
        ),
        "dropped-product-term": (
            nn.Sequential(nn.Linear(10, 16), Act("dropped-term"), nn.Linear(16, 3)),
            torch.randn(8, 10, generator=g),
        ),
        "stray-detach": (DetachMLP(10, bug=True), torch.randn(8, 10, generator=g)),
        "transformer-ffn-scaled-1.1": (_transformer("scale"), torch.randn(8, 10, 16, generator=g)),
        "deep-saturation-scaled-1.1": (_saturated("scale"), torch.randn(8, 6, generator=g)),
    }


class CNN_FOR_DTYPE_TESTS(nn.Module):
    """Conv + BatchNorm + ReLU + max-pool, then a hand-written tanh (``kind`` may plant a bug)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(6 * 16, 16)
        self.act = Act(kind)
        self.head = nn.Linear(16, 5)
        self.eval()

    def forward(self, x):
        return self.head(self.act(self.fc(self.features(x).flatten(1))))
