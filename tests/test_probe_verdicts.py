"""Verdicts in both directions: no false alarms on correct models, planted bugs caught."""

import warnings

import pytest
import torch
from side_by_side import BACKGROUND
from torch import nn
from zoo import Act, buggy_models, correct_models, exact_zero_models, kernel_bug_classes

from lightning_gradprobe import GradientCheckError, Verdict, probe

SEEDS = range(20)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(correct_models(0)))
def test_correct_models_never_fail(name):
    verdicts = []
    for seed in SEEDS:
        model, x = correct_models(seed)[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            report = probe(model, x, seed=seed)
        verdicts += report.verdicts
        assert report.ok, f"seed {seed}:\n{report}"
    assert Verdict.FAIL not in verdicts
    # Most samples must be judged (passing), not waved through as inconclusive.
    assert sum(v in (Verdict.PASS, Verdict.PRECISION_LIMITED) for v in verdicts) >= 0.9 * len(verdicts)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(buggy_models(0)))
def test_wrong_backwards_are_caught(name):
    verdicts = []
    for seed in SEEDS:
        model, x = buggy_models(seed)[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            report = probe(model, x, seed=seed)
        verdicts += report.verdicts
        assert not report.ok
    assert sum(v is Verdict.FAIL for v in verdicts) >= 0.95 * len(verdicts)


def test_origin_case_float32_relu_scalar_output():
    """A naive h=1e-6 float32 central difference disagrees with autograd; probe() says autograd is right."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    x = torch.randn(16, 10)
    autograd = torch.func.vmap(torch.func.grad(lambda s: model(s.unsqueeze(0)).squeeze()))(x)
    h = 1e-6
    naive = torch.stack(
        [(model(x + h * e).squeeze(1) - model(x - h * e).squeeze(1)) / (2 * h) for e in torch.eye(10)], dim=1
    )
    naive_error = ((naive - autograd).norm(dim=1) / autograd.norm(dim=1)).median()
    assert naive_error > 0.05  # round-off makes the naive check useless

    report = probe(model, x)
    assert report.verdicts == (Verdict.PASS,) * 16, str(report)
    eps_step = torch.finfo(torch.float64).eps ** (1 / 3)
    assert torch.all(report.steps >= eps_step * 0.99 / 8) and torch.all(report.steps > h / 8)
    assert "float64" in str(report) and "step" in str(report)
    assert float(report.relative_error.median()) < 1e-4


def _functions_for_gradcheck():
    class ScaledExp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, scale):
            y = x.exp()
            ctx.save_for_backward(y)
            ctx.scale = scale
            return y

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            return g * y * ctx.scale, None

    class SinCos(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, swap):
            ctx.save_for_backward(x)
            ctx.swap = swap
            return torch.stack([x.sin().sum(-1), (x * x).sum(-1)], -1)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            d0, d1 = x.cos(), 2 * x
            if ctx.swap:
                d0 = d0.flip(-1)
            return g[..., :1] * d0 + g[..., 1:] * d1, None

    return {
        "exp-ok": (lambda x: ScaledExp.apply(x, 1.0), True),
        "exp-1.01": (lambda x: ScaledExp.apply(x, 1.01), False),
        "sincos-ok": (lambda x: SinCos.apply(x, False), True),
        "sincos-swapped": (lambda x: SinCos.apply(x, True), False),
        "tanh-chain": (lambda x: torch.tanh(x @ torch.linspace(-1, 1, 15, dtype=x.dtype).reshape(5, 3)), True),
    }


@pytest.mark.parametrize("name", sorted(_functions_for_gradcheck()))
def test_agrees_with_gradcheck_on_float64(name):
    function, expected = _functions_for_gradcheck()[name]
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = torch.autograd.gradcheck(function, (x.clone().requires_grad_(),), raise_exception=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = probe(function, x)
    assert reference == expected
    assert report.ok == reference, str(report)


def test_kink_at_the_point_is_rechecked_nearby():
    x = torch.zeros(2, 3, dtype=torch.float64)  # |x| is not differentiable at 0: autograd's 0 is a subgradient
    report = probe(lambda t: t.abs().sum(1, keepdim=True), x)
    assert report.verdicts == (Verdict.PASS,) * 2
    assert report.rechecked_nearby.all() and "nearby point" in str(report)


def test_noise_at_the_step_scale_is_inconclusive_not_fail():
    """sin(x * 1e15) in float64 is noise at any step we can take: autograd's 1e15 cos(.) cannot be checked."""
    x = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)
    report = probe(lambda t: torch.sin(t * 1e15).sum(1, keepdim=True), x)
    assert report.verdicts == (Verdict.INCONCLUSIVE,) * 4, str(report)
    assert report.ok


def test_nonfinite_outputs_are_inconclusive():
    x = torch.tensor([[-1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    report = probe(lambda t: t.log().sum(1, keepdim=True), x)
    assert report.verdicts == (Verdict.INCONCLUSIVE, Verdict.PASS), str(report)


def test_a_backward_wrong_in_float32_only_fails():
    """The formula is right (float64 agrees with finite differences); the float32 path is 1% off."""

    class CoarseIn32(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * x

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            grad = 2 * x * g
            if grad.dtype == torch.float32:  # a float32 fast path with a wrong constant
                grad = grad * 1.01
            return grad

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(6, 32)

        def forward(self, x):
            return CoarseIn32.apply(self.linear(x))

    torch.manual_seed(0)
    x = torch.randn(8, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = probe(Model(), x)
    assert report.verdicts == (Verdict.FAIL,) * 8, str(report)
    assert (report.relative_error < 1e-4).all(), "the float64 formula itself agrees with finite differences"
    assert (report.dtype_error.amax(1) > 5e-3).all() and (report.margin.amax(1) > 1).all()


def test_precision_limited_when_bfloat16_cannot_represent_the_gradient():
    """tanh at z ~ 3 in bfloat16: 1 - y^2 keeps one digit; the formula is right (judged in float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].weight.mul_(0.3)
        model[0].bias.fill_(3.0)
    report = probe(model.to(torch.bfloat16), torch.randn(8, 6).to(torch.bfloat16))
    assert report.verdicts == (Verdict.PRECISION_LIMITED,) * 8, str(report)
    assert (report.relative_error < 1e-4).all(), "the formula, judged in float64, agrees with finite differences"
    assert (report.dtype_error.amax(1) > report.rtol).all()


def test_raise_if_failed_carries_the_report():
    model, x = buggy_models(0)["scaled-1.1"]
    report = probe(model, x)
    with pytest.raises(GradientCheckError, match="backward disagrees") as info:
        report.raise_if_failed()
    assert info.value.report is report
    correct, y = correct_models(0)["tanh-mlp"]
    probe(correct, y).raise_if_failed()


def test_float32_finite_differences_when_float64_is_unsupported():
    class Float32Only(nn.Module):
        def __init__(self, bug: bool):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
            self.bug = bug

        def forward(self, x):
            if x.dtype != torch.float32:
                raise RuntimeError("this kernel only supports float32")
            if self.bug:
                from zoo import TanhFunction

                return TanhFunction.apply(self.inner(x), "scale")
            return self.inner(x)

    torch.manual_seed(0)
    x = torch.randn(8, 8)
    good = probe(Float32Only(False), x)
    assert good.fd_dtype == torch.float32 and any("float32" in n for n in good.notes)
    assert Verdict.FAIL not in good.verdicts
    bad = probe(Float32Only(True), x)
    assert sum(v is Verdict.FAIL for v in bad.verdicts) >= 7, str(bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_judged_through_float64(dtype):
    """A half-precision backward is noise at the level of a 10% bug: the formula is judged in float64."""
    from zoo import CNN_FOR_DTYPE_TESTS

    correct, wrong = [], []
    for seed in range(10):
        torch.manual_seed(seed)
        x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)
        correct += probe(CNN_FOR_DTYPE_TESTS("ok").to(dtype), x, seed=seed).verdicts
        wrong += probe(CNN_FOR_DTYPE_TESTS("scale").to(dtype), x, seed=seed).verdicts
    assert Verdict.FAIL not in correct
    assert sum(v in (Verdict.PASS, Verdict.PRECISION_LIMITED) for v in correct) == len(correct)
    assert all(v is Verdict.FAIL for v in wrong)


class _Float32Logits(nn.Module):
    """A half-precision network whose forward always returns float32 logits (``.float()``, as for a stable loss):
    its float64 copy computes the last step in float32, so the model is judged in its own dtype, with a note."""

    def __init__(self, dtype: torch.dtype, bug: str) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), Act("ok" if bug == "ok" else "scale"), nn.Linear(16, 3)).to(dtype)

    def forward(self, x):
        return self.net(x).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_with_float32_outputs_is_judged(dtype):
    """(It raised "expected scalar type BFloat16 but found Float": outputs and inputs in different dtypes.)"""
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.manual_seed(0)
        correct = probe(_Float32Logits(dtype, "ok"), x)
        torch.manual_seed(0)
        wrong = probe(_Float32Logits(dtype, "scale"), x)
    assert Verdict.FAIL not in correct.verdicts and any("weaker check" in note for note in correct.notes)
    if dtype is torch.float16:
        assert Verdict.FAIL in wrong.verdicts  # (a fail in 20 probes of 20, over seeds)
    else:  # bfloat16's own 8 bits resolve a 10% error rarely (a fail in 3 probes of 20): never a clean pass
        assert set(wrong.verdicts) != {Verdict.PASS}


BUG_CLASSES = sorted(kernel_bug_classes(0))
# Fraction of samples that must fail, per class (the targets; the benchmark reports the measured rates).
REQUIRED_DETECTION = {
    "relu-maxpool-residual-x1.1": 0.99,
    "log-softmax-backward-sums-over-batch": 1.0,
    "product-backward-nan-at-zero": 1.0,
    "tanh-gelu-with-exact-derivative": 0.95,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", BUG_CLASSES)
def test_kernel_bug_classes_caught_and_their_correct_twins_pass(name):
    correct, wrong = [], []
    for seed in range(10):
        (good, x), (bad, _) = kernel_bug_classes(seed)[name]
        correct += probe(good, x, seed=seed).verdicts
        report = probe(bad, x, seed=seed)
        wrong += report.verdicts
        assert not report.ok
    assert Verdict.FAIL not in correct
    assert sum(v is Verdict.INCONCLUSIVE for v in correct) <= 0.05 * len(correct)
    assert sum(v is Verdict.FAIL for v in wrong) >= REQUIRED_DETECTION[name] * len(wrong)


def test_backward_only_batch_mixing_is_a_fail_with_its_pairs_not_a_leak():
    (good, x), (bad, _) = kernel_bug_classes(0)["log-softmax-backward-sums-over-batch"]
    report = probe(bad, x)
    assert report.verdicts == (Verdict.FAIL,) * 8
    assert report.batch_independent is True and not report.leaking_pairs
    assert len(report.mixing_pairs) == 8 * 7  # every sample's gradient reaches every other sample
    assert "mixes samples" in str(report) and (report.margin > 1).all()
    assert probe(good, x).mixing_pairs == ()


def test_nan_gradient_at_a_smooth_point_fails_at_that_point():
    (_, x), (bad, _) = kernel_bug_classes(0)["product-backward-nan-at-zero"]
    report = probe(bad, x)
    assert report.verdicts == (Verdict.FAIL,) * 8
    assert not report.rechecked_nearby.any(), "the point itself is smooth: nothing to move away from"


@pytest.mark.parametrize("name", sorted(exact_zero_models(0)))
def test_exact_zero_and_vanishing_jacobians_never_fail(name):
    verdicts = []
    for seed in range(10):
        model, x = exact_zero_models(seed)[name]
        report = probe(model, x, seed=seed)
        verdicts += report.verdicts
        assert report.ok, str(report)
    assert sum(v is Verdict.INCONCLUSIVE for v in verdicts) <= 0.05 * len(verdicts)


def test_a_pass_certifies_its_resolution():
    model, x = correct_models(0)["tanh-mlp"]
    report = probe(model, x)
    assert report.ok and (report.resolution <= 0.01).all() and (report.margin <= 1).all()
    assert "certifies" in str(report)


_FLAGS_SCRIPT = """
import torch
from lightning_gradprobe import probe
G = torch._C._get_fp32_precision_getter
keys = [("generic", "all"), ("cuda", "matmul"), ("cuda", "conv"), ("mkldnn", "matmul"), ("mkldnn", "conv")]
torch.backends.{setting}
before = [G(*k) for k in keys]
{lock}
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
report = probe(model, torch.randn(6, 4))
assert report.ok, str(report)
assert [G(*k) for k in keys] == before, ([G(*k) for k in keys], before)
print("ok", before)
"""


_FLAG_SETTINGS = [
    ("fp32_precision = 'tf32'", ""),
    ("cuda.matmul.fp32_precision = 'tf32'", "torch.backends.disable_global_flags()"),
    ("cudnn.allow_tf32 = True", "torch.backends.disable_global_flags()"),
    ("mkldnn.matmul.fp32_precision = 'bf16'", ""),
]


def launch(root):
    """Each setting in a fresh process (global flags, and a lock that cannot be undone)."""
    return {setting: ["-c", _FLAGS_SCRIPT.format(setting=setting, lock=lock)] for setting, lock in _FLAG_SETTINGS}


LAUNCH_TIMEOUT = 120


@pytest.fixture(scope="module")
def flag_runs():
    return BACKGROUND.launches(__name__)


@pytest.mark.slow
@pytest.mark.launched
@pytest.mark.parametrize(("setting", "lock"), _FLAG_SETTINGS)
def test_backend_flags_are_never_assigned_and_restored_exactly(flag_runs, setting, lock):
    """Under PyTorch's test harness (flags locked) and after the current TF32 API was used: no exception."""
    done = flag_runs.succeeded(setting)
    assert done.stdout.startswith("ok"), done.stdout[-2000:]


class _Float32Kernel(torch.autograd.Function):
    """A tanh whose hand-written backward refuses float64 (a float32-only kernel), optionally scaled (wrong)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(x)
        ctx.scale = scale
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if grad.dtype == torch.float64:
            raise RuntimeError("this kernel has no float64 backward")
        return grad * (1 - torch.tanh(x) ** 2) * ctx.scale, None


class _Float32KernelModel(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.a, self.b, self.scale = nn.Linear(5, 12), nn.Linear(12, 10), scale

    def forward(self, x):
        return self.b(_Float32Kernel.apply(self.a(x), self.scale))


@pytest.mark.parametrize(("scale", "verdict"), [(1.0, Verdict.PASS), (1.1, Verdict.FAIL)])
def test_a_float64_backward_that_fails_leaves_the_model_judged_along_every_projection(scale, verdict):
    """Ten outputs, so random projections: the model's own backward is then judged against float64 finite
    differences along all of them (the forward pass computed only the one a float64 reference is compared along)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = probe(_Float32KernelModel(scale), torch.randn(8, 5), check_parameters=False)
    assert set(report.verdicts) == {verdict}
    assert any("the float64 backward failed" in note for note in report.notes)


class _CastingNorm(nn.Module):
    """RMS norm that computes in float32 whatever its input (as Llama's does): a half-precision model's float64
    copy computes part of it in float32."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_whose_float64_copy_casts_inside_is_judged_in_float32(dtype):
    """Its float64 copy is no reference (part of it computes in float32); the model's own dtype made a poor one (a
    correct bf16 model failed most samples). A float32 copy is: a weaker-check note, no fail, and the wrong twin
    fails."""
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(8, 6).to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            correct = probe(nn.Sequential(nn.Linear(6, 16), _CastingNorm(16), Act("ok"), nn.Linear(16, 3)).to(dtype), x)
            wrong = probe(nn.Sequential(nn.Linear(6, 16), _CastingNorm(16), Act("sign"), nn.Linear(16, 3)).to(dtype), x)
        assert correct.fd_dtype == torch.float32 and Verdict.FAIL not in correct.verdicts, str(correct)
        assert any("weaker check" in note and "judged in float32" in note for note in correct.notes)
        assert Verdict.FAIL in wrong.verdicts
