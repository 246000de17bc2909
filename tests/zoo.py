"""The bug zoo: correct models and models with a planted wrong backward, shared by tests and benchmarks."""

from __future__ import annotations

from typing import Any

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


# --- Bug classes of hand-written kernels: each wrong kernel beside its correct twin -----------------------------


class ScaledReLU(torch.autograd.Function):
    """ReLU whose backward is multiplied by ``scale`` (1.0: correct). Locally linear: no curvature to hide in."""

    @staticmethod
    def forward(x, scale):
        return x.clamp_min(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0).to(grad.dtype) * ctx.scale, None

    @staticmethod
    def vmap(info, in_dims, x, scale):
        return ScaledReLU.apply(x.movedim(in_dims[0], 0) if in_dims[0] is not None else x, scale), 0


class ReLUAct(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return ScaledReLU.apply(x, self.scale)


class ResidualReLUNet(nn.Module):
    """Conv -> [conv, ReLU, conv] + skip -> max-pool -> linear: piecewise linear, kinks and ties everywhere."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), ReLUAct(scale), nn.Conv2d(8, 8, 3, padding=1))
        self.act = ReLUAct(scale)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        h = self.stem(x)
        h = self.pool(self.act(h + self.block(h)))
        return self.head(h.flatten(1))


class FusedLogSoftmax(torch.autograd.Function):
    """log_softmax over the last dim; ``batch_bug`` reduces the backward over the batch axis (dim 0) instead."""

    @staticmethod
    def forward(ctx, x, batch_bug):
        y = x - x.logsumexp(-1, keepdim=True)
        ctx.save_for_backward(y)
        ctx.batch_bug = batch_bug
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        total = grad.sum(0, keepdim=True) if ctx.batch_bug else grad.sum(-1, keepdim=True)
        return grad - y.exp() * total, None


class LogSoftmaxHead(nn.Module):
    def __init__(self, batch_bug: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 6))
        self.batch_bug = batch_bug

    def forward(self, x):
        return FusedLogSoftmax.apply(self.body(x), self.batch_bug)


class ProductPool(torch.autograd.Function):
    """Product over the last dim. ``naive``: backward ``grad * prod / x``, NaN where an input is exactly 0
    although the product is smooth (multilinear) there; else the exact leave-one-out products."""

    @staticmethod
    def forward(ctx, x, naive):
        ctx.save_for_backward(x)
        ctx.naive = naive
        return x.prod(-1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if ctx.naive:
            return grad.unsqueeze(-1) * x.prod(-1, keepdim=True) / x, None
        n = x.shape[-1]
        others = torch.stack([torch.cat([x[..., :i], x[..., i + 1 :]], -1).prod(-1) for i in range(n)], -1)
        return grad.unsqueeze(-1) * others, None


class ProductModel(nn.Module):
    """A learned per-feature scale, then products over groups of three features (inputs hold exact zeros)."""

    def __init__(self, naive: bool) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 12))
        self.head = nn.Linear(4, 2)
        self.naive = naive

    def forward(self, x):
        groups = (x * self.scale).reshape(x.shape[0], 4, 3)
        return self.head(ProductPool.apply(groups, self.naive))


def _with_zeros(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Zero about a third of the entries, and at least one per sample, as padding or masks do in real data."""
    keep = torch.rand(x.shape, generator=generator) > 1 / 3
    keep[torch.arange(x.shape[0]), torch.randint(x.shape[1], (x.shape[0],), generator=generator)] = False
    return x * keep


class TanhGELU(torch.autograd.Function):
    """The tanh approximation of GELU; ``exact_derivative`` pairs it with the exact GELU's derivative (up to
    5.6e-4 off), as a hand-fused kernel that mixes the two formulas would."""

    @staticmethod
    def forward(ctx, x, exact_derivative):
        ctx.save_for_backward(x)
        ctx.exact_derivative = exact_derivative
        return nn.functional.gelu(x, approximate="tanh")

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if ctx.exact_derivative:
            cdf = 0.5 * (1 + torch.erf(x / 2**0.5))
            pdf = torch.exp(-0.5 * x * x) / (2 * torch.pi) ** 0.5
            return grad * (cdf + x * pdf), None
        c = (2 / torch.pi) ** 0.5
        inner = c * (x + 0.044715 * x**3)
        t = torch.tanh(inner)
        return grad * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)), None


class GELUModel(nn.Module):
    def __init__(self, exact_derivative: bool) -> None:
        super().__init__()
        self.inner = nn.Linear(10, 32)
        self.head = nn.Linear(32, 4)
        self.exact_derivative = exact_derivative

    def forward(self, x):
        return self.head(TanhGELU.apply(self.inner(x), self.exact_derivative))


class SignedSquare(torch.autograd.Function):
    """``x |x|`` with its exact derivative ``2 |x|``: odd and twice differentiable only away from 0, so at an exact
    zero the stencil's second difference vanishes while the central difference is off by O(h)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x.abs()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 2 * x.abs()


class SignedSquareNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.head(SignedSquare.apply(x))


class UnitNormalize(nn.Module):
    """``x / |x|`` along a dimension of size 1: the Jacobian is exactly zero (the output is a sign)."""

    def forward(self, x):
        return nn.functional.normalize(x.unsqueeze(-1), dim=-1).squeeze(-1) * 3.0


def kernel_bug_classes(seed: int) -> dict[str, tuple[tuple[nn.Module, torch.Tensor], tuple[nn.Module, torch.Tensor]]]:
    """For each bug class: (correct twin, wrong kernel), each with its inputs (the same inputs for both)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classes = {}
    relu_ok, relu_bad = ResidualReLUNet(1.0).eval(), ResidualReLUNet(1.1).eval()
    relu_bad.load_state_dict(relu_ok.state_dict())
    digits = _digits(seed)  # flat zero regions: exact max-pool ties at the sample
    classes["relu-maxpool-residual-x1.1"] = ((relu_ok, digits), (relu_bad, digits))
    soft_ok, soft_bad = LogSoftmaxHead(False), LogSoftmaxHead(True)
    soft_bad.load_state_dict(soft_ok.state_dict())
    x = torch.randn(8, 10, generator=g)
    classes["log-softmax-backward-sums-over-batch"] = ((soft_ok, x), (soft_bad, x))
    prod_ok, prod_bad = ProductModel(False), ProductModel(True)
    prod_bad.load_state_dict(prod_ok.state_dict())
    x = _with_zeros(torch.randn(8, 12, generator=g), g)
    classes["product-backward-nan-at-zero"] = ((prod_ok, x), (prod_bad, x))
    gelu_ok, gelu_bad = GELUModel(False), GELUModel(True)
    gelu_bad.load_state_dict(gelu_ok.state_dict())
    x = 2 * torch.randn(8, 10, generator=g)
    classes["tanh-gelu-with-exact-derivative"] = ((gelu_ok, x), (gelu_bad, x))
    return classes


def exact_zero_models(seed: int) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Correct models whose Jacobian is zero in exact arithmetic: never a "fail" (for a vanishing one, every tanh unit
    saturated, see ``correct_models``' "deep-saturation")."""
    g = torch.Generator().manual_seed(seed)
    dead = _mlp(6, 16, 3, nn.ReLU)
    with torch.no_grad():
        dead[0].bias.fill_(-50.0)  # every unit dead: the output is a constant
    torch.manual_seed(seed)
    return {
        "x|x|-at-exact-zeros": (SignedSquareNet(), _with_zeros(torch.randn(8, 6, generator=g), g)),
        "normalize-size-1": (UnitNormalize(), torch.randn(8, 5, generator=g)),
        "all-relu-dead": (dead, torch.randn(8, 6, generator=g)),
    }


# --- Second order: double backwards, each wrong one beside its correct twin -------------------------------------


class SoftplusFunction(torch.autograd.Function):
    """softplus with a hand-written backward (modern style). ``detached``: the backward's sigmoid is computed
    from a detached input (first derivative right, second derivative zero)."""

    @staticmethod
    def forward(x, detached):
        return nn.functional.softplus(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.detached = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x.detach() if ctx.detached else x), None


class OnceSoftplus(torch.autograd.Function):
    """softplus whose backward is ``@once_differentiable`` (classic style): no double backward at all."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return nn.functional.softplus(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


class TanhWithBackward(torch.autograd.Function):
    """tanh whose backward is itself a custom Function with a hand-written double backward (classic style).
    ``mode``: "ok"; "sign" flips the sign of the ``d(1 - y^2)/dy = -2y`` term; "missing" drops that term."""

    @staticmethod
    def forward(ctx, x, mode):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        ctx.mode = mode
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return _TanhBackward.apply(grad, y, ctx.mode), None


class _TanhBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, y, mode):
        ctx.save_for_backward(grad, y)
        ctx.mode = mode
        return grad * (1 - y * y)

    @staticmethod
    def backward(ctx, g):
        grad, y = ctx.saved_tensors
        dy = (2 if ctx.mode == "sign" else -2) * y * grad * g  # d/dy [grad (1 - y^2)] = -2 y grad
        if ctx.mode == "missing":
            dy = None
        # y = tanh(x) is itself a function of x: route through the saved output's own graph (dy/dx = 1 - y^2).
        return g * (1 - y * y), dy, None


class SecondOrderAct(nn.Module):
    def __init__(self, kind: str = "ok") -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind.startswith("tanh-"):
            return TanhWithBackward.apply(x, self.kind.removeprefix("tanh-"))
        if self.kind == "once":
            return OnceSoftplus.apply(x)
        return SoftplusFunction.apply(x, self.kind == "detached")


class LinearFunction(torch.autograd.Function):
    """``x @ W^T + b`` with a hand-written backward; ``detached_weight`` computes the input gradient from a
    detached ``W``: every first derivative and the input Hessian stay right, the mixed term a gradient penalty
    sends to ``W`` (``d/dW grad_x``) is lost."""

    @staticmethod
    def forward(ctx, x, weight, bias, detached_weight):
        ctx.save_for_backward(x, weight)
        ctx.detached_weight = detached_weight
        return x @ weight.T + bias

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        w = weight.detach() if ctx.detached_weight else weight
        return grad @ w, grad.transpose(-1, -2) @ x, grad.sum(0), None


class PenaltyLinear(nn.Linear):
    def __init__(self, n_in: int, n_out: int, detached_weight: bool) -> None:
        super().__init__(n_in, n_out)
        self.detached_weight = detached_weight

    def forward(self, x):
        return LinearFunction.apply(x, self.weight, self.bias, self.detached_weight)


def _critic(detached_weight: bool) -> nn.Module:
    """A WGAN-GP-style critic whose first layer is a hand-written linear layer."""
    return nn.Sequential(PenaltyLinear(6, 32, detached_weight), nn.Tanh(), nn.Linear(32, 1))


def _pinn(kind: str) -> nn.Module:
    """A physics-informed MLP u(x) for a 1-D problem: its loss would use d2u/dx2 from autograd."""
    return nn.Sequential(
        nn.Linear(1, 24), SecondOrderAct(kind), nn.Linear(24, 24), SecondOrderAct(kind), nn.Linear(24, 1)
    )


def second_order_models(
    seed: int,
) -> tuple[dict[str, tuple[nn.Module, torch.Tensor]], dict[str, tuple[nn.Module, torch.Tensor]]]:
    """(correct, wrong) models for the double backward; every wrong one has a correct first derivative."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    points = torch.rand(8, 1, generator=g) * 2 - 1
    tabular = torch.randn(8, 6, generator=g)
    critic = nn.Sequential(nn.Linear(6, 32), nn.LeakyReLU(0.2), nn.Linear(32, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    correct = {
        "tanh-mlp": (_mlp(6, 24, 3, nn.Tanh), tabular),
        "softplus-mlp": (_mlp(6, 24, 3, nn.Softplus), tabular),
        "gelu-mlp": (_mlp(6, 24, 3, nn.GELU), tabular),
        "relu-mlp (zero Hessian)": (_mlp(6, 24, 3, nn.ReLU), tabular),
        "gradient-penalty critic (LeakyReLU)": (critic, tabular),
        "gradient-penalty critic (hand-written linear)": (_critic(False), tabular),
        "saturated tanh": (_saturated("ok"), tabular),
        "pinn softplus Function": (_pinn("ok"), points),
        "pinn tanh with hand-written double backward": (_pinn("tanh-ok"), points),
    }
    wrong = {
        "pinn detached intermediate": (_pinn("detached"), points),
        "pinn once_differentiable": (_pinn("once"), points),
        "pinn wrong second-derivative sign": (_pinn("tanh-sign"), points),
        "pinn double backward missing a term": (_pinn("tanh-missing"), points),
        "mlp detached intermediate": (
            nn.Sequential(nn.Linear(6, 24), SecondOrderAct("detached"), nn.Linear(24, 3)),
            tabular,
        ),
    }
    wrong["critic linear backward from a detached weight (mixed term)"] = (_critic(True), tabular)
    return correct, wrong


# --- Weight-only bugs: the input gradient is right, the gradient training consumes is not ----------------------


def _one_entry_doubled(grad_weight):
    grad_weight = grad_weight.clone()
    grad_weight[1, 2] *= 2
    return grad_weight


def _first_row_negated(grad_weight):
    grad_weight = grad_weight.clone()
    grad_weight[0] = -grad_weight[0]
    return grad_weight


# Weight-only bugs of WeightLinear: what each does to (grad_W, grad_b); None drops that gradient (a detached use).
LINEAR_WEIGHT_BUGS = {
    "scale": lambda w, b: (1.1 * w, b),
    "transpose": lambda w, b: (w.T, b),
    "scale 1.01": lambda w, b: (1.01 * w, b),
    "scale 1.001": lambda w, b: (1.001 * w, b),
    "one entry x2": lambda w, b: (_one_entry_doubled(w), b),
    "row sign": lambda w, b: (_first_row_negated(w), b),
    "weight detached": lambda w, b: (None, b),
    "bias x1.1": lambda w, b: (w, 1.1 * b),
    "bias detached": lambda w, b: (w, None),
}


class WeightLinear(torch.autograd.Function):
    """``x @ W^T + b``; ``bug``: a key of ``LINEAR_WEIGHT_BUGS`` (``"scale"``: ``grad_W`` x 1.1, ``"transpose"``:
    ``grad_W`` transposed, ...), or None: the input gradient is right in every case."""

    @staticmethod
    def forward(x, weight, bias, bug):
        return x @ weight.T + bias

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.bug = inputs[3]

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_weight = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        if ctx.bug is not None:
            grad_weight, grad_bias = LINEAR_WEIGHT_BUGS[ctx.bug](grad_weight, grad_bias)
        return grad @ weight, grad_weight, grad_bias, None


class FusedLinear(nn.Linear):
    def __init__(self, n_in: int, n_out: int, bug: str | None = None) -> None:
        super().__init__(n_in, n_out)
        self.bug = bug

    def forward(self, x):
        return WeightLinear.apply(x, self.weight, self.bias, self.bug)


class WeightConv(torch.autograd.Function):
    """``conv2d(x, W)`` (padding 1) with ``grad_W`` scaled by ``scale``."""

    @staticmethod
    def forward(x, weight, scale):
        return nn.functional.conv2d(x, weight, padding=1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.scale = inputs[2]

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad, padding=1)
        grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad, padding=1)
        return grad_x, ctx.scale * grad_w, None


class FusedConv(nn.Conv2d):
    def __init__(self, n_in: int, n_out: int, scale: float = 1.0) -> None:
        super().__init__(n_in, n_out, 3, padding=1, bias=False)
        self.scale = scale

    def forward(self, x):
        return WeightConv.apply(x, self.weight, self.scale)


class WeightEmbedding(torch.autograd.Function):
    """``W[ids]`` with a hand-written backward scattering into ``W``, scaled by ``scale``."""

    @staticmethod
    def forward(ids, weight, scale):
        return weight[ids]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.rows, ctx.scale = inputs[1].shape[0], inputs[2]

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        grad_w = torch.zeros((ctx.rows, flat.shape[1]), dtype=grad.dtype).index_add(0, ids.reshape(-1), flat)
        return None, ctx.scale * grad_w, None


class FusedEmbedding(nn.Embedding):
    def __init__(self, rows: int, width: int, scale: float = 1.0) -> None:
        super().__init__(rows, width)
        self.scale = scale

    def forward(self, ids):
        return WeightEmbedding.apply(ids, self.weight, self.scale)


class WeightLayerNorm(torch.autograd.Function):
    """Layer norm with an affine weight whose gradient is scaled by ``scale`` (input and bias gradients right)."""

    @staticmethod
    def forward(x, weight, bias, scale):
        return nn.functional.layer_norm(x, x.shape[-1:], weight, bias, 1e-5)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.scale = inputs[3]

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        normed = (x - mean) / torch.sqrt(var + 1e-5)
        g = grad * weight
        grad_x = (g - g.mean(-1, keepdim=True) - normed * (g * normed).mean(-1, keepdim=True)) / torch.sqrt(var + 1e-5)
        flat = grad.reshape(-1, grad.shape[-1])
        grad_w = (flat * normed.reshape(-1, normed.shape[-1])).sum(0)
        return grad_x, ctx.scale * grad_w, flat.sum(0), None


class FusedLayerNorm(nn.LayerNorm):
    def __init__(self, width: int, scale: float = 1.0) -> None:
        super().__init__(width)
        self.scale = scale

    def forward(self, x):
        return WeightLayerNorm.apply(x, self.weight, self.bias, self.scale)


class TiedTokenModel(nn.Module):
    """An embedding tied to its output head; the head is a hand-written linear (``bug`` as in ``WeightLinear``)."""

    def __init__(self, bug: str | None = None, vocabulary: int = 12, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.mix = nn.Linear(width, width)
        self.head = FusedLinear(width, vocabulary, bug)
        self.head.weight = self.embed.weight  # tied: one parameter, two uses

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))).mean(1))


class ConvNet(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.conv = FusedConv(1, 4, scale)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class TokenNet(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.embed = FusedEmbedding(16, 8, scale)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)).mean(1))


def weight_bug_classes(seed: int) -> dict[str, tuple[tuple[nn.Module, Any], tuple[nn.Module, Any], str]]:
    """For each weight-only bug: (correct twin, wrong kernel, the culprit's module name), same weights and inputs."""
    g = torch.Generator().manual_seed(seed)

    def twins(make: Any, correct: Any, wrong: Any, x: Any, culprit: str) -> tuple[Any, Any, str]:
        torch.manual_seed(seed)
        ok, bad = make(correct).eval(), make(wrong).eval()
        bad.load_state_dict(ok.state_dict())
        return (ok, x), (bad, x), culprit

    mlp = lambda bug: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), FusedLinear(8, 8, bug), nn.Tanh(), nn.Linear(8, 3))  # noqa: E731
    norm = lambda scale: nn.Sequential(nn.Linear(6, 8), FusedLayerNorm(8, scale), nn.Tanh(), nn.Linear(8, 3))  # noqa: E731
    ids = torch.randint(0, 12, (8, 5), generator=g)
    return {
        "linear-grad-weight-x1.1": twins(mlp, None, "scale", torch.randn(8, 6, generator=g), "2"),
        "linear-grad-weight-transposed": twins(mlp, None, "transpose", torch.randn(8, 6, generator=g), "2"),
        "conv-grad-weight-x1.1": twins(ConvNet, 1.0, 1.1, torch.randn(8, 1, 6, 6, generator=g), "conv"),
        "embedding-grad-weight-x1.1": twins(TokenNet, 1.0, 1.1, torch.randint(0, 16, (8, 5), generator=g), "embed"),
        "layernorm-grad-affine-weight-x1.1": twins(norm, 1.0, 1.1, torch.randn(8, 6, generator=g), "1"),
        "tied-embedding-head-grad-weight-x1.1": twins(TiedTokenModel, None, "scale", ids, "head"),
    }
