"""Sharded models (FSDP2's ``fully_shard``): the probe runs the model as training does, one layer whole at a time.

Under FSDP2 a module's parameters are DTensor shards, gathered whole by FSDP just before the module runs and freed
after. ``functional_call`` cannot swap such a model's tensors from outside (FSDP puts its own gathered ones in
place), so a sharded model is probed by swapping *each submodule's own* tensors when it is called, after FSDP's
gather, and back before FSDP frees them (:func:`swapped_at_call`). What is swapped in is a
:class:`~._cast.LazyCast` of the parameter's *shard* (:func:`shards`): every operation that reads it gathers it
whole and drops it afterwards, so that no process holds more of the model than one layer, as FSDP's own gather
does, and a backward (or a double backward) never reads a gathered tensor FSDP has freed since.

Every process must run the same collectives in the same order: sharded models are probed in lockstep, every
process on the same samples with the same seed, so that each takes every data-dependent branch alike.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

__all__ = ["Slot", "Swap", "agreed_buffers", "is_sharded", "shards", "swapped_at_call", "tensor_parallel", "unsharded"]

Slot = tuple[int, str]
"""Where a module holds a tensor: ``(id(module), attribute name)``."""

Swap = Callable[[nn.Module, str, Tensor, bool], Tensor]
"""``(submodule, name, tensor, is_buffer) -> the tensor the submodule computes with`` (``tensor``: what the
submodule holds when it is called, a gathered parameter or a shard)."""


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


def tensor_parallel(model: nn.Module) -> bool:
    """Whether a DTensor parameter of ``model`` lies outside every FSDP2 module: tensor (or other) parallelism.

    Such a module computes on sharded activations through its own hooks: gathering its parameters alone, as the
    probe does, is not the function it trains.
    """
    dtensor = _dtensor_type()
    if dtensor is None:
        return False
    from torch.distributed.fsdp import FSDPModule

    def walk(module: nn.Module, under_fsdp: bool) -> bool:
        under_fsdp = under_fsdp or isinstance(module, FSDPModule)
        own = any(isinstance(p, dtensor) for p in module._parameters.values() if p is not None)
        return (own and not under_fsdp) or any(walk(child, under_fsdp) for child in module.children())

    return walk(model, False)


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a shard, or a tensor-parallel piece)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def unsharded(tensor: Tensor) -> Tensor:
    """``tensor`` whole, detached: a DTensor is gathered (a collective: every process must call it alike)."""
    if is_dtensor(tensor):
        return tensor.full_tensor().detach()  # type: ignore[attr-defined]
    return tensor.detach()


def shards(model: nn.Module) -> dict[Slot, Tensor]:
    """Every floating parameter slot of ``model`` and the parameter's shard (a DTensor) or, unsharded, itself.

    FSDP2 modules are resharded first (``FSDPModule.reshard()``: what FSDP does after every step; the next forward
    gathers again), so that each slot holds its shard, the one tensor of a parameter that stays valid.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return {
        (id(module), name): p
        for module in model.modules()
        for name, p in module._parameters.items()
        if p is not None and p.is_floating_point()
    }


def agreed_buffers(model: nn.Module) -> dict[Slot, Tensor]:
    """Every floating buffer slot of ``model`` and rank zero's value of it, the same on every process.

    FSDP does not synchronise buffers (BatchNorm's running statistics differ per process); a probe in lockstep must
    compute the same function everywhere, or processes could take different branches and wait on each other.
    """
    import torch.distributed as dist

    buffers = {
        (id(module), name): b.detach().clone()
        for module in model.modules()
        for name, b in module._buffers.items()
        if b is not None and b.is_floating_point()
    }
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in buffers.values():
            dist.broadcast(tensor, src=0)
    return buffers


@contextmanager
def swapped_at_call(model: nn.Module, swap: Swap) -> Iterator[None]:
    """While active, each submodule computes with ``swap(t)`` for its floating parameters and buffers.

    When a submodule is called, after FSDP's own pre-forward gather (FSDP's hooks come first), the parameters of
    its whole subtree are swapped (a module may read a child's parameter without calling the child, as
    ``nn.MultiheadAttention`` reads ``out_proj.weight``), and its own buffers; what an enclosing call swapped
    already stays. Each is put back when the submodule returns, before FSDP frees what it gathered, unless FSDP
    has put its own tensor there since. The model's tensors are never written.
    """
    placed: Counter[int] = Counter()  # the tensors this context has put in place (and how many times)
    handles = []
    for module in model.modules():
        slots = [
            (sub, False, name)
            for sub in module.modules()
            for name, p in sub._parameters.items()
            if p is not None and p.is_floating_point()
        ]
        slots += [(module, True, n) for n, b in module._buffers.items() if b is not None and b.is_floating_point()]
        if slots:
            swapper = _Swapper(slots, swap, placed)
            handles.append(module.register_forward_pre_hook(swapper.enter))
            handles.append(module.register_forward_hook(swapper.leave, prepend=True, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Swapper:
    """One submodule's swap: in at its call, out at its return (a stack: a submodule may call itself)."""

    def __init__(self, slots: list[tuple[nn.Module, bool, str]], swap: Swap, placed: Counter[int]) -> None:
        self.slots, self.swap, self.placed = slots, swap, placed
        self.stack: list[list[tuple[dict[str, Any], str, Tensor, Tensor]]] = []

    def enter(self, module: nn.Module, args: Any) -> None:
        swapped = []
        for owner, is_buffer, name in self.slots:
            held = owner._buffers if is_buffer else owner._parameters
            current = held[name]
            if current is None or self.placed[id(current)] > 0:  # swapped by an enclosing call already
                continue
            replacement = self.swap(owner, name, current, is_buffer)
            held[name] = replacement  # type: ignore[assignment]
            self.placed[id(replacement)] += 1
            swapped.append((held, name, current, replacement))
        self.stack.append(swapped)

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.stack:
            return
        for held, name, original, replacement in reversed(self.stack.pop()):
            self.placed[id(replacement)] -= 1
            if held[name] is replacement:  # (FSDP may have put its own there since: then it stays)
                held[name] = original
