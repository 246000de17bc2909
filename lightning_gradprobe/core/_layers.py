"""Probing at a layer's output instead of the model's input (token models: at the embedding's output).

The layer's output is computed fresh from the stored batch at every probe, then fed back through a forward hook
that replaces what the layer computes: the rest of the model is a function of that output, with every other
input (token ids, attention masks) held fixed and carried along with each sample (see ``_inputs``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LAYER", "capture_output", "find_token_embedding", "first_floating", "replaced_output", "resolve_layer"]

LAYER = "__gradprobe_layer__"
"""The key of the probed layer output inside packed inputs."""


def resolve_layer(model: Any, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """The ``(qualified name, module)`` of ``layer``, a submodule of ``model`` or its dotted name.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
        >>> resolve_layer(model, "0")[0], resolve_layer(model, model[1])[0]
        ('0', '1')

    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"probe: `layer=` needs the model to be an nn.Module, got {type(model).__name__}.")
    if isinstance(layer, str):
        try:
            return layer, model.get_submodule(layer)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n][:12]
            raise ValueError(f"probe: `layer`={layer!r} is not a submodule of the model; some are {names}.") from None
    for name, module in model.named_modules():
        if module is layer:
            return name, module
    raise ValueError(f"probe: `layer` ({type(layer).__name__}) is not a submodule of the model.")


def capture_output(module: nn.Module, run: Callable[[], Any]) -> Tensor:
    """The output ``module`` produces (its first call) while ``run()`` runs, detached."""
    seen: list[Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        if not seen:
            seen.append(first_floating(output).detach().clone())

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"probe: the layer ({type(module).__name__}) was not called by the model's forward.")
    return seen[0]


@contextmanager
def replaced_output(module: nn.Module, value: Tensor) -> Iterator[None]:
    """Within the block, ``module`` returns ``value`` instead of what it computes (first call)."""
    used = [False]

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        if used[0]:
            return None
        used[0] = True
        if isinstance(output, Tensor):
            return value.to(output.dtype) if output.is_floating_point() and not value.is_floating_point() else value
        return _replacefirst_floating(output, value)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def find_token_embedding(model: nn.Module, ids: Tensor, run: Callable[[], Any]) -> tuple[str, nn.Module] | None:
    """The ``nn.Embedding`` that consumes the integer tensor ``ids`` when ``run()`` runs the model, if any."""
    embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    found: list[tuple[str, nn.Module]] = []
    handles = []
    for name, module in embeddings:

        def hook(module: nn.Module, args: Any, name: str = name) -> None:
            first = args[0] if args else None
            if isinstance(first, Tensor) and first.shape == ids.shape and bool(torch.equal(first, ids.to(first))):
                found.append((name, module))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run()
    except Exception:  # a model that cannot take integers at all consumes them with no embedding
        return None
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def first_floating(output: Any) -> Tensor:
    """The output itself when it is a tensor, else the first floating tensor of a tuple/list/dict output."""
    if isinstance(output, Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output
    for value in values:
        if isinstance(value, Tensor) and value.is_floating_point():
            return value
    raise TypeError(f"probe: the layer's output ({type(output).__name__}) holds no floating tensor.")


def _replacefirst_floating(output: Any, value: Tensor) -> Any:
    if isinstance(output, Mapping):
        key = next(k for k, v in output.items() if isinstance(v, Tensor) and v.is_floating_point())
        return {**output, key: value}
    if isinstance(output, Sequence):
        items = list(output)
        index = next(i for i, v in enumerate(items) if isinstance(v, Tensor) and v.is_floating_point())
        items[index] = value
        return type(output)(items) if isinstance(output, tuple) else items
    raise TypeError(f"probe: cannot replace the layer's output ({type(output).__name__}).")
