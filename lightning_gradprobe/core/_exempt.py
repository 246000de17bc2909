"""``exempt=``: submodules whose backward is intentionally not the derivative, and the check around them.

Straight-through estimators, gradient reversal and other surrogate gradients are wrong on purpose. The model after
the last exempt submodule (in the order the forward calls them) is checked as a whole, its output probed at that
submodule's output; every other submodule, but the exempt ones and the containers that hold them, is checked on
its own (input and parameter gradients) on one sample, as localization does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["Exempt", "ExemptSpec", "resolve_exempt"]

ExemptSpec = str | type | nn.Module | Sequence[str | type | nn.Module] | None
"""Submodules exempt from the check: dotted names, module types, or module instances (or a sequence of them)."""


@dataclass(frozen=True)
class Exempt:
    """The exempt submodules of a model.

    Attributes:
        names: Their dotted names, in the order the forward first calls them.
        skipped: The names localization leaves out: the exempt submodules and every container holding one.

    """

    names: tuple[str, ...]
    skipped: frozenset[str]


def resolve_exempt(model: Any, spec: ExemptSpec, call_order: Sequence[str]) -> Exempt | None:
    """The exempt submodules ``spec`` names in ``model``, ordered by ``call_order`` (``None``: none is called).

    Raises:
        TypeError: If ``spec`` is not made of names, types or modules, or the model is not an ``nn.Module``.
        ValueError: If a name is not a submodule, or a type or instance matches no submodule.

    """
    if spec is None or (isinstance(spec, Sequence) and not isinstance(spec, str) and not spec):
        return None
    if not isinstance(model, nn.Module):
        raise TypeError("probe: `exempt` names submodules, so the model must be an nn.Module.")
    items = list(spec) if isinstance(spec, Sequence) and not isinstance(spec, str) else [spec]
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for item in items:
        if isinstance(item, str):
            if item not in modules:
                raise ValueError(f"probe: `exempt` names {item!r}, not a submodule of {type(model).__name__}.")
            found = {item}
        elif isinstance(item, type) and issubclass(item, nn.Module):
            found = {name for name, module in modules.items() if isinstance(module, item)}
        elif isinstance(item, nn.Module):
            found = {name for name, module in modules.items() if module is item}
        else:
            raise TypeError(
                f"probe: `exempt` takes submodule names, nn.Module types or instances, got {type(item).__name__}."
            )
        if not found:
            raise ValueError(f"probe: `exempt` entry {item!r} matches no submodule of {type(model).__name__}.")
        chosen |= found
    called = [name for name in call_order if name in chosen]
    if not called:  # (e.g. a gradient-reversal head used in training_step only): nothing on the probed path
        return None
    holders = {name for name in modules for e in chosen if name == "" or e == name or e.startswith(name + ".")}
    return Exempt(tuple(called), frozenset(holders))
