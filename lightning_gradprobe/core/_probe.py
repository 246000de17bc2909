"""``probe()``: per-sample input Jacobians checked against finite differences, with verdicts you can trust.

A probe is a chain of stages, each a function of the values before it (see the README's "Architecture"):

1. options: :class:`~._options.ProbeOptions`, validated once;
2. prepare: :class:`~._prepare.PreparedBatch`, the inputs as one floating batch;
3. forward and Jacobians: :class:`~._forward.ForwardPass`;
4. reference: :class:`~._verdicts.Problem`, the model in its own dtype and in float64; and
   :class:`~._verdicts.ReferenceRows`, float64's rows of every sample, where batch independence is read from them;
5. cross-sample: :class:`~._jacobian.CrossSampleCheck`, are samples independent?
6. first order: :class:`~._first_order.FirstOrder`, each checked sample's verdict;
7. second order: :class:`~.report.SecondOrderReport` (when asked for);
8. parameters: :class:`~.report.ParameterCheck`, the gradient with respect to the weights (on by default);
9. culprits: :class:`~._culprits.Culprits`, the submodules to blame (when asked for, or parameters fail);
10. the :class:`~.report.ProbeReport`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ._culprits import Culprits, find_culprits
from ._exempt import Exempt, ExemptSpec, resolve_exempt
from ._first_order import (
    FirstOrder,
    check_batch_independence,
    choose_samples,
    compare_forward_mode,
    judge_first_order,
    reference_rows,
)
from ._forward import ForwardPass, forward_and_jacobians, saliency_rows
from ._functions import OutputSelector, Target, build_parameter_function
from ._isolation import is_compiled, isolated
from ._jacobian import CrossSampleCheck
from ._notes import Notes, describe_error
from ._options import ProbeOptions
from ._parameters import check_parameter_gradients
from ._prepare import Forward, PreparedBatch, check_finite_batch, device_of, prepare_batch
from ._reference import reference_problem
from ._second_order import check_second_order
from ._verdicts import MODEL_DTYPE_ROWS, Problem, default_rtol
from .localize import Localization, localize, record_inputs
from .report import CulpritKind, ParameterCheck, ProbeReport, SecondOrderReport, Verdict

__all__ = ["default_rtol", "jacobians", "probe", "run_probe", "saliency"]


def probe(
    model: nn.Module | Callable[..., Any],
    inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    *,
    target: Target = None,
    n_directions: int = 4,
    seed: int = 0,
    forward: Callable[[Any, Tensor], Any] | None = None,
    output: OutputSelector = None,
    check_samples: int | Sequence[int] | None = None,
    rtol: float | None = None,
    fd_dtype: torch.dtype | None = torch.float64,
    engine: str = "auto",
    chunk_size: int | None = None,
    max_full_outputs: int = 64,
    check_batch: bool = True,
    localize: bool = False,
    check_parameters: bool = True,
    check_forward_mode: bool = False,
    localize_budget: tuple[int, float] = (64, 30.0),
    second_order: bool = False,
    layer: str | nn.Module | None = None,
    exempt: ExemptSpec = None,
) -> ProbeReport:
    """Compute per-sample input Jacobians and spot-check them against finite differences.

    One forward of the batch through ``functional_call`` with detached parameters, then one backward per
    compared output row through that graph (``engine="torch.func"``: ``vmap(jacrev)`` over samples instead),
    exactness verified each call by a batch-independence check. The backward's formula is judged in float64
    (the same code on a float64 copy of the model) against central differences along ``n_directions`` random
    directions, whose own second difference bounds their error; the model-dtype Jacobian is judged against
    the float64 one. See the README's "What the verdicts mean" for the rules a verdict follows.

    The model is probed in eval mode (every submodule's own mode is restored afterwards); no
    parameter ``.grad``, buffer, RNG state, backend flag or input changes. Works under ``torch.no_grad()``
    and ``torch.inference_mode()``.

    Args:
        model: An ``nn.Module`` (then the formula is judged on a float64 copy), or any callable mapping a batch
            ``(N, ...)`` to outputs ``(N, ...)``.
        inputs: A tensor ``(N, ...)``, or a tuple/list or dict of tensors with the batch dimension first
            (called as ``model(*inputs)`` / ``model(**inputs)``). Floating entries are differentiated, each with
            steps and directions sized to its own scale; other entries (masks, lengths, ids) pass through with
            their samples. Integer-only inputs are probed at the embedding that consumes them (see ``layer``).
        target: Which outputs of each sample to differentiate: ``None`` for all (random projections
            above ``max_full_outputs``), ``"argmax"``, an int index into each sample's flattened
            outputs, an ``(N,)`` tensor of per-sample indices, or a callable ``outputs -> (N, ...)``.
        n_directions: Random directions per checked sample.
        seed: Seed of the probe's own generator (directions, sample subset, projections).
        forward: ``forward(model, inputs) -> outputs``, when calling ``model(inputs)`` is not the way to run it.
        output: For tuple/dict outputs: the index or key of the tensor to check, or a callable.
        check_samples: Which samples to check against finite differences: ``None`` for all, an int
            for that many drawn at random, or a sequence of indices. Saliency and health cover all.
        rtol: Relative tolerance for the model-dtype backward (default: by dtype, see
            :func:`default_rtol`).
        fd_dtype: Dtype of the finite differences (default float64; ``None`` for the model's own, as
            on devices without float64). Falls back to the model's dtype, with a note, if the model
            cannot run in float64.
        engine: ``"auto"`` or ``"autograd"`` (one batched forward, batched cotangents, exactness verified
            each call) or ``"torch.func"`` (``vmap`` over samples of ``jacrev``; falls back to autograd,
            with a one-time warning, for models the transforms cannot run).
        chunk_size: Samples per ``vmap`` chunk of the ``torch.func`` engine, to bound memory.
        max_full_outputs: Above this many outputs per sample, full Jacobians are not built: random
            output projections are compared instead. The same happens when the full Jacobians of the
            batch would exceed 1 GiB (memory stays bounded by a few copies of the input batch).
        check_batch: Whether to check that samples do not leak into each other through the batch.
        localize: When a sample fails, check every submodule on its own on that sample and name the
            culprits in ``report.culprits`` (deepest first). Needs an ``nn.Module``.
        check_parameters: Also check the gradient with respect to the parameters, what training consumes (on by
            default): one float64 backward of a random combination of the checked outputs of two samples, along
            random directions in the space of every trainable parameter, against float64 central differences
            (``report.parameter_check``). When it fails, each submodule's own parameters are checked to name the
            culprit (``culprit.kind == "parameter"``).
        check_forward_mode: Compare forward mode (``torch.func.jvp``) with the reverse-mode Jacobian.
        localize_budget: ``(max_modules, seconds)`` for localization.
        layer: A submodule (or its dotted name) whose *output* is differentiated instead of the model's input,
            computed fresh from ``inputs`` and fed back through a forward hook. Integer inputs (token ids)
            consumed by an ``nn.Embedding`` are probed at that embedding's output without being asked.
        exempt: Submodules whose backward is intentionally not the derivative (a straight-through estimator, a
            gradient-reversal layer, a surrogate gradient): dotted names, ``nn.Module`` types or instances. The
            model after the last of them (in call order) is checked as a whole, its input being that submodule's
            output; every other submodule (but those holding an exempt one) is checked on its own, input and
            parameter gradients, on the first sample; ``report.exempt`` names them.
        second_order: Also check the double backward through the input (``report.second_order``): the
            Hessian-vector products of one random combination of each sample's selected outputs, from autograd's
            double backward, against finite differences of float64 first-order gradients, judged by the same
            rules. A model that cannot be differentiated twice (``once_differentiable``) is a finding there.

    Returns:
        A :class:`~lightning_gradprobe.ProbeReport`.

    Raises:
        TypeError: If ``inputs`` is neither a tensor nor a tuple/list/dict of them, holds only integer entries that
            no embedding consumes, or the model's outputs are not a tensor.
        ValueError: If the batch is empty or non-finite, an option is out of range, or the outputs
            have no batch dimension.

    Example:
        >>> import torch
        >>> from lightning_gradprobe import probe
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> report = probe(model, torch.randn(5, 4), target="argmax")
        >>> report.ok, report.verdicts[0]
        (True, <Verdict.PASS: 'pass'>)
        >>> report.saliency.shape
        torch.Size([5, 4])

    """
    options = ProbeOptions(
        target=target, n_directions=n_directions, seed=seed, forward=forward, output=output,
        check_samples=check_samples, rtol=rtol, fd_dtype=fd_dtype, engine=engine, chunk_size=chunk_size,
        max_full_outputs=max_full_outputs, check_batch=check_batch, localize=localize,
        check_parameters=check_parameters, check_forward_mode=check_forward_mode, localize_budget=localize_budget,
        second_order=second_order, layer=layer, exempt=exempt,
    )  # fmt: skip
    return run_probe(model, inputs, options)


def run_probe(model: Any, inputs: Any, options: ProbeOptions) -> ProbeReport:
    """:func:`probe` with its options as one validated value: the stages, in order."""
    if options.exempt is not None:
        return _around_exempt(model, inputs, options)
    generator = torch.Generator().manual_seed(options.seed)
    notes = Notes(subject=model)
    if is_compiled(model):
        notes.add(_COMPILED_NOTE, weaker=True)
    with isolated(model, device_of(inputs)):
        batch = prepare_batch(model, inputs, forward=options.forward, layer=options.layer, notes=notes)
        forward_pass = _forward_pass(model, batch, options, generator, notes)
        problem = reference_problem(model, batch, forward_pass, options, notes)
        reference = reference_rows(forward_pass, problem, batch.x)
        cross = check_batch_independence(
            forward_pass, problem, batch.x, generator, reference, notes=notes, forward_only=options.check_batch
        )
        checked = choose_samples(options.check_samples, batch.size, generator)
        first = judge_first_order(
            problem, forward_pass, batch.x, cross, checked, options.n_directions, generator, notes, reference
        )
        forward_mode = (
            compare_forward_mode(problem, forward_pass, batch.x, checked, generator=generator, notes=notes)
            if options.check_forward_mode and len(checked)
            else None
        )
        second = _second_order(model, batch, forward_pass, problem, first, options, generator, notes)
        parameters = _parameter_check(model, batch, forward_pass, problem, first, options, generator, notes)
    notes.say_warnings(stacklevel=4)
    culprits = find_culprits(model, batch, first, second, parameters, options, check=probe)
    if second is not None:
        second = replace(second, culprits=culprits.second_order)
    checks = _Checks(cross, first, forward_mode, second, parameters, culprits)
    return _report(batch, forward_pass, problem, checks, notes, options)


_COMPILED_NOTE = (
    "the model is torch.compile'd: the probe ran its eager code, so that training's compiled graphs and their "
    "recompile budget stay as they were; a kernel wrong only in the compiled graph is not what was checked"
)


def _around_exempt(model: Any, inputs: Any, options: ProbeOptions) -> ProbeReport:
    """Check the model around its exempt submodules (see ``probe``'s ``exempt``)."""
    with isolated(model, device_of(inputs)):
        batch = prepare_batch(model, inputs, forward=options.forward, layer=None, notes=Notes(subject=model))
        order = list(record_inputs(model, batch.x[:1], batch.parameter_forward)) if isinstance(model, nn.Module) else []
    exempt = resolve_exempt(model, options.exempt, order) if order else None
    if exempt is None:  # the forward calls none of them: nothing on the probed path is exempt
        report = run_probe(model, inputs, replace(options, exempt=None))
        return replace(report, notes=(*report.notes, "exempt submodules: none is called by the forward"))
    if options.layer is not None:
        raise ValueError("probe: `exempt` and `layer` cannot be combined: `exempt` chooses where the probe starts.")
    for boundary in reversed(exempt.names):  # the last exempt submodule on the probed outputs' path
        after = run_probe(model, inputs, replace(options, exempt=None, layer=boundary, check_parameters=False))
        if not bool((after.zero_fraction == 1).all()):  # (all zero: the outputs do not depend on it)
            break
    alone = localize(
        model,
        batch.x[:1],
        check=probe,
        forward=batch.parameter_forward,
        n_directions=options.n_directions,
        seed=options.seed,
        max_modules=options.localize_budget[0],
        time_budget=options.localize_budget[1],
        parameters=options.check_parameters,
        skip=exempt.skipped,
    )
    return _merge_exempt_checks(after, alone, exempt, boundary)


def _merge_exempt_checks(after: ProbeReport, alone: Localization, exempt: Exempt, boundary: str) -> ProbeReport:
    """One report: the verdicts of the model after the exempt submodules, the culprits of every other one."""
    verdicts = list(after.verdicts)
    if any(c.kind is CulpritKind.INPUT for c in alone.culprits) and verdicts:
        verdicts[0] = Verdict.FAIL  # the sample every other submodule was checked on
    note = (
        f"exempt (backward intentionally not the derivative): {', '.join(exempt.names)}; the model after "
        f"`{boundary}` was checked as a whole, {len(alone.checked)} other submodules on their own (sample 0)"
    )
    culprits = tuple(dict.fromkeys((*after.culprits, *alone.culprits)))
    return replace(after, verdicts=tuple(verdicts), culprits=culprits, exempt=exempt.names, notes=(*after.notes, note))


def _forward_pass(
    model: Any, batch: PreparedBatch, options: ProbeOptions, generator: torch.Generator, notes: Notes
) -> ForwardPass:
    """Stage 3: one forward of the batch, then the saliency row and the rows the check compares."""
    separate = batch.model_dtype != (options.fd_dtype or batch.model_dtype)
    return forward_and_jacobians(
        model,
        batch.x.detach().requires_grad_(True),
        target=options.target,
        forward=batch.forward,
        output=options.output,
        engine=options.engine,
        chunk_size=options.chunk_size,
        max_full_outputs=options.max_full_outputs,
        n_projections=options.n_directions,
        check_batch=options.check_batch,
        generator=generator,
        notes=notes,
        check_rows=True,
        model_projections=MODEL_DTYPE_ROWS if separate else None,
        independence_from_reference=separate and options.check_samples is None,
    )


def _second_order(
    model: Any,
    batch: PreparedBatch,
    forward: ForwardPass,
    problem: Problem,
    first: FirstOrder,
    options: ProbeOptions,
    generator: torch.Generator,
    notes: Notes,
) -> SecondOrderReport | None:
    """Stage 7: the double backward through the input, on the samples first order judged (when asked for)."""
    if not options.second_order:
        return None
    if not len(first.judged):
        notes.add(
            "second order not checked: no sample was judged one by one at first order (the cross-sample check "
            "settled every one)"
        )
        return None
    parameters = (
        build_parameter_function(model, forward=batch.forward, output=options.output)
        if isinstance(model, nn.Module)
        else None
    )
    report, _ = check_second_order(
        problem,
        batch.x,
        forward.index,
        first.judged,
        n_outputs=forward.selection.n_outputs,
        generator=generator,
        n_directions=options.n_directions,
        parameters=parameters,
    )
    return report


def _parameter_check(
    model: Any,
    batch: PreparedBatch,
    forward: ForwardPass,
    problem: Problem,
    first: FirstOrder,
    options: ProbeOptions,
    generator: torch.Generator,
    notes: Notes,
) -> ParameterCheck | None:
    """Stage 8: the gradient with respect to every trainable parameter, on the whole model at once."""
    if not options.check_parameters or not isinstance(model, nn.Module) or not len(first.checked):
        return None
    parameters = build_parameter_function(model, forward=batch.parameter_forward, output=options.output)
    if parameters is None:
        return None
    rows = first.checked.to(batch.x.device)
    x, index, n_outputs = batch.x[rows], forward.index[rows], forward.selection.n_outputs
    try:
        return check_parameter_gradients(model, parameters, problem, x, index, n_outputs=n_outputs, generator=generator)
    except Exception as error:  # a model that cannot run on two samples alone: said, the other verdicts kept
        notes.add(f"parameter gradients not checked: {describe_error(error)}")
        return None


@dataclass(frozen=True)
class _Checks:
    """What the checking stages found, for the report."""

    cross: CrossSampleCheck
    first: FirstOrder
    forward_mode: tuple[int, ...] | None
    second: SecondOrderReport | None
    parameters: ParameterCheck | None
    culprits: Culprits


def _report(
    batch: PreparedBatch, forward: ForwardPass, problem: Problem, checks: _Checks, notes: Notes, options: ProbeOptions
) -> ProbeReport:
    """Stage 10: the report, from the values the stages produced."""
    cross, first, culprits = checks.cross, checks.first, checks.culprits
    n, evidence = batch.size, first.evidence
    jac = forward.jacobians
    per_sample = tuple(range(1, jac.ndim))  # (reduced in place: the Jacobians are a strided view)
    size = max(jac[0].numel(), 1)
    salient = forward.saliency
    return ProbeReport(
        verdicts=first.verdicts,
        saliency=batch.structured(salient.reshape(batch.x.shape)),
        layer=batch.layer,
        token_scores=batch.token_scores(salient),
        batch_independent=(not cross.forward and not cross.unverified) if options.check_batch and n > 1 else None,
        leaking_pairs=cross.forward + cross.unverified,
        mixing_pairs=cross.backward_only,
        blind_pairs=cross.unclaimed,
        checked=first.checked,
        relative_error=evidence.relative_error,
        fd_error=evidence.fd_error,
        margin=evidence.margin,
        resolution=evidence.resolution,
        dtype_error=evidence.dtype_error,
        steps=evidence.steps,
        rechecked_nearby=evidence.moved,
        grad_norm=salient.reshape(n, -1).double().norm(dim=1).cpu(),
        nonfinite_count=(jac[0].numel() - jac.isfinite().sum(per_sample)).cpu(),
        zero_fraction=((jac == 0).sum(per_sample).double() / size).cpu(),
        engine=problem.engine,
        engine_note=forward.gradients.fallback_reason,
        model_dtype=problem.model_dtype,
        fd_dtype=problem.reference_dtype,
        n_outputs=forward.selection.n_outputs,
        projected=forward.selection.kind == "projected",
        rtol=problem.rtol,
        notes=notes.texts(),
        outputs=forward.outputs.detach().cpu(),
        culprits=culprits.first_order,
        localization_note=culprits.note,
        forward_mode_mismatch=checks.forward_mode,
        second_order=checks.second,
        parameter_check=checks.parameters,
    )


def _check_tensor_inputs(inputs: Any) -> None:
    """``jacobians()`` and ``saliency()`` take one floating tensor."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"`inputs` must be a tensor, got {type(inputs).__name__}; `probe()` takes tuples and dicts.")
    if not inputs.is_floating_point():
        raise TypeError(
            f"`inputs` must be a floating tensor, got {inputs.dtype}: token ids have no input gradient; "
            "`probe(model, ids)` probes at the embedding's output."
        )
    check_finite_batch(inputs, None)


def jacobians(
    model: Any,
    inputs: Tensor,
    *,
    target: Target = None,
    forward: Callable[[Any, Tensor], Any] | None = None,
    output: OutputSelector = None,
    engine: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """Per-sample input Jacobians ``(N, M, *inputs.shape[1:])``, batched with ``vmap(jacrev)``.

    Same model handling as :func:`probe` (eval mode, detached parameters, no side effects), no check.

    Example:
        >>> import torch
        >>> from lightning_gradprobe import jacobians
        >>> jacobians(torch.nn.Linear(3, 2), torch.randn(4, 3)).shape
        torch.Size([4, 2, 3])

    """
    return _gradients(
        model, inputs, target, forward, output, engine, chunk_size, max_full_outputs=10**9, bounded=False
    )[0]


def saliency(
    model: Any,
    inputs: Tensor,
    *,
    target: Target = "argmax",
    forward: Callable[[Any, Tensor], Any] | None = None,
    output: OutputSelector = None,
    engine: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """Per-sample input gradient of one target output, shaped like ``inputs`` (signed).

    Example:
        >>> import torch
        >>> from lightning_gradprobe import saliency
        >>> saliency(torch.nn.Linear(3, 2), torch.randn(4, 3)).shape
        torch.Size([4, 3])

    """
    jac, kind, outputs = _gradients(
        model, inputs, target, forward, output, engine, chunk_size, max_full_outputs=64, bounded=True
    )
    return saliency_rows(jac, kind, outputs).reshape(inputs.shape)


def _gradients(
    model: Any,
    inputs: Tensor,
    target: Target,
    forward: Forward | None,
    output: OutputSelector,
    engine: str,
    chunk_size: int | None,
    *,
    max_full_outputs: int,
    bounded: bool,
) -> tuple[Tensor, str, Tensor]:
    ProbeOptions(engine=engine, chunk_size=chunk_size, max_full_outputs=max_full_outputs)  # validates them
    _check_tensor_inputs(inputs)
    with isolated(model, inputs.device):
        leaf = inputs.detach().clone().requires_grad_(True)
        forward_pass = forward_and_jacobians(
            model,
            leaf,
            target=target,
            forward=forward,
            output=output,
            engine=engine,
            chunk_size=chunk_size,
            max_full_outputs=max_full_outputs,
            n_projections=4,
            check_batch=False,
            generator=torch.Generator(),
            bounded=bounded,
        )
    return forward_pass.jacobians, forward_pass.selection.kind, forward_pass.outputs.detach()
