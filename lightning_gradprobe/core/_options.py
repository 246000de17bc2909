"""The options of one probe: validated once, then read by every stage."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._functions import OutputSelector, Target
from ._jacobian import ENGINE_AUTOGRAD, ENGINE_FUNC

__all__ = ["ENGINES", "ProbeOptions"]

ENGINES = ("auto", ENGINE_FUNC, ENGINE_AUTOGRAD)


@dataclass(frozen=True)
class ProbeOptions:
    """Every option of :func:`~lightning_gradprobe.probe` (see its docstring), checked at construction.

    Example:
        >>> ProbeOptions(n_directions=2).n_directions
        2
        >>> ProbeOptions(n_directions=0)
        Traceback (most recent call last):
        ...
        ValueError: probe: `n_directions` must be an int >= 1, got 0.

    """

    target: Target = None
    n_directions: int = 4
    seed: int = 0
    forward: Callable[[Any, Any], Any] | None = None
    output: OutputSelector = None
    check_samples: int | Sequence[int] | None = None
    rtol: float | None = None
    fd_dtype: torch.dtype | None = torch.float64
    engine: str = "auto"
    chunk_size: int | None = None
    max_full_outputs: int = 64
    check_batch: bool = True
    localize: bool = False
    check_parameters: bool = True
    check_forward_mode: bool = False
    localize_budget: tuple[int, float] = (64, 30.0)
    second_order: bool = False
    layer: str | nn.Module | None = None
    exempt: Any = None  # ExemptSpec: names, types or instances of submodules whose backward is a surrogate

    def __post_init__(self) -> None:
        _check_int("n_directions", self.n_directions)
        _check_int("max_full_outputs", self.max_full_outputs)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"probe: `seed` must be an int, got {self.seed!r}.")
        if self.engine not in ENGINES:
            raise ValueError(f"probe: `engine` must be one of {ENGINES}, got {self.engine!r}.")
        if self.rtol is not None and not self.rtol > 0:
            raise ValueError(f"probe: `rtol` must be > 0, got {self.rtol!r}.")
        fd_dtype = self.fd_dtype
        if fd_dtype is not None and not (isinstance(fd_dtype, torch.dtype) and fd_dtype.is_floating_point):
            raise ValueError(f"probe: `fd_dtype` must be a floating torch.dtype or None, got {fd_dtype!r}.")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"probe: `chunk_size` must be None or an int >= 1, got {self.chunk_size!r}.")
        if isinstance(self.check_samples, bool):
            raise TypeError(
                f"probe: `check_samples` must be None, an int or a sequence of indices, got {self.check_samples!r}."
            )
        if isinstance(self.check_samples, int) and self.check_samples < 0:
            raise ValueError(f"probe: `check_samples` must be >= 0, got {self.check_samples}.")


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"probe: `{name}` must be an int >= 1, got {value!r}.")
