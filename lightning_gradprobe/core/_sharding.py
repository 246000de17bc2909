"""Sharded models (FSDP2's ``fully_shard``): the probe runs the model as training does, one layer whole at a time.

Under FSDP2 a module's parameters are DTensor shards, gathered whole by FSDP just before the module runs and freed
after. ``functional_call`` cannot swap such a model's tensors from outside (FSDP puts its own gathered ones in
place), so a sharded model is probed by swapping *each submodule's own* tensors when it is called, after FSDP's
gather, and back before FSDP frees them (:func:`swapped_at_call`). A parameter that nothing gathered (a submodule
called on its own, as localization does) is gathered alone. No process ever holds more of the model than FSDP's
own layer-by-layer gather, and the float64 reference is made of :class:`~._cast.LazyCast` casts of those gathered
tensors, cast op by op.

Every process must run the same collectives in the same order: sharded models are probed in lockstep, every
process on the same samples with the same seed, so that each takes every data-dependent branch alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

__all__ = ["is_sharded", "swapped_at_call", "unsharded"]

Swap = Callable[[Tensor, bool], Tensor]
"""``(tensor, is_buffer) -> the tensor the submodule computes with``."""


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without torch.distributed
        return None
    return DTensor


def is_sharded(model: Any) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2's ``fully_shard``, tensor parallelism)."""
    dtensor = _dtensor_type()
    return (
        dtensor is not None and isinstance(model, nn.Module) and any(isinstance(p, dtensor) for p in model.parameters())
    )


def unsharded(tensor: Tensor) -> Tensor:
    """``tensor`` whole, detached: a DTensor is gathered (a collective: every process must call it alike)."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return tensor.full_tensor().detach()
    return tensor.detach()


@contextmanager
def swapped_at_call(model: nn.Module, swap: Swap) -> Iterator[None]:
    """While active, each submodule computes with ``swap(t)`` for each of its own floating parameters and buffers.

    The swap happens when the submodule is called, after FSDP's own pre-forward gather (FSDP's hooks come first),
    and is undone when it returns, before FSDP frees what it gathered. The model's tensors are never written.
    """
    handles = []
    for module in model.modules():
        own = [(False, n) for n, p in module._parameters.items() if p is not None and p.is_floating_point()]
        own += [(True, n) for n, b in module._buffers.items() if b is not None and b.is_floating_point()]
        if own:
            swapper = _Swapper(own, swap)
            handles.append(module.register_forward_pre_hook(swapper.enter))
            handles.append(module.register_forward_hook(swapper.leave, prepend=True, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Swapper:
    """One submodule's swap: in at its call, out at its return (a stack: a submodule may call itself)."""

    def __init__(self, own: list[tuple[bool, str]], swap: Swap) -> None:
        self.own, self.swap = own, swap
        self.stack: list[list[tuple[dict[str, Any], str, Tensor]]] = []

    def enter(self, module: nn.Module, args: Any) -> None:
        swapped = []
        for is_buffer, name in self.own:
            slots = module._buffers if is_buffer else module._parameters
            current = slots[name]
            assert current is not None
            swapped.append((slots, name, current))
            slots[name] = self.swap(unsharded(current), is_buffer)  # type: ignore[assignment]
        self.stack.append(swapped)

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack:
            for slots, name, original in self.stack.pop():
                slots[name] = original
