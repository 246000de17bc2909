"""``probe()``: per-sample input Jacobians checked against finite differences, with verdicts you can trust."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ._functions import (
    OutputSelector,
    Target,
    build_batch_function,
    build_parameter_function,
    build_selection,
    model_dtype,
)
from ._inputs import Packed, pack
from ._isolation import isolated
from ._jacobian import (
    ENGINE_AUTOGRAD,
    ENGINE_FUNC,
    CrossSampleCheck,
    check_cross_sample,
    compute_gradients,
    leak_tolerance,
    leaking_pairs,
)
from ._layers import LAYER, capture_output, find_token_embedding, replaced_output, resolve_layer
from ._second_order import check_second_order
from ._verdicts import (
    FAIL,
    INCONCLUSIVE,
    Judgement,
    Problem,
    default_rtol,
    judge_samples,
    output_projection,
    sample_verdicts,
    unit_rms,
)
from .report import ProbeReport, Verdict, dtype_name

__all__ = ["default_rtol", "jacobians", "probe", "saliency"]

_ENGINES = ("auto", ENGINE_FUNC, ENGINE_AUTOGRAD)
_MAX_JACOBIAN_BYTES = 1 << 30  # full per-sample Jacobians beyond this are replaced by random projections


def probe(
    model: Any,
    inputs: Any,
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
    check_parameters: bool = False,
    check_forward_mode: bool = False,
    localize_budget: tuple[int, float] = (64, 30.0),
    second_order: bool = False,
    layer: str | nn.Module | None = None,
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
        check_parameters: Also check each submodule's gradient with respect to its own parameters
            (on the first failing sample, else the first checked one): a wrong weight gradient corrupts
            training even when input gradients are right.
        check_forward_mode: Compare forward mode (``torch.func.jvp``) with the reverse-mode Jacobian.
        localize_budget: ``(max_modules, seconds)`` for localization.
        layer: A submodule (or its dotted name) whose *output* is differentiated instead of the model's input,
            computed fresh from ``inputs`` and fed back through a forward hook. Integer inputs (token ids)
            consumed by an ``nn.Embedding`` are probed at that embedding's output without being asked.
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
    _check_options(n_directions, engine, rtol, fd_dtype, max_full_outputs, chunk_size)
    generator = torch.Generator().manual_seed(int(seed))
    notes: list[str] = []
    owner = _owner(model)
    with isolated(model, _device_of(inputs)):
        prepared = _prepare(model, inputs, forward=forward, layer=layer, notes=notes)
        x, forward, packed = prepared.x, prepared.forward, prepared.packed
        _check_inputs(x, packed)
        free = None if packed is None else packed.free
        n = x.shape[0]
        dtype = model_dtype(model, x) if packed is None or isinstance(model, nn.Module) else packed.input_dtype
        rtol = default_rtol(dtype) if rtol is None else float(rtol)
        leaf = x.requires_grad_(True)
        function, outputs, selection, index, (gradients, projection) = _forward_and_gradients(
            model,
            leaf,
            target,
            forward,
            output,
            engine,
            chunk_size,
            max_full_outputs,
            n_directions,
            check_batch,
            generator,
            notes=notes,
            check_rows=True,
        )
        jac, engine_used, engine_note = gradients.jacobians.detach(), gradients.engine, gradients.fallback_reason
        # The saliency row first, then the rows the check sees (all of them, or their random projections).
        salient = jac[:, 0] if projection is not None else _saliency_rows(jac, selection.kind, outputs.detach())
        checked_rows = jac[:, 1:] if projection is not None else jac
        if engine_note:
            notes.append(f"torch.func could not run the model ({engine_note}); plain autograd was used")
        reference, reference_dtype = _finite_difference_function(
            model, forward, output, function, x.detach(), fd_dtype or dtype, notes
        )
        cross = _cross_sample(
            gradients, selection, outputs, leaf, index, reference, reference_dtype, rtol, generator, free
        )
        outputs, x = outputs.detach(), x.detach()
        checked = _choose_samples(check_samples, n, generator)
        evidence = Judgement.empty(n, n_directions)
        implicated = _apply_cross_sample(cross, checked, evidence, notes)
        judged = torch.tensor([i for i in checked.tolist() if i not in implicated], dtype=torch.long)
        problem = Problem(
            function,
            reference,
            selection,
            dtype,
            reference_dtype,
            rtol,
            engine_used,
            chunk_size,
            projection=projection,
            free=free,
        )
        if len(judged):
            rows = judged.to(x.device)
            judgement = judge_samples(
                problem, checked_rows[rows], x[rows], index[rows], generator=generator, n_directions=n_directions
            )
            evidence.fill(judged, judgement)
            notes += judgement.notes
        forward_mismatch = (
            _forward_mode_mismatch(
                function, selection, x, index, checked_rows, projection, checked, generator, rtol, notes, free
            )
            if check_forward_mode and len(checked)
            else None
        )
        second = None
        if second_order and len(judged):
            second, _ = check_second_order(
                problem,
                x,
                index,
                judged,
                n_outputs=selection.n_outputs,
                generator=generator,
                n_directions=n_directions,
                parameters=(
                    build_parameter_function(model, forward=forward, output=output)
                    if isinstance(model, nn.Module)
                    else None
                ),
            )
    for note in notes:
        if note.startswith(_WEAKER):
            _warn_once(owner, note)
    flat = jac.reshape(n, -1)
    salient_flat = salient.reshape(n, -1)
    verdicts = [Verdict.UNCHECKED] * n
    for i, verdict in zip(checked.tolist(), sample_verdicts(evidence.codes[checked]), strict=True):
        verdicts[i] = verdict
    culprits, localization_note = (), None
    failing = [i for i, v in enumerate(verdicts) if v is Verdict.FAIL]
    if (localize and failing) or check_parameters:
        culprits, localization_note = _localize(
            model,
            x,
            failing or checked.tolist(),
            forward,
            n_directions,
            seed,
            localize_budget,
            check_parameters,
            inputs_too=localize and bool(failing),
        )
    if second is not None and localize and not second.ok:
        sample = (second.failed or checked.tolist())[0]
        found, note = _localize(
            model, x, [sample], forward, n_directions, seed, localize_budget, False, inputs_too=False, second_order=True
        )
        second = replace(second, culprits=found)
        localization_note = (
            f"{localization_note}; second order: {note}" if localization_note else f"second order: {note}"
        )
    return ProbeReport(
        verdicts=tuple(verdicts),
        saliency=_structured_saliency(salient.reshape(x.shape), prepared),
        layer=prepared.layer,
        token_scores=_token_scores(salient, prepared),
        batch_independent=(not cross.forward and not cross.unverified) if check_batch and n > 1 else None,
        leaking_pairs=cross.forward + cross.unverified,
        mixing_pairs=cross.backward_only,
        checked=checked,
        relative_error=evidence.relative_error,
        fd_error=evidence.fd_error,
        margin=evidence.margin,
        resolution=evidence.resolution,
        dtype_error=evidence.dtype_error,
        steps=evidence.steps,
        rechecked_nearby=evidence.moved,
        grad_norm=salient_flat.double().norm(dim=1).cpu(),
        nonfinite_count=(~flat.isfinite()).sum(1).cpu(),
        zero_fraction=(flat == 0).double().mean(1).cpu(),
        engine=engine_used,
        engine_note=engine_note,
        model_dtype=dtype,
        fd_dtype=reference_dtype,
        n_outputs=selection.n_outputs,
        projected=selection.kind == "projected",
        rtol=rtol,
        notes=tuple(notes),
        outputs=outputs.cpu(),
        culprits=culprits,
        localization_note=localization_note,
        forward_mode_mismatch=forward_mismatch,
        second_order=second,
    )


_WEAKER = "weaker check: "
_WARNED: set[tuple[str, str]] = set()


def _owner(model: Any) -> str:
    """A name for the model in one-time warnings."""
    if isinstance(model, nn.Module):
        return type(model).__name__
    return getattr(model, "__qualname__", type(model).__name__)


def _warn_once(owner: str, note: str) -> None:
    """Say it when a check runs weaker than its defaults, once per model and reason."""
    key = (owner, note.split(":")[1] if ":" in note else note)
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(f"gradprobe: {owner}: {note}. (Shown once per model.)", RuntimeWarning, stacklevel=3)


def _cross_sample(
    gradients: Any,
    selection: Any,
    outputs: Tensor,
    leaf: Tensor,
    index: Tensor,
    reference: Callable[[Tensor], Tensor],
    reference_dtype: torch.dtype,
    rtol: float,
    generator: torch.Generator,
    free: Tensor | None,
) -> CrossSampleCheck:
    """Cross-sample gradients autograd claims, checked against finite differences across samples."""
    none = CrossSampleCheck((), (), (), 0, {}, {})
    if gradients.leaking_inputs is None or not bool(gradients.leaking_inputs.any()):
        return none
    selected = selection(outputs, index)
    pairs = leaking_pairs(selected, leaf, generator=generator, tolerance=leak_tolerance(outputs.dtype))
    if not pairs:
        return none
    return check_cross_sample(
        pairs,
        selected,
        leaf,
        reference,
        selection,
        index,
        leaf.detach().to(reference_dtype),
        generator=generator,
        rtol=rtol,
        free=free,
    )


def _apply_cross_sample(cross: CrossSampleCheck, checked: Tensor, evidence: Judgement, notes: list[str]) -> set[int]:
    """Codes for samples the per-sample check cannot judge, which it then leaves out.

    A dependence only the backward claims is a wrong backward: both samples of each pair fail. A dependence
    the forward really has makes per-sample gradients ill-defined (and the model may not even run on part of
    its batch): every checked sample is inconclusive.
    """
    chosen = set(checked.tolist())
    if cross.forward or cross.unverified:
        evidence.codes[checked] = INCONCLUSIVE
        notes.append(
            "samples leak into each other through the forward (confirmed by finite differences across samples), "
            "so per-sample gradients are ill-defined: not checked"
        )
        return chosen
    wrong = {i for pair in cross.backward_only for i in pair} & chosen
    for i in wrong:
        evidence.codes[i] = FAIL
        evidence.relative_error[i] = max(cross.relative_error.values(), default=float("nan"))
        evidence.margin[i] = max(cross.margin.values(), default=float("nan"))
    if cross.backward_only:
        notes.append(
            f"the backward mixes samples that the forward keeps apart: {len(cross.backward_only)} (output, input) "
            f"pairs {list(cross.backward_only[:6])} have autograd gradients that finite differences across samples "
            f"do not show ({cross.sources_checked} source samples checked): a wrong backward"
        )
    return wrong


def _localize(
    model: Any,
    x: Tensor,
    candidates: list[int],
    forward: Any,
    n_directions: int,
    seed: int,
    budget: tuple[int, float],
    parameters: bool,
    *,
    inputs_too: bool,
    second_order: bool = False,
) -> tuple[tuple[Any, ...], str]:
    from torch import nn

    from .localize import localize as run_localize

    if not isinstance(model, nn.Module):
        return (), "not localized: the model is a plain callable, not an nn.Module"
    sample = candidates[0]
    try:
        result = run_localize(
            model,
            x[sample : sample + 1],
            forward=forward,
            n_directions=n_directions,
            seed=seed,
            max_modules=budget[0],
            time_budget=budget[1],
            parameters=parameters,
            second_order=second_order,
        )
    except Exception as error:  # localization is a help, never a reason to lose the verdicts
        return (), f"localization failed on sample {sample}: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    wanted = {"second-order"} if second_order else {"input", "parameter"} if inputs_too else {"parameter"}
    culprits = tuple(c for c in result.culprits if c.kind in wanted)
    note = f"sample {sample}: {len(result.checked)} submodules checked on their own"
    if result.skipped:
        note += f", {len(result.skipped)} skipped ({next(iter(result.skipped.values()))}, ...)"
    if result.cut_short:
        note += f"; cut short: {result.cut_short}"
    return culprits, note


def _forward_mode_mismatch(
    function: Callable[[Tensor], Tensor],
    selection: Any,
    x: Tensor,
    index: Tensor,
    rows: Tensor,
    projection: Tensor | None,
    checked: Tensor,
    generator: torch.Generator,
    rtol: float,
    notes: list[str],
    free: Tensor | None,
) -> tuple[int, ...] | None:
    """Samples whose jvp along a random direction disagrees with the reverse-mode rows (seen through ``projection``)."""
    sub = checked.to(x.device)
    xc, ic = x[sub], index[sub]
    tangent = unit_rms(torch.randn(xc.shape, generator=generator).double(), 1, free).to(xc)
    try:
        forward_mode = torch.func.jvp(lambda t: selection(function(t), ic), (xc,), (tangent,))[1].double()
    except Exception as error:  # custom Functions without a jvp rule, ops without forward AD
        notes.append(f"forward mode not checked: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
        return None
    if projection is not None:
        forward_mode = forward_mode @ projection.to(forward_mode)
    rows_c = rows[sub].reshape(len(sub), rows.shape[1], -1).double()
    flat_tangent = tangent.reshape(len(sub), -1).double()
    reverse = torch.einsum("nmd,nd->nm", rows_c, flat_tangent)
    typical = rows_c.norm(dim=(1, 2)) * flat_tangent.norm(dim=1) / rows_c.shape[-1] ** 0.5
    scale = torch.maximum(reverse.norm(dim=1), typical).clamp_min(torch.finfo(torch.float64).tiny)
    gap = (forward_mode - reverse).norm(dim=1) / scale
    bad = (gap > 10 * rtol) | ~forward_mode.isfinite().all(1)
    return tuple(int(checked[i]) for i in bad.nonzero().flatten().tolist())


def _saliency_rows(jac: Tensor, kind: str, outputs: Tensor) -> Tensor:
    if kind == "all" and jac.shape[1] > 1:
        rows = outputs.reshape(outputs.shape[0], -1).argmax(1).to(jac.device)
        return jac[torch.arange(jac.shape[0], device=jac.device), rows]
    if kind == "callable":
        return jac.sum(1)
    return jac[:, 0]


def _finite_difference_function(
    model: Any,
    forward: Any,
    output: OutputSelector,
    function: Callable[[Tensor], Tensor],
    x: Tensor,
    fd_dtype: torch.dtype,
    notes: list[str],
) -> tuple[Callable[[Tensor], Tensor], torch.dtype]:
    """The model in ``fd_dtype`` if it runs there, else the model as it is (with a note)."""
    own = model_dtype(model, x)
    if fd_dtype == own:
        return function, own
    candidate = build_batch_function(model, forward=forward, output=output, dtype=fd_dtype)
    try:
        with torch.no_grad():
            result = candidate(x.to(fd_dtype))
        if result.dtype == fd_dtype:
            return candidate, fd_dtype
        reason = f"it returned {result.dtype}"
    except Exception as error:  # the model cannot run in fd_dtype (MPS, float32-only kernels)
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:120]}"
    hint = (
        "pass the nn.Module itself, with `forward=lambda m, x: ...`, so that a float64 copy can be made"
        if not isinstance(model, nn.Module)
        else "the formula could not be judged in float64"
    )
    notes.append(
        f"{_WEAKER}finite differences ran in {dtype_name(own)}, not {dtype_name(fd_dtype)}, with a step sized for it: "
        f"the model cannot run in {dtype_name(fd_dtype)} ({reason}); {hint}"
    )
    return function, own


def _choose_samples(check_samples: int | Sequence[int] | None, n: int, generator: torch.Generator) -> Tensor:
    if check_samples is None:
        return torch.arange(n)
    if isinstance(check_samples, bool):
        raise TypeError(f"probe: `check_samples` must be None, an int or a sequence of indices, got {check_samples!r}.")
    if isinstance(check_samples, int):
        if check_samples < 0:
            raise ValueError(f"probe: `check_samples` must be >= 0, got {check_samples}.")
        return torch.randperm(n, generator=generator)[: min(check_samples, n)].sort().values
    chosen = torch.as_tensor(list(check_samples), dtype=torch.long)
    if chosen.numel() and (chosen.min() < 0 or chosen.max() >= n):
        raise ValueError(f"probe: `check_samples` indices must be in [0, {n - 1}], got {chosen.tolist()}.")
    return chosen.unique()


def _check_options(
    n_directions: int,
    engine: str,
    rtol: float | None,
    fd_dtype: torch.dtype | None,
    max_full_outputs: int,
    chunk_size: int | None,
) -> None:
    if isinstance(n_directions, bool) or not isinstance(n_directions, int) or n_directions < 1:
        raise ValueError(f"probe: `n_directions` must be an int >= 1, got {n_directions!r}.")
    if engine not in _ENGINES:
        raise ValueError(f"probe: `engine` must be one of {_ENGINES}, got {engine!r}.")
    if rtol is not None and not rtol > 0:
        raise ValueError(f"probe: `rtol` must be > 0, got {rtol!r}.")
    if fd_dtype is not None and not (isinstance(fd_dtype, torch.dtype) and fd_dtype.is_floating_point):
        raise ValueError(f"probe: `fd_dtype` must be a floating torch.dtype or None, got {fd_dtype!r}.")
    if isinstance(max_full_outputs, bool) or not isinstance(max_full_outputs, int) or max_full_outputs < 1:
        raise ValueError(f"probe: `max_full_outputs` must be an int >= 1, got {max_full_outputs!r}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"probe: `chunk_size` must be None or an int >= 1, got {chunk_size!r}.")


def _check_inputs(x: Tensor, packed: Packed | None) -> None:
    """The (packed) floating batch: a non-empty batch dimension first, finite where it is differentiated."""
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"probe: `inputs` must have a non-empty batch dimension first, got shape {tuple(x.shape)}.")
    values = x if packed is None else x[:, packed.free.to(x.device)]
    if not bool(values.isfinite().all()):
        bad = (~values.reshape(x.shape[0], -1).isfinite()).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"probe: `inputs` holds NaN/Inf values in samples {bad[:8]}; finite differences need finite inputs. "
            "Leave those samples out (e.g. `x[x.isfinite().flatten(1).all(1)]`)."
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
    _check_inputs(inputs, None)


def _check_outputs(outputs: Tensor, n: int) -> None:
    if outputs.ndim == 0 or outputs.shape[0] != n:
        raise ValueError(
            f"probe: the model's output has shape {tuple(outputs.shape)}, without the batch dimension "
            f"({n}) first. Return per-sample outputs (N, ...) - e.g. not a loss already reduced over the batch."
        )
    if not outputs.is_floating_point():
        raise TypeError(f"probe: the model's output must be floating, got {outputs.dtype}.")


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
    return _saliency_rows(jac, kind, outputs).reshape(inputs.shape)


def _gradients(
    model: Any,
    inputs: Tensor,
    target: Target,
    forward: Any,
    output: OutputSelector,
    engine: str,
    chunk_size: int | None,
    *,
    max_full_outputs: int,
    bounded: bool,
) -> tuple[Tensor, str, Tensor]:
    _check_options(1, engine, None, None, max_full_outputs, chunk_size)
    _check_tensor_inputs(inputs)
    with isolated(model, inputs.device):
        leaf = inputs.detach().clone().requires_grad_(True)
        _, outputs, selection, _, (gradients, _) = _forward_and_gradients(
            model,
            leaf,
            target,
            forward,
            output,
            engine,
            chunk_size,
            max_full_outputs,
            4,
            False,
            torch.Generator(),
            bounded=bounded,
        )
        jac = gradients.jacobians.detach()
        outputs = outputs.detach()
    return jac, selection.kind, outputs


def _forward_and_gradients(
    model: Any,
    leaf: Tensor,
    target: Target,
    forward: Any,
    output: OutputSelector,
    engine: str,
    chunk_size: int | None,
    max_full_outputs: int,
    n_projections: int,
    check_batch: bool,
    generator: torch.Generator,
    *,
    bounded: bool = True,
    notes: list[str] | None = None,
    check_rows: bool = False,
) -> tuple[Callable[[Tensor], Tensor], Tensor, Any, Tensor, Any]:
    """One forward of the batch (the model gets a copy it may write into), the selection, the Jacobians.

    With ``check_rows`` and more outputs than the check compares, only the rows a probe needs are computed:
    the saliency row, then the random output projections the check sees (``gradients.projection``).
    """
    function = build_batch_function(model, forward=forward, output=output, dtype=None)
    outputs = function(leaf.clone())
    _check_outputs(outputs, leaf.shape[0])
    # Memory bound: full Jacobians are N x M x D; past the budget, compare random output projections instead.
    bytes_per_row = leaf.numel() * leaf.element_size()
    affordable = max(1, _MAX_JACOBIAN_BYTES // max(bytes_per_row, 1)) if bounded else max_full_outputs
    selection, index = build_selection(
        target,
        outputs.detach(),
        max_full_outputs=min(max_full_outputs, affordable),
        n_projections=n_projections,
        generator=generator,
    )
    if notes is not None and selection.kind == "projected":
        n_outputs = outputs[0].numel()
        why = (
            f"more than `max_full_outputs`={max_full_outputs}"
            if n_outputs > max_full_outputs
            else "full Jacobians past the 1 GiB memory budget"
        )
        notes.append(
            f"{_WEAKER}{n_outputs} outputs per sample were compared through {selection.n_outputs} random "
            f"projections ({why}); pass `target=` to check chosen outputs in full"
        )
    projection = output_projection(selection.n_outputs, generator, leaf.device) if check_rows else None
    cotangents = None
    if projection is not None:
        n = leaf.shape[0]
        salient = _saliency_cotangent(selection, outputs.detach(), index).double()
        cotangents = torch.cat([salient[None], projection.T[:, None, :].expand(-1, n, -1)])
    gradients = compute_gradients(
        function,
        selection,
        leaf,
        outputs,
        index,
        engine=engine,
        check_batch=check_batch,
        generator=generator,
        chunk_size=chunk_size,
        owner=type(model).__name__,
        cotangents=cotangents,
    )
    return function, outputs, selection, index, (gradients, projection)


def _saliency_cotangent(selection: Any, outputs: Tensor, index: Tensor) -> Tensor:
    """``(N, M)``: the combination of selected outputs whose input gradient is each sample's saliency."""
    n, m = outputs.shape[0], selection.n_outputs
    if selection.kind == "all":
        return torch.nn.functional.one_hot(outputs.reshape(n, -1).argmax(1), m).to(outputs.device)
    if selection.kind == "callable":
        return torch.ones((n, m), device=outputs.device)
    return torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long, device=outputs.device), m)


@dataclass(frozen=True)
class _Prepared:
    """The inputs as the engine sees them: one floating batch, and how the model is called on it."""

    x: Tensor
    forward: Callable[[Any, Tensor], Any] | None
    packed: Packed | None = None
    layer: str | None = None
    layer_output: Tensor | None = None


def _prepare(
    model: Any, inputs: Any, *, forward: Callable[[Any, Any], Any] | None, layer: Any, notes: list[str]
) -> _Prepared:
    """Pack structured inputs; find a token model's embedding; set up probing at a layer's output."""
    if isinstance(inputs, Tensor) and inputs.is_floating_point() and layer is None:
        return _Prepared(inputs.detach().clone(), forward)

    def call_raw(m: Any, raw: Any) -> Any:
        if forward is not None:
            return forward(m, raw)
        if isinstance(raw, Mapping):
            return m(**raw)
        return m(*raw) if isinstance(raw, (tuple, list)) else m(raw)

    entries = _as_entries(inputs)
    if layer is None:
        if any(isinstance(v, Tensor) and v.is_floating_point() for v in entries.values()):
            packed = pack(inputs)
            return _Prepared(
                packed.flat, lambda m, x: call_raw(m, packed.unpack(x, _compute_dtype(m, x, packed))), packed
            )
        layer = _token_embedding(model, inputs, entries, call_raw, notes)
    name, module = resolve_layer(model, layer)
    output = capture_output(module, lambda: call_raw(model, inputs))
    packed = pack({LAYER: output, **entries}, differentiate=lambda key, _value: key == LAYER)

    def at_layer(m: Any, x: Tensor) -> Any:
        values = packed.unpack(x, _compute_dtype(m, x, packed))
        with replaced_output(module, values[LAYER]):
            return call_raw(m, _rebuild(inputs, values))

    return _Prepared(packed.flat, at_layer, packed, name, output)


def _compute_dtype(model: Any, x: Tensor, packed: Packed) -> torch.dtype | None:
    """The dtype a packed batch's floating inputs are handed to the model in.

    A module's own (float64 for the reference copy); for a plain callable, ``x``'s when it is not the packing
    dtype (the float64 reference), else each input's own.
    """
    if isinstance(model, nn.Module):
        return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return None if x.dtype == packed.pack_dtype else x.dtype


def _token_embedding(
    model: Any, inputs: Any, entries: dict[Any, Any], call_raw: Callable[[Any, Any], Any], notes: list[str]
) -> nn.Module:
    """Zero-config token models: the nn.Embedding that consumes an integer input, said once."""
    ids = [v for v in entries.values() if isinstance(v, Tensor) and v.ndim > 0 and not v.is_floating_point()]
    if isinstance(model, nn.Module):
        for candidate in ids:
            found = find_token_embedding(model, candidate, lambda: call_raw(model, inputs))
            if found is not None:
                notes.append(
                    f"token model: probed at the output of the embedding `{found[0]}` (token ids have no input "
                    "gradient); pass `layer=` to probe elsewhere"
                )
                _warn_once(type(model).__name__, notes[-1])
                return found[1]
    kinds = sorted({str(v.dtype) for v in ids}) or [type(inputs).__name__]
    raise TypeError(
        f"probe: the inputs hold no floating tensor ({', '.join(kinds)}), and no nn.Embedding of the model consumes "
        "them. Input gradients of integer inputs (token ids) do not exist: probe an embedding's (or any layer's) "
        'output with `layer=` (a submodule or its dotted name), e.g. `probe(model, ids, layer="embed")`.'
    )


def _as_entries(inputs: Any) -> dict[Any, Any]:
    if isinstance(inputs, Mapping):
        return dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return dict(enumerate(inputs))
    return {0: inputs}


def _rebuild(inputs: Any, values: Mapping[Any, Any]) -> Any:
    """The inputs' own structure from unpacked values (the probed layer's entry left out)."""
    if isinstance(inputs, Mapping):
        return {k: values[k] for k in inputs}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(values[i] for i in range(len(inputs)))
    return values[0]


def _device_of(inputs: Any) -> torch.device:
    for value in _as_entries(inputs).values():
        if isinstance(value, Tensor):
            return value.device
    raise TypeError(
        f"probe: `inputs` must be a tensor, a tuple/list or a dict of tensors, got {type(inputs).__name__}."
    )


def _structured_saliency(salient: Tensor, prepared: _Prepared) -> Any:
    if prepared.packed is None:
        return salient
    structured = prepared.packed.structure(salient.reshape(salient.shape[0], -1))
    return structured[LAYER] if prepared.layer is not None else structured


def _token_scores(salient: Tensor, prepared: _Prepared) -> dict[str, Tensor] | None:
    """Per-token reductions of a ``(N, L, E)`` layer gradient: its L2 norm and gradient x embedding over ``E``."""
    output = prepared.layer_output
    if output is None or output.ndim != 3 or prepared.packed is None:
        return None
    gradient = prepared.packed.structure(salient.reshape(salient.shape[0], -1))[LAYER].double()
    return {"norm": gradient.norm(dim=-1).cpu(), "grad_x_input": (gradient * output.double()).sum(-1).cpu()}
