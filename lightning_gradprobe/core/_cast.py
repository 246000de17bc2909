"""A model's parameters in float64 without a float64 copy of the model: casts made op by op.

The float64 reference (finite differences and the formula check) runs the model's own code on float64 values
of its parameters. Held whole, that copy is twice the model's float32 size: more than a training step needs on a
big model. :class:`LazyCast` is a tensor that *is* the float64 value of a parameter for every operation that
reads it, but holds only the parameter itself: each operation casts what it reads and drops the cast afterwards.

Autograd sees the :class:`LazyCast` (it works above the dispatcher), so what a backward saves for later is the
:class:`LazyCast` too, a reference to the float32 parameter, and the backward casts again when it reads it: a
float64 backward holds no float64 weight beyond the operation at hand. View operations (``.t()``, ``.view()``,
``.transpose()``, ``.expand()``...) stay lazy, so that what linear and matmul save is lazy too. An operation
that writes into one (rare in a forward) makes it hold a float64 copy of its own from then on (a parameter is
never written); reading one in an in-place operation on another tensor (``x.mul_(gamma)``) changes nothing.
Operations that return several views (``chunk``, ``split``) are computed on a full cast, which autograd may keep.
A lookup of rows (``F.embedding``, ``table[ids]``, ``index_select``) casts the rows it reads alone: a token model's
table is most of its weights, and a batch reads few of its rows.

A small model keeps plain float64 copies (:func:`use_lazy_casts`): the copy is small, and an operation on a plain
tensor is cheaper than one through Python. Both give the same values, bit for bit: a cast is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from ._sharding import is_dtensor, unsharded

__all__ = ["LAZY_CAST_BYTES", "LazyCast", "as_dtype", "use_lazy_casts"]

# Above this many bytes of parameters in the reference dtype, the reference casts op by op (64 MiB: 8M float64
# weights; below it a whole copy is small next to anything a training step holds).
LAZY_CAST_BYTES = 64 << 20

Shift = Callable[[Tensor], Tensor]


class LazyCast(Tensor):
    """``source`` in ``dtype``, cast afresh by every operation that reads it (see the module docstring).

    Attributes:
        source: The tensor whose cast this is (never written); a DTensor (a shard of a sharded model) is gathered
            whole by each operation that reads it, and dropped afterwards.
        shard: For a parameter FSDP gathered (``source``): its shard, gathered instead once FSDP has freed
            ``source`` (a double backward after FSDP's own backward).
        shift: ``value -> moved value``, applied to a fresh copy after the cast (a finite-difference step, which
            may write into it), or ``None``.

    Example:
        >>> weight = torch.randn(3, 4)
        >>> lazy = LazyCast(weight, torch.float64)
        >>> out = torch.ones(2, 4, dtype=torch.float64) @ lazy.t()
        >>> out.dtype, torch.equal(out, torch.ones(2, 4, dtype=torch.float64) @ weight.double().t())
        (torch.float64, True)

    """

    source: Tensor
    shard: Tensor | None
    shift: Shift | None
    _base_cast: LazyCast | None
    _views: tuple[tuple[Any, tuple[Any, ...], dict[str, Any]], ...]
    _held: Tensor | None
    __torch_function__: ClassVar[Any] = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, source: Tensor, dtype: torch.dtype, *, device: torch.device | None = None, **_: Any) -> LazyCast:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined,no-any-return]
            cls, source.shape, strides=source.stride(), dtype=dtype, device=device or source.device, requires_grad=False
        )

    def __init__(
        self,
        source: Tensor,
        dtype: torch.dtype,
        *,
        device: torch.device | None = None,
        shard: Tensor | None = None,
        base: LazyCast | None = None,
        views: tuple[tuple[Any, tuple[Any, ...], dict[str, Any]], ...] = (),
    ) -> None:
        self.source = source.detach()
        self.shard = None if shard is None else shard.detach()
        self.shift = None
        self._base_cast = base
        self._views = views
        self._held = None

    def __repr__(self) -> str:  # type: ignore[override]
        return f"LazyCast(shape={tuple(self.shape)}, dtype={self.dtype}, source={self.source.dtype})"

    def value(self) -> Tensor:
        """The value this tensor stands for, as a plain tensor (a fresh cast)."""
        if self._held is not None:
            return self._held
        if self._base_cast is not None:
            value = self._base_cast.value()
            for func, args, kwargs in self._views:
                value = func(value, *args, **kwargs)
            return value
        source, shard = self.source, self.shard
        if shard is not None and source is not shard and source.untyped_storage().size() == 0:
            source = shard  # FSDP has freed what it had gathered: gather the shard alone
        source = unsharded(source)  # a DTensor shard (FSDP2) is gathered whole for the operation
        if self.shift is None:
            return source.to(self.dtype)
        return self.shift(source.to(self.dtype, copy=True))  # a copy of its own, moved in place

    def rows(self, index: Tensor) -> Tensor | None:
        """``value()[index]`` of a 2-D cast, made of those rows alone.

        An embedding lookup reads a few rows of a big table: casting (and moving) the whole table for them costs
        more than the model's forward. ``None`` where only the whole value will do: a view, a written (held) value,
        a shard, or a shift that moves whole tensors only.
        """
        if (
            self._held is not None
            or self._base_cast is not None
            or self.shard is not None
            or self.source.dim() != 2
            or is_dtensor(self.source)
        ):
            return None
        index = torch.where(index < 0, index + self.source.shape[0], index)  # (table[-1]; out of range still raises)
        rows = self.source.index_select(0, index).to(self.dtype)  # (a fresh tensor: index_select copies)
        if self.shift is None:
            return rows
        shift_rows = getattr(self.shift, "rows", None)
        return None if shift_rows is None else shift_rows(rows, index)

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, LazyCast) and func.is_view and first._held is None and not _lazy_in((args[1:], kwargs)):
            # The view's shape, from a tensor without data (the source may be a shard, or freed by FSDP by now).
            source = first.source
            shape = torch.empty_strided(source.shape, source.stride(), dtype=source.dtype, device="meta")
            out = func(shape, *args[1:], **kwargs)
            if isinstance(out, Tensor):  # a view of the parameter: a view of the cast, still lazy
                base = first if first._base_cast is None else first._base_cast
                views = (*first._views, (func, args[1:], kwargs))
                return LazyCast(out, first.dtype, device=first.device, base=base, views=views)
        lookup = _row_lookup(func, args, kwargs)
        if lookup is not None:
            rows = lookup[0].rows(lookup[1].reshape(-1))
            if rows is not None:
                return rows.view(*lookup[1].shape, rows.shape[-1])
        for tensor in _written(func, args, kwargs):  # written into: from now on its value is held (a copy of its own)
            if tensor._held is None:
                tensor._held = tensor.value().clone()
        return func(*_values(args), **_values(kwargs))


def _row_lookup(func: Any, args: Any, kwargs: dict[str, Any]) -> tuple[LazyCast, Tensor] | None:
    """``(table, index)`` where ``func`` reads rows ``index`` of a lazy 2-D ``table`` and nothing else of it.

    An embedding lookup (``F.embedding``: its other arguments change only the backward, which needs no weight),
    ``table[index]`` and ``table.index_select(0, index)``, with integer indices.
    """
    table = args[0] if args else None
    if not isinstance(table, LazyCast) or table.dim() != 2 or kwargs or len(args) < 2:
        return None
    if func is torch.ops.aten.embedding.default:
        index = args[1]
    elif func is torch.ops.aten.index.Tensor and len(args[1]) == 1:
        index = args[1][0]
    elif func is torch.ops.aten.index_select.default and args[1] in (0, -2):
        index = args[2]
    else:
        return None
    integer = isinstance(index, Tensor) and not index.is_floating_point() and not index.is_complex()
    if not integer or index.dtype == torch.bool or isinstance(index, LazyCast):
        return None
    return table, index


def _written(func: Any, args: Any, kwargs: dict[str, Any]) -> list[LazyCast]:
    """The lazy casts among ``func``'s arguments that it writes into (an in-place op's ``self``, an ``out=``)."""
    schema = func._schema
    if not schema.is_mutable:
        return []
    written = []
    for position, argument in enumerate(schema.arguments):
        value = args[position] if position < len(args) else kwargs.get(argument.name)
        if isinstance(value, LazyCast) and argument.alias_info is not None and argument.alias_info.is_write:
            written.append(value)
    return written


def _lazy_in(tree: Any) -> list[LazyCast]:
    found: list[LazyCast] = []
    tree_map(lambda t: found.append(t) if isinstance(t, LazyCast) else None, tree)
    return found


def _values(tree: Any) -> Any:
    return tree_map(lambda t: t.value() if isinstance(t, LazyCast) else t, tree)


def use_lazy_casts(tensors: Iterable[Tensor], dtype: torch.dtype) -> bool:
    """Whether casts of ``tensors`` to ``dtype`` should be lazy: above :data:`LAZY_CAST_BYTES` in all."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel() for t in tensors if t.is_floating_point()) * size > LAZY_CAST_BYTES


def as_dtype(tensor: Tensor, dtype: torch.dtype | None, *, lazy: bool) -> Tensor:
    """``tensor`` (detached) in ``dtype``: a :class:`LazyCast` when ``lazy``, else a plain tensor."""
    tensor = tensor.detach()
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return LazyCast(tensor, dtype) if lazy else tensor.to(dtype)
