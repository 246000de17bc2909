"""The model as a pure function of its input batch, and the choice of outputs to differentiate."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._cast import LazyCast, as_dtype, use_lazy_casts
from ._sharding import Swap, agreed_buffers, is_sharded, shards, swapped_at_call

__all__ = [
    "BatchFunction",
    "OutputSelector",
    "Selection",
    "Target",
    "ParameterFunction",
    "build_batch_function",
    "build_parameter_function",
    "build_selection",
]

OutputSelector = int | str | Callable[[Any], Tensor] | None
"""Which tensor of a tuple/dict output to check: an index, a key, or a callable."""

Target = str | int | Tensor | Callable[[Tensor], Tensor] | None
"""Which outputs of each sample to differentiate (see :func:`~lightning_gradprobe.probe`)."""

BatchFunction = Callable[[Tensor], Tensor]
_R = TypeVar("_R")


class _ForwardModule(nn.Module):
    """Wraps ``forward(module, x)`` so that ``functional_call`` can swap the module's tensors."""

    def __init__(self, module: nn.Module, forward: Callable[[nn.Module, Tensor], Any]) -> None:
        super().__init__()
        self.module = module
        self._forward = forward

    def forward(self, x: Tensor) -> Any:
        return self._forward(self.module, x)


def _pick_output(outputs: Any, output: OutputSelector) -> Tensor:
    if output is not None and not callable(output):
        if isinstance(outputs, Tensor):
            raise ValueError(
                f"probe: `output`={output!r} picks one tensor out of a tuple/list or dict output, but the model "
                f"returned a tensor of shape {tuple(outputs.shape)}: leave `output=None` (to choose which outputs "
                "of each sample to check, use `target=`)."
            )
        try:
            outputs = outputs[output]
        except (IndexError, KeyError, TypeError) as error:
            keys = list(outputs.keys()) if hasattr(outputs, "keys") else f"{len(outputs)} entries"
            raise ValueError(
                f"probe: `output`={output!r} is not in the model's {type(outputs).__name__} output ({keys}); pass "
                "an index or key it has, or a callable."
            ) from error
    elif output is not None:
        outputs = output(outputs)
    elif not isinstance(outputs, Tensor) and isinstance(getattr(outputs, "logits", None), Tensor):
        outputs = outputs.logits  # Hugging Face ModelOutput, and the like
    if not isinstance(outputs, Tensor):
        kind = type(outputs).__name__
        raise TypeError(
            f"probe: the model returned a {kind}, not a tensor (and no `.logits`); pass `output=` (an index, a key "
            "or a callable) to say which tensor's input gradient to check."
        )
    return outputs


def build_batch_function(
    model: Any,
    *,
    forward: Callable[[Any, Tensor], Any] | None,
    output: OutputSelector,
    dtype: torch.dtype | None,
) -> BatchFunction:
    """Return ``x -> outputs`` over *detached* copies of the model's tensors, optionally cast to ``dtype``.

    For an ``nn.Module`` the parameters and buffers are swapped in with ``functional_call``:
    parameters are detached (no ``.grad`` can ever be written) and buffers cloned (no running
    statistic can ever move). A big model's parameters are cast op by op (:class:`~._cast.LazyCast`), never
    held whole in ``dtype``. For a plain callable the inputs are cast and the callable called.
    """
    if isinstance(model, nn.Module) and is_sharded(model):
        return _sharded_batch_function(model, forward, output, dtype)
    if isinstance(model, nn.Module):
        root: nn.Module = model if forward is None else _ForwardModule(model, forward)
        prefix = "" if forward is None else "module."
        # Every name a tensor is reachable by, shared modules and tied weights included, maps to one copy: the
        # swap is then complete without functional_call's own weight tying (which can leave a shared
        # submodule's parameter replaced after the call).
        copies: dict[int, Tensor] = {}
        tensors: dict[str, Tensor] = {}
        lazy = dtype is not None and use_lazy_casts(model.parameters(), dtype)
        for name, param in _slots(model, model.named_parameters(remove_duplicate=False)):
            if id(param) not in copies:
                copies[id(param)] = as_dtype(param, dtype, lazy=lazy)
            tensors[prefix + name] = copies[id(param)]
        for name, buffer in _slots(model, model.named_buffers(remove_duplicate=False)):
            tensors[prefix + name] = copies.setdefault(id(buffer), _cast(buffer.detach(), dtype).clone())

        def call(x: Tensor) -> Tensor:
            return _pick_output(functional_call(root, tensors, (x,), strict=False, tie_weights=False), output)

        return call

    if not callable(model):
        raise TypeError(f"probe: `model` must be an nn.Module or a callable, got {type(model).__name__}.")

    def call_plain(x: Tensor) -> Tensor:
        outputs = model(x) if forward is None else forward(model, x)
        return _pick_output(outputs, output)

    return call_plain


def _sharded_batch_function(
    model: nn.Module, forward: Callable[[Any, Tensor], Any] | None, output: OutputSelector, dtype: torch.dtype | None
) -> BatchFunction:
    """``x -> outputs`` of a sharded (FSDP2) model, its parameters' shards gathered op by op.

    Each submodule computes with lazy casts of its parameters' shards (see ``_sharding``), and clones of its
    buffers: nothing is ever written.
    """
    held, buffers = shards(model), agreed_buffers(model)

    def swap(module: nn.Module, name: str, tensor: Tensor, is_buffer: bool) -> Tensor:
        if is_buffer:
            return _cast(buffers.get((id(module), name), tensor), dtype).clone()
        shard = held.get((id(module), name), tensor)
        return LazyCast(tensor, dtype or tensor.dtype, shard=shard)  # (FSDP's mixed precision: its gathered dtype)

    def call(x: Tensor) -> Tensor:
        return _call_swapped(model, forward, output, swap, x)

    return call


@dataclass(frozen=True)
class ParameterFunction:
    """The model as a function of its floating parameters and a batch: ``(values, x) -> outputs``.

    ``parameters`` are the model's unique floating parameters (each shared or tied one once), never written;
    ``values`` holds one tensor per parameter, in that order. For a ``sharded`` (FSDP2) model the parameters are
    shards and the values must be :class:`~._cast.LazyCast` casts: each is pointed at its parameter as FSDP
    gathers it, when its submodule runs. Buffers are cloned and follow the values' dtype,
    so the same function runs the float64 reference when given float64 copies. ``trainable`` says, per
    parameter, whether it requires grad. ``fixed_rows`` holds ``(parameter, row)`` pairs whose gradient PyTorch
    leaves at zero on purpose (an embedding's ``padding_idx`` row): a check must not move them.
    """

    parameters: tuple[Tensor, ...]
    trainable: tuple[bool, ...]
    call: Callable[[Sequence[Tensor], Tensor], Tensor]
    sharded: bool = False
    fixed_rows: tuple[tuple[int, int], ...] = ()
    hold: Callable[[Sequence[Tensor], Callable[[BatchFunction], _R]], _R] | None = None

    def held(self, values: Sequence[Tensor], body: Callable[[BatchFunction], _R]) -> _R:
        """``body(x -> outputs)``, the ``values`` put in place once for every call that ``body`` makes.

        The values must stay the same tensors while ``body`` runs (moved in place, never replaced). Swapping a
        model's tensors in walks its modules: a check that calls the model five times at one set of values walks
        them once.

        Example:
            >>> model = nn.Linear(3, 2)
            >>> function = build_parameter_function(model, forward=None, output=None)
            >>> values = [p.double() for p in function.parameters]
            >>> x = torch.randn(4, 3, dtype=torch.float64)
            >>> torch.equal(function.held(values, lambda model_at: model_at(x)), function.call(values, x))
            True

        """
        if self.hold is None:
            return body(lambda x: self.call(values, x))
        return self.hold(values, body)


def build_parameter_function(
    model: nn.Module, *, forward: Callable[[Any, Tensor], Any] | None, output: OutputSelector
) -> ParameterFunction | None:
    """``(values, x) -> outputs`` for an ``nn.Module`` with floating parameters, else ``None``."""
    if is_sharded(model):
        return _sharded_parameter_function(model, forward, output)
    root: nn.Module = model if forward is None else _ForwardModule(model, forward)
    prefix = "" if forward is None else "module."
    unique = [p for _, p in model.named_parameters() if p.is_floating_point()]  # each shared parameter once
    if not unique:
        return None
    position = {id(p): i for i, p in enumerate(unique)}
    # Every name a parameter is reachable by (shared modules, tied weights) reads the same value.
    aliases = [
        (prefix + n, position[id(p)])
        for n, p in _slots(model, model.named_parameters(remove_duplicate=False))
        if id(p) in position
    ]
    buffers = {prefix + n: b.detach().clone() for n, b in _slots(model, model.named_buffers(remove_duplicate=False))}

    def call(values: Sequence[Tensor], x: Tensor) -> Tensor:
        tensors = {name: values[i] for name, i in aliases}
        tensors.update({k: _cast(v, values[0].dtype) for k, v in buffers.items()})
        return _pick_output(functional_call(root, tensors, (x,), strict=False, tie_weights=False), output)

    def hold(values: Sequence[Tensor], body: Callable[[BatchFunction], _R]) -> _R:
        def model_at(x: Tensor) -> Tensor:  # the buffers cast afresh for every call, as `call` does
            tensors = {k: _cast(v, values[0].dtype) for k, v in buffers.items()}
            return _pick_output(functional_call(root, tensors, (x,), strict=False, tie_weights=False), output)

        held = {_Holder.PREFIX + name: values[i] for name, i in aliases}
        return functional_call(_Holder(root), held, (body, model_at), strict=False, tie_weights=False)

    return ParameterFunction(
        tuple(p.detach() for p in unique),
        tuple(p.requires_grad for p in unique),
        call,
        fixed_rows=_padding_rows(model, position),
        hold=hold,
    )


class _Holder(nn.Module):
    """Runs ``body(model_at)`` as its forward: ``functional_call`` on it swaps the model's tensors once for all."""

    PREFIX = "root."

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self.root = root

    def forward(self, body: Callable[[BatchFunction], _R], model_at: BatchFunction) -> _R:
        return body(model_at)


def _sharded_parameter_function(
    model: nn.Module, forward: Callable[[Any, Tensor], Any] | None, output: OutputSelector
) -> ParameterFunction | None:
    """``(values, x) -> outputs`` of a sharded (FSDP2) model: each value put in place as its submodule runs."""
    held, buffers = shards(model), agreed_buffers(model)
    unique = list({id(p): p for p in held.values()}.values())  # each shared parameter once
    if not unique:
        return None
    position = {id(p): i for i, p in enumerate(unique)}
    slots = {slot: position[id(p)] for slot, p in held.items()}

    def call(values: Sequence[Tensor], x: Tensor) -> Tensor:
        def swap(module: nn.Module, name: str, tensor: Tensor, is_buffer: bool) -> Tensor:
            if is_buffer:
                return _cast(buffers.get((id(module), name), tensor), values[0].dtype).clone()
            value = values[slots[(id(module), name)]]
            if isinstance(value, LazyCast):  # made of the shard: reads what FSDP gathered while FSDP holds it
                if value.shard is None:
                    value.shard = value.source
                value.source = value.shard if tensor is held[(id(module), name)] else tensor.detach()
            return value

        return _call_swapped(model, forward, output, swap, x)

    parameters = tuple(p.detach() for p in unique)
    fixed = tuple(
        (slots[(id(module), "weight")], row)
        for module, row in _padded_embeddings(model)
        if (id(module), "weight") in slots
    )
    return ParameterFunction(parameters, tuple(p.requires_grad for p in unique), call, sharded=True, fixed_rows=fixed)


def _padded_embeddings(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """Embeddings with a ``padding_idx``, and that row: PyTorch gives it no gradient, on purpose."""
    found: list[tuple[nn.Module, int]] = []
    for module in model.modules():
        padding = getattr(module, "padding_idx", None)
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and padding is not None:
            found.append((module, int(padding) % module.num_embeddings))
    return found


def _padding_rows(model: nn.Module, position: dict[int, int]) -> tuple[tuple[int, int], ...]:
    """``(parameter, row)`` of every padded embedding among the unique parameters (see :func:`_padded_embeddings`)."""
    return tuple(
        (position[id(module.weight)], row) for module, row in _padded_embeddings(model) if id(module.weight) in position
    )


def _call_swapped(
    model: nn.Module, forward: Callable[[Any, Tensor], Any] | None, output: OutputSelector, swap: Swap, x: Tensor
) -> Tensor:
    """A sharded model's selected outputs on ``x``, each submodule computing with what ``swap`` hands it."""
    with swapped_at_call(model, swap):
        return _pick_output(model(x) if forward is None else forward(model, x), output)


def _slots(model: nn.Module, named: Any) -> list[tuple[str, Tensor]]:
    """One name per attribute slot that holds a tensor.

    Tied weights (two modules, one tensor) keep both names; a shared submodule (one module reachable by two paths)
    keeps one, since swapping one slot twice would leave the swapped-in copy behind.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    seen: set[tuple[int, str]] = set()
    kept = []
    for name, tensor in named:
        owner, _, attribute = name.rpartition(".")
        slot = (id(modules[owner]), attribute)
        if slot not in seen:
            seen.add(slot)
            kept.append((name, tensor))
    return kept


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    if dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def model_dtype(model: Any, inputs: Tensor) -> torch.dtype:
    """The floating dtype the model computes in: its first floating parameter's, else the inputs'."""
    if isinstance(model, nn.Module):
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                return tensor.dtype
    return inputs.dtype


@dataclass(frozen=True)
class Selection:
    """Maps a batch of outputs ``(B, ...)`` to the rows to differentiate, ``(B, M)``.

    ``kind`` is ``"all"`` (every output), ``"index"`` (one output per sample, chosen by the
    per-sample ``index`` passed alongside), ``"callable"`` (a user function), or ``"projected"``
    (many outputs, compared through random projections ``outputs @ projection``).
    """

    kind: str
    n_outputs: int
    projection: Tensor | None = None
    function: Callable[[Tensor], Tensor] | None = None

    def __call__(self, outputs: Tensor, index: Tensor) -> Tensor:
        if self.kind == "callable":
            assert self.function is not None
            outputs = self.function(outputs)
        flat = outputs.reshape(outputs.shape[0], -1)
        if self.kind == "index":
            return flat.gather(1, index.reshape(-1, 1))
        if self.kind == "projected":
            assert self.projection is not None
            return flat @ self.projection.to(flat.dtype)
        return flat


def build_selection(
    target: Target,
    outputs: Tensor,
    *,
    max_full_outputs: int,
    n_projections: int,
    generator: torch.Generator,
) -> tuple[Selection, Tensor]:
    """Validate ``target`` against a batch of outputs; return the selection and the per-sample index.

    Args:
        target: See :func:`~lightning_gradprobe.probe`.
        outputs: The model's outputs on the whole batch, ``(N, ...)``.
        max_full_outputs: Above this many outputs per sample, compare random projections instead.
        n_projections: How many random output projections to use then.
        generator: The probe's own generator (the global RNG is never touched).

    Returns:
        The selection, and a ``(N,)`` long tensor of per-sample output indices (zeros when unused).

    """
    n = outputs.shape[0]
    flat = outputs.detach().reshape(n, -1)
    n_outputs = flat.shape[1]
    zeros = torch.zeros(n, dtype=torch.long, device=outputs.device)
    if callable(target) and not isinstance(target, Tensor):
        selected = target(outputs.detach())
        if not isinstance(selected, Tensor) or selected.ndim == 0 or selected.shape[0] != n:
            shape = tuple(selected.shape) if isinstance(selected, Tensor) else type(selected).__name__
            raise ValueError(
                f"probe: `target` callable must return a tensor with the batch dimension first, shape "
                f"({n}, ...); it returned {shape}. Select per sample, e.g. `lambda out: out[:, 3]`."
            )
        width = selected.reshape(n, -1).shape[1]
        if width > max_full_outputs:
            raise ValueError(
                f"probe: `target` callable selects {width} outputs per sample; at most "
                f"`max_full_outputs`={max_full_outputs} are supported. Use target=None for random projections."
            )
        return Selection("callable", width, function=target), zeros
    if target is None:
        if n_outputs <= max_full_outputs:
            return Selection("all", n_outputs), zeros
        # Row 0 is all ones: the gradient of the output sum, used as the saliency in this mode.
        gaussian = torch.randn(n_outputs, n_projections, generator=generator, dtype=torch.float64)
        projection = torch.cat([torch.ones(n_outputs, 1, dtype=torch.float64), gaussian / n_outputs**0.5], 1)
        return Selection("projected", n_projections + 1, projection=projection.to(outputs.device)), zeros
    if isinstance(target, str):
        if target != "argmax":
            raise ValueError(f"probe: `target` must be None, 'argmax', an int, a tensor or a callable; got {target!r}.")
        return Selection("index", 1), flat.argmax(1)
    if isinstance(target, bool) or not isinstance(target, (int, Tensor)):
        raise TypeError(f"probe: `target` must be None, 'argmax', an int, a tensor or a callable; got {target!r}.")
    index = torch.as_tensor(target, device=outputs.device)
    if index.is_floating_point() or index.is_complex():
        raise TypeError(f"probe: `target` tensor must hold integer output indices, got dtype {index.dtype}.")
    index = index.long().expand(n) if index.ndim == 0 else index.long()
    if index.shape != (n,):
        raise ValueError(
            f"probe: `target` tensor must have shape ({n},), one output index per sample; got {tuple(index.shape)}."
        )
    given = index
    index = torch.where(index < 0, index + n_outputs, index)  # Python's convention: -1 is the last output
    bad = (index < 0) | (index >= n_outputs)
    if bad.any():
        value = int(given[bad][0])
        raise ValueError(
            f"probe: `target`={value} is out of range: each sample has {n_outputs} outputs "
            f"(flattened), so indices must be in [0, {n_outputs - 1}] (or from -{n_outputs}, counting from the end)."
        )
    return Selection("index", 1), index
