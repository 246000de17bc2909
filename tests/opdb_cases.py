"""PyTorch's own operator database as a referee for the probe's verdicts, shared by tests and benchmarks.

Method
------
Every differentiable operator of ``torch.testing._internal.common_methods_invocations.op_db`` that runs in
float32 and float64 on CPU becomes a set of *cases*, one per sample input the database provides for it
(``op.sample_inputs("cpu", torch.float64, requires_grad=True)``):

* The case's function maps a batch ``xb`` of shape ``(B, *input.shape)`` to ``(B, M)``: it applies the operator,
  through the database's own ``gradcheck_wrapper`` and ``output_process_fn_grad``, to a fresh copy of each
  ``xb[b]`` with the sample's other arguments (floating tensors cast to ``xb.dtype``, all detached), and flattens
  the first floating tensor of the result.
* All floating values of the sample are rounded to float32 first, so the float32 probe, its float64 finite
  differences and the referee evaluate the operator at exactly the same point.
* The batch holds the sample and, when the referee accepts it as well, a copy with 1% multiplicative noise
  (signs and zeros kept) drawn from a seeded ``torch.Generator``, never the global RNG; otherwise the sample
  alone.
* Referee: ``torch.autograd.gradcheck`` in float64 on each batch element separately (full mode up to 256 input
  elements, fast mode above). Samples it rejects or cannot run are skipped, so every case is one where
  PyTorch's backward is known to be right.
* Correct run: ``probe(function, xb.float(), seed=s)``. Any ``"fail"`` is a false alarm; ``"inconclusive"``
  and ``"precision-limited"`` are counted too.
* Wrong run: the same function with its output passed through an identity whose backward multiplies the
  gradient by 1.1 (a modern ``autograd.Function`` that ``torch.func`` can run). Batch elements whose float64
  Jacobian is not (near) zero are detection cases; ``"fail"`` detects. Near zero: ``|J| max(|x|, 1) <= 1e-8
  |f(x)|``, the rounding noise of a Jacobian that is zero in exact arithmetic (``corrcoef`` of one variable,
  ``normalize`` over a size-1 dim), or one too small for any float64 finite difference (``erfc(-4.8)``).

Operators are skipped when they have no autograd, lack float32 or float64 on CPU, are in-place variants, or
have random or uninitialised outputs (by name, and by evaluating each sample twice under different global
seeds inside ``torch.random.fork_rng``). Samples are skipped when their differentiated input is not a
non-empty, finite, strided floating tensor of at most 20,000 elements, the output is not a non-empty floating
tensor, or gradcheck rejects them or cannot run. Every skip is counted by reason.
Every skip is counted by reason.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.opinfo.core import OpInfo, SampleInput

from lightning_gradprobe import ProbeReport, Verdict, probe


def unlock_backend_flags() -> None:
    """Undo ``torch.backends.disable_global_flags()``, which importing PyTorch's test utilities calls.

    That import locks the backend flags for the whole process (Lightning's ``Trainer`` then cannot set cuDNN's
    ``benchmark``); the rest of the test suite gets its process back.
    """
    sys.modules["torch.backends"].m.__dict__["__allow_nonbracketed_mutation_flag"] = True


unlock_backend_flags()

__all__ = [
    "Case",
    "ScaleGradient",
    "Tally",
    "build_cases",
    "find_ops",
    "op_skip_reason",
    "sweep",
]

NOISE = 1e-2
"""Relative size of the multiplicative noise on the batch's second element."""
WRONG_FACTOR = 1.1
"""The planted bug: the backward multiplies the gradient by this."""
FULL_GRADCHECK_MAX_NUMEL = 256
"""Above this many input elements the referee runs gradcheck's fast mode (random projections)."""
MAX_INPUT_NUMEL = 20_000
"""Samples with larger inputs are skipped (they add time, not coverage)."""
MAX_DENSE_JACOBIAN = 1 << 20
"""Above this many Jacobian entries, random vector-Jacobian products estimate the Jacobian's norm."""
NEGLIGIBLE_JACOBIAN = 1e-8
"""A Jacobian this small relative to output / input scale is rounding noise: no detection case (see below)."""

_RANDOM_OPS = frozenset(
    {
        "bernoulli",
        "cauchy",
        "exponential",
        "geometric",
        "log_normal",
        "multinomial",
        "normal",
        "rand_like",
        "randint_like",
        "randn_like",
        "uniform",
        "svd_lowrank",
        "pca_lowrank",
        "nn.functional.alpha_dropout",
        "nn.functional.dropout",
        "nn.functional.dropout1d",
        "nn.functional.dropout2d",
        "nn.functional.dropout3d",
        "nn.functional.feature_alpha_dropout",
        "nn.functional.fractional_max_pool2d",
        "nn.functional.fractional_max_pool3d",
        "nn.functional.gumbel_softmax",
        "nn.functional.rrelu",
    }
)
"""Operators whose outputs are drawn at random (more are caught at run time by evaluating them twice)."""


class ScaleGradient(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by :data:`WRONG_FACTOR` (``torch.func`` can run it)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad * WRONG_FACTOR


@dataclasses.dataclass(frozen=True)
class Case:
    """One sample of one operator, ready to probe.

    Attributes:
        op: The operator's full name in ``op_db`` (``name.variant``).
        sample: Index of the sample among the operator's sample inputs.
        inputs: ``(B, *input.shape)`` float64 batch, every value representable in float32.
        function: Batch function ``(B, ...) -> (B, M)``, following the dtype of its input.
        wrong: The same function with a backward scaled by :data:`WRONG_FACTOR`.
        detectable: Per batch element, whether its float64 Jacobian is not (near) zero: a detection case.

    """

    op: str
    sample: int
    inputs: Tensor
    function: Callable[[Tensor], Tensor]
    wrong: Callable[[Tensor], Tensor]
    detectable: tuple[bool, ...]


@dataclasses.dataclass
class Tally:
    """What a sweep found; ``record`` adds one case's probe runs."""

    engine: str = "auto"
    """The ``engine=`` passed to every probe call."""
    ops_tried: int = 0
    ops_with_cases: int = 0
    op_skips: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    sample_skips: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    cases: int = 0
    single_element: int = 0
    correct: int = 0
    verdicts: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    false_alarms: list[tuple[str, int, int, int, float]] = dataclasses.field(default_factory=list)
    """``(op, sample, batch element, seed, worst relative error)``."""
    unsure: list[tuple[str, int, int, int, str]] = dataclasses.field(default_factory=list)
    """``(op, sample, batch element, seed, verdict)`` of correct samples judged inconclusive or precision-limited."""
    exceptions: list[tuple[str, int, str, int, str]] = dataclasses.field(default_factory=list)
    """``(op, sample, "correct" or "wrong", seed, message)``."""
    engines: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    """The engine each probe call ended up using (``torch.func`` falls back to ``autograd``)."""
    detection_cases: int = 0
    detected: int = 0
    misses: list[tuple[str, int, int, int, str]] = dataclasses.field(default_factory=list)
    """``(op, sample, batch element, seed, verdict)``."""

    @property
    def false_alarm_rate(self) -> float:
        return len(self.false_alarms) / max(self.correct, 1)

    @property
    def inconclusive_rate(self) -> float:
        return self.verdicts[Verdict.INCONCLUSIVE.value] / max(self.correct, 1)

    @property
    def precision_limited_rate(self) -> float:
        return self.verdicts[Verdict.PRECISION_LIMITED.value] / max(self.correct, 1)

    @property
    def detection_rate(self) -> float:
        return self.detected / max(self.detection_cases, 1)

    def record(self, case: Case, seed: int) -> None:
        """Probe ``case`` (correct and wrong backward) with ``seed`` and add the outcome."""
        x = case.inputs.float()
        report = self._probe(case, case.function, x, seed, "correct")
        if report is not None:
            self.correct += len(report.verdicts)
            self.verdicts.update(v.value for v in report.verdicts)
            for b, verdict in enumerate(report.verdicts):
                if verdict is Verdict.FAIL:
                    worst = float(report.relative_error[b].nan_to_num(nan=0.0).max())
                    self.false_alarms.append((case.op, case.sample, b, seed, worst))
                elif verdict in (Verdict.INCONCLUSIVE, Verdict.PRECISION_LIMITED):
                    self.unsure.append((case.op, case.sample, b, seed, verdict.value))
        report = self._probe(case, case.wrong, x, seed, "wrong")
        if report is not None:
            for b, verdict in enumerate(report.verdicts):
                if not case.detectable[b]:
                    continue
                self.detection_cases += 1
                if verdict is Verdict.FAIL:
                    self.detected += 1
                else:
                    self.misses.append((case.op, case.sample, b, seed, verdict.value))

    def _probe(
        self, case: Case, function: Callable[[Tensor], Tensor], x: Tensor, seed: int, kind: str
    ) -> ProbeReport | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = probe(function, x, seed=seed, engine=self.engine)
        except Exception as error:
            message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            self.exceptions.append((case.op, case.sample, kind, seed, message))
            return None
        self.engines[report.engine] += 1
        return report


def op_skip_reason(op: OpInfo) -> str | None:
    """Why ``op`` is left out of the sweep, or ``None`` if it is in."""
    if not op.supports_autograd:
        return "no autograd"
    if not {torch.float32, torch.float64} <= set(op.supported_dtypes("cpu")):
        return "no float32 and float64 on CPU"
    if not {torch.float32, torch.float64} <= set(op.supported_backward_dtypes("cpu")):
        return "no float32 and float64 backward on CPU"
    if op.name.endswith("_") and not op.name.endswith("__"):
        return "in-place variant"
    if op.name in _RANDOM_OPS:
        return "random output"
    if op.has_nondeterministic_output:
        return "nondeterministic output"
    return None


def find_ops(names: Sequence[str] | None = None, contains: str | None = None) -> list[OpInfo]:
    """The ``op_db`` entries with these full names (in this order), or whose full name contains ``contains``."""
    if names is not None:
        by_name = {op.full_name: op for op in op_db}
        missing = [name for name in names if name not in by_name]
        if missing:
            raise KeyError(f"not in op_db: {missing}")
        return [by_name[name] for name in names]
    return [op for op in op_db if contains is None or contains in op.full_name]


def _map_tensors(value: Any, function: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``function`` to every floating tensor in nested lists, tuples and dicts; detach all tensors."""
    if isinstance(value, Tensor):
        value = value.detach()
        return function(value) if value.is_floating_point() else value
    if isinstance(value, list):
        return [_map_tensors(v, function) for v in value]
    if type(value) is tuple:
        return tuple(_map_tensors(v, function) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, function) for k, v in value.items()}
    return value


class _NoFloatingOutput(TypeError):
    """The operator returned no floating tensor."""


def _first_floating(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else None
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_floating(item)
            if found is not None:
                return found
    return None


def _round_to_float32(t: Tensor) -> Tensor:
    return t.float().to(t.dtype)


def _per_sample_function(op: OpInfo, sample: SampleInput) -> Callable[[Tensor], Tensor]:
    """``x -> flattened first floating output`` of ``op`` at one sample; other arguments follow ``x.dtype``."""
    args = _map_tensors(sample.args, _round_to_float32)
    kwargs = _map_tensors(sample.kwargs, _round_to_float32)
    variant = op.get_op()
    process = sample.output_process_fn_grad

    def apply(x: Tensor) -> Tensor:
        def cast(t: Tensor) -> Tensor:
            return t.to(x.dtype)

        outputs = op.gradcheck_wrapper(variant, x, *_map_tensors(args, cast), **_map_tensors(kwargs, cast))
        if process is not None:
            outputs = process(outputs)
        out = _first_floating(outputs)
        if out is None:
            raise _NoFloatingOutput(op.full_name)
        return out.reshape(-1)

    return apply


def _batch_function(apply: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def function(xb: Tensor) -> Tensor:
        # A fresh copy per sample: ops on storage (as_strided) must not reach into the rest of the batch.
        return torch.stack([apply(xb[b].clone()) for b in range(xb.shape[0])])

    return function


def _wrong_function(function: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def wrong(xb: Tensor) -> Tensor:
        return ScaleGradient.apply(function(xb))

    return wrong


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a.nan_to_num(nan=0.5), b.nan_to_num(nan=0.5)))


def _is_random(apply: Callable[[Tensor], Tensor], x: Tensor) -> bool:
    """Whether two evaluations under different global seeds differ (the global RNG state is restored)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        first = apply(x)
        torch.manual_seed(2)
        second = apply(x)
    return not _same(first, second)


def _gradcheck(op: OpInfo, apply: Callable[[Tensor], Tensor], x: Tensor) -> str | None:
    """Run the float64 referee at ``x``; ``None`` if it accepts, else the skip reason."""
    fast = op.gradcheck_fast_mode if op.gradcheck_fast_mode is not None else x.numel() > FULL_GRADCHECK_MAX_NUMEL
    leaf = x.detach().clone().requires_grad_(True)
    try:
        ok = torch.autograd.gradcheck(
            apply,
            (leaf,),
            raise_exception=False,
            nondet_tol=op.gradcheck_nondet_tol,
            fast_mode=fast,
            check_undefined_grad=False,
            check_batched_grad=False,
        )
    except Exception:
        return "gradcheck cannot run"
    return None if ok else "gradcheck rejects"


def _jacobian_is_negligible(apply: Callable[[Tensor], Tensor], x: Tensor, generator: torch.Generator) -> bool:
    """Whether the float64 Jacobian ``J`` of ``apply`` at ``x`` is (near) zero, or not finite.

    Near zero: ``|J| max(|x|, 1) <= NEGLIGIBLE_JACOBIAN |apply(x)|`` (Frobenius and Euclidean norms), rounding
    noise of a Jacobian that is zero in exact arithmetic, or too small for any float64 finite difference.
    ``J`` is built with ``torch.autograd.functional.jacobian`` up to :data:`MAX_DENSE_JACOBIAN` entries; above,
    two vector-Jacobian products with seeded Gaussian cotangents estimate its norm.
    """
    leaf = x.detach().clone()
    with torch.no_grad():
        out = apply(leaf)
    if leaf.numel() * out.numel() <= MAX_DENSE_JACOBIAN:
        try:
            jacobian = torch.autograd.functional.jacobian(apply, leaf, vectorize=True)
        except Exception:  # some backwards cannot run under vmap
            jacobian = torch.autograd.functional.jacobian(apply, leaf)
        norm = float(torch.linalg.vector_norm(jacobian.reshape(-1)))
    else:
        leaf.requires_grad_(True)
        graph = apply(leaf)
        squares = 0.0
        for cotangent in torch.randn(2, *graph.shape, generator=generator, dtype=graph.dtype):
            (vjp,) = torch.autograd.grad(graph, leaf, cotangent, retain_graph=True, allow_unused=True)
            squares += 0.0 if vjp is None else float(torch.linalg.vector_norm(vjp)) ** 2
        norm = math.sqrt(squares / 2)
    scale = max(float(torch.linalg.vector_norm(x)), 1.0)
    return not math.isfinite(norm) or norm * scale <= NEGLIGIBLE_JACOBIAN * float(torch.linalg.vector_norm(out))


def build_cases(op: OpInfo, max_samples: int, skips: collections.Counter[str], seed: int = 0) -> list[Case]:
    """Cases for the first ``max_samples`` sample inputs of ``op``; skipped samples are counted in ``skips``."""
    cases = []
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(0)  # sample inputs are drawn from the global RNG: fix them, then restore its state
        try:
            samples = list(itertools.islice(op.sample_inputs("cpu", torch.float64, requires_grad=True), max_samples))
        except Exception:
            skips["sample inputs cannot be built"] += 1
            return []
        for index, sample in enumerate(samples):
            try:
                reason, case = _build_case(op, index, sample, seed)
            except Exception as error:  # a sample the harness cannot prepare: count it, by error type
                reason, case = f"sample cannot be prepared ({type(error).__name__})", None
            if case is None:
                skips[reason or "?"] += 1
            else:
                cases.append(case)
    return cases


def _build_case(op: OpInfo, index: int, sample: SampleInput, seed: int) -> tuple[str | None, Case | None]:
    x = sample.input
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return "input not a floating tensor", None
    if x.layout != torch.strided:
        return "non-strided input", None
    if x.numel() == 0:
        return "empty input", None
    if x.numel() > MAX_INPUT_NUMEL:
        return "input too large", None
    x = _round_to_float32(x.detach()).contiguous()
    if not bool(x.isfinite().all()):
        return "non-finite input", None
    apply = _per_sample_function(op, sample)
    try:
        with torch.no_grad():
            out = apply(x)
    except _NoFloatingOutput:
        return "output not floating", None
    except Exception:
        return "op raises on the sample", None
    if out.numel() == 0:
        return "empty output", None
    if _is_random(apply, x):
        return "random output", None
    reason = _gradcheck(op, apply, x)
    if reason is not None:
        return reason, None
    elements = [x]
    generator = torch.Generator().manual_seed(seed * 100_003 + index)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).clamp(-3.0, 3.0)
    noisy = _round_to_float32(x * (1 + NOISE * noise))
    try:
        with torch.no_grad():
            same_shape = apply(noisy).shape == out.shape
    except Exception:
        same_shape = False
    if same_shape and _gradcheck(op, apply, noisy) is None:
        elements.append(noisy)
    try:
        detectable = tuple(not _jacobian_is_negligible(apply, e, generator) for e in elements)
    except Exception:
        return "jacobian cannot be computed", None
    return None, Case(
        op=op.full_name,
        sample=index,
        inputs=torch.stack(elements),
        function=_batch_function(apply),
        wrong=_wrong_function(_batch_function(apply)),
        detectable=detectable,
    )


def sweep(
    ops: Iterable[OpInfo],
    *,
    max_samples: int = 4,
    seeds: Sequence[int] = (0,),
    engine: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> Tally:
    """Build the cases of every eligible op in ``ops`` and probe each with every seed."""
    tally = Tally(engine=engine)
    for op in ops:
        reason = op_skip_reason(op)
        if reason is not None:
            tally.op_skips[reason] += 1
            continue
        tally.ops_tried += 1
        if progress is not None:
            progress(op.full_name)
        cases = build_cases(op, max_samples, tally.sample_skips)
        tally.ops_with_cases += bool(cases)
        for case in cases:
            tally.cases += 1
            tally.single_element += len(case.inputs) == 1
            for seed in seeds:
                tally.record(case, seed)
    return tally
