"""Inputs as the engine sees them: one flat floating batch, whatever structure the model takes.

A model may take several inputs (``forward(image, metadata)``), a dict (``model(**batch)``, the Hugging Face
convention), or integer entries beside floating ones (token ids, attention masks, lengths). The engine works on
one floating batch ``X`` of shape ``(N, D)``: each floating input, divided by a power of two near its own RMS
(exact in floating point), so that steps and directions are sized to each input separately; then every other
entry, carried along as *frozen* coordinates (exact: integers below 2^24 in float32) that no direction, jitter
or step ever moves and that the model receives back in their own dtype. Because frozen entries travel inside
``X``, any subset or repetition of rows the checks evaluate keeps each sample's mask with its own inputs.

A floating entry that is an additive mask (0 where attended, ``-inf`` where not, as ``nn.MultiheadAttention`` and
``scaled_dot_product_attention`` take, or the dtype's lowest value, as Hugging Face builds them) is frozen, not
differentiated, and travels as its sample's index (``X`` stays finite), the model receiving that sample's mask
back (:func:`is_additive_mask`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Packed", "free_only", "is_additive_mask", "pack"]

_EXACT_INTEGER = {torch.float32: 2**24, torch.float64: 2**53}


@dataclass(frozen=True)
class _Entry:
    key: Any  # position (tuple/list) or key (dict)
    shape: tuple[int, ...]  # per-sample shape
    dtype: torch.dtype
    start: int
    stop: int
    free: bool
    scale: float  # floating entries: stored divided by this power of two
    rows: Tensor | None = None  # an entry stored as each sample's index: its values, (N, *shape)


@dataclass(frozen=True)
class Packed:
    """A structured input batch packed into one floating tensor (see the module docstring).

    Attributes:
        flat: ``(N, D)`` the packed batch.
        free: ``(D,)`` which coordinates are differentiated (the floating inputs); the rest are frozen.
        kind: ``"tuple"``, ``"list"`` or ``"dict"``: the structure the model receives.

    """

    flat: Tensor
    free: Tensor
    kind: str
    entries: tuple[_Entry, ...]
    constants: Mapping[Any, Any]
    pack_dtype: torch.dtype

    def unpack(self, x: Tensor, dtype: torch.dtype | None = None) -> Any:
        """The model's inputs for a packed batch ``x`` (rows may be any subset or repetition of samples).

        Floating inputs (and floating tensors without the batch dimension, such as a causal mask shared by every
        sample) come back in ``dtype`` (the dtype the model computes in: its own, or float64 for the reference
        copy), or in their own dtype when ``dtype`` is ``None``; frozen floating inputs are detached
        (they are not differentiated), frozen integer and boolean ones come back exact in their own dtype.
        """
        values: dict[Any, Any] = {key: _constant(value, dtype) for key, value in self.constants.items()}
        for entry in self.entries:
            if entry.rows is not None:
                samples = x[:, entry.start].detach().round().long().to(entry.rows.device)
                values[entry.key] = entry.rows[samples].to(dtype or entry.dtype)
                continue
            part = x[:, entry.start : entry.stop].reshape(x.shape[0], *entry.shape)
            if entry.free:
                part = part * entry.scale
                values[entry.key] = part.to(dtype or entry.dtype)
            elif entry.dtype.is_floating_point:
                values[entry.key] = part.detach().to(dtype or entry.dtype)
            elif entry.dtype == torch.bool:
                values[entry.key] = part.detach() != 0
            else:
                values[entry.key] = part.detach().round().to(entry.dtype)
        if self.kind == "dict":
            return values
        ordered = [values[i] for i in range(len(values))]
        return tuple(ordered) if self.kind == "tuple" else ordered

    @property
    def masks(self) -> list[Any]:
        """The keys of the floating entries frozen as additive masks (or holding infinities)."""
        return [entry.key for entry in self.entries if entry.rows is not None]

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype of the first differentiated input (what a plain callable computes in)."""
        return next(entry.dtype for entry in self.entries if entry.free)

    def structure(self, gradient: Tensor) -> Any:
        """A gradient with respect to ``flat``, ``(N, D)``, in the inputs' structure (``None`` for frozen ones)."""
        n = gradient.shape[0]
        values: dict[Any, Any] = {key: None for key in self.constants}
        for entry in self.entries:
            if entry.free:
                values[entry.key] = gradient[:, entry.start : entry.stop].reshape(n, *entry.shape) / entry.scale
            else:
                values[entry.key] = None
        if self.kind == "dict":
            return values
        ordered = [values[i] for i in range(len(values))]
        return tuple(ordered) if self.kind == "tuple" else ordered


def pack(inputs: Any, *, differentiate: Callable[[Any, Tensor], bool] | None = None) -> Packed:
    """Pack a tuple, list or dict of per-sample tensors (batch dimension first) into one floating batch.

    Args:
        inputs: The structure. Tensors with the batch dimension are per-sample entries; anything else (``None``,
            a number, a tensor of another batch size) is passed through unchanged.
        differentiate: ``(key, tensor) -> bool`` choosing the differentiated entries (default: the floating ones, but
            additive masks: those holding infinities and no NaN).

    Raises:
        ValueError: If no entry is a per-sample tensor, or none is differentiated.

    Example:
        >>> import torch
        >>> packed = pack((torch.randn(4, 3), torch.tensor([[1, 0], [1, 1], [0, 1], [1, 0]])))
        >>> packed.flat.shape, packed.free.tolist()
        (torch.Size([4, 5]), [True, True, True, False, False])
        >>> [tuple(v.shape) for v in packed.unpack(packed.flat[[2, 2]])]
        [(2, 3), (2, 2)]

    """
    if isinstance(inputs, Mapping):
        kind, items = "dict", list(inputs.items())
    elif isinstance(inputs, Sequence) and not isinstance(inputs, str):
        kind, items = ("tuple" if isinstance(inputs, tuple) else "list"), list(enumerate(inputs))
    else:
        raise TypeError(f"probe: `inputs` must be a tensor, a tuple/list or a dict of tensors, got {type(inputs)}.")
    batch = next((v.shape[0] for _, v in items if isinstance(v, Tensor) and v.ndim > 0), None)
    if batch is None:
        raise ValueError("probe: `inputs` holds no tensor with a batch dimension first.")
    chosen = differentiate or (lambda _key, value: not is_additive_mask(value))
    per_sample = [(k, v) for k, v in items if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == batch]
    constants = {k: v for k, v in items if not any(k == key for key, _ in per_sample)}
    free_items = [(k, v) for k, v in per_sample if v.is_floating_point() and chosen(k, v)]
    if not free_items and any(is_additive_mask(v) for _, v in per_sample):
        raise ValueError(
            "probe: every floating input is an additive mask (0 and -inf, or 0 and the dtype's lowest value: not "
            "differentiated); finite differences need a floating input to differentiate."
        )
    if not free_items:
        names = [k for k, _ in per_sample]
        raise ValueError(
            f"probe: none of the inputs {names} is a floating tensor to differentiate. Integer inputs (token ids) "
            "have no input gradient: probe an embedding's output with `layer=` (a token model's embedding is "
            "found automatically when the model is an nn.Module)."
        )
    frozen_items = [(k, v) for k, v in per_sample if not any(k == key for key, _ in free_items)]
    floating = [v.dtype for _, v in per_sample if v.is_floating_point()]
    pack_dtype = torch.float64 if torch.float64 in floating else torch.float32
    for _, value in frozen_items:
        large = not value.is_floating_point() and value.dtype != torch.bool and value.numel()
        if large and value.abs().max() >= _EXACT_INTEGER[pack_dtype]:
            pack_dtype = torch.float64
    entries, columns, offset = [], [], 0
    for key, value in [*free_items, *frozen_items]:
        free = any(key == k for k, _ in free_items)
        shape = tuple(value.shape[1:])
        if not free and value.is_floating_point() and (is_additive_mask(value) or not bool(value.isfinite().all())):
            entries.append(_Entry(key, shape, value.dtype, offset, offset + 1, free, 1.0, value.detach()))
            columns.append(torch.arange(batch, dtype=pack_dtype, device=value.device)[:, None])
            offset += 1
            continue
        width = math.prod(shape)
        scale = _power_of_two_scale(value) if free else 1.0
        entries.append(_Entry(key, shape, value.dtype, offset, offset + width, free, scale))
        columns.append(value.detach().reshape(batch, width).to(pack_dtype) / scale)
        offset += width
    free_mask = torch.cat([torch.full((e.stop - e.start,), e.free) for e in entries]).to(columns[0].device)
    return Packed(torch.cat(columns, 1), free_mask, kind, tuple(entries), constants, pack_dtype)


def _constant(value: Any, dtype: torch.dtype | None) -> Any:
    """A structure's entry without the batch dimension: floating tensors in ``dtype`` (when given), the rest as is."""
    if dtype is not None and isinstance(value, Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


def is_additive_mask(value: Tensor) -> bool:
    """Whether ``value`` is an additive mask: floating, 0 attended, ``-inf`` or the dtype's lowest value not.

    ``-inf`` is PyTorch's convention, the lowest value Hugging Face's; a mask holds no NaN and no ``+inf``. A mask
    of ``torch.finfo(dtype).min`` is finite but no input to differentiate: at 1e38 its own directional derivative
    would swamp the error scale of every other input.

    Example:
        >>> import torch
        >>> low = torch.finfo(torch.float32).min
        >>> [is_additive_mask(torch.tensor([[0.0, m]])) for m in (float("-inf"), low, -1e9, float("inf"))]
        [True, True, False, False]

    """
    if not value.is_floating_point() or not value.numel():
        return False
    lowest = torch.finfo(value.dtype).min
    if bool(value.min() > lowest):  # (one pass: data, the common case; a NaN minimum compares False)
        return False
    if bool(value.isnan().any()) or bool((value == float("inf")).any()):
        return False
    if bool((value == float("-inf")).any()):
        return True
    return bool((value == lowest).any()) and bool(((value == 0) | (value == lowest)).all())


def _power_of_two_scale(value: Tensor) -> float:
    """A power of two near the entry's RMS: dividing by it is exact in floating point (1 for an all-zero entry)."""
    rms = float(value.detach().double().pow(2).mean().sqrt()) if value.numel() else 0.0
    if not math.isfinite(rms) or rms == 0.0:
        return 1.0
    return float(2 ** math.floor(math.log2(rms)))


def free_only(values: Tensor, free: Tensor | None) -> Tensor:
    """Zero the frozen coordinates of ``(..., D)``-shaped directions (unchanged when ``free`` is ``None``)."""
    if free is None:
        return values
    return values * free.to(values.device, values.dtype)
