"""Stage 4 of a probe: the problem to judge, the model as a function of a batch in its own and a reference dtype.

The reference is the same model code on a float64 copy of its tensors (``fd_dtype``), which both computes the
finite differences and judges the backward's formula. A model that cannot run there is judged in its own dtype,
with a note that says the check runs weaker.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ._forward import ForwardPass
from ._functions import BatchFunction, OutputSelector, build_batch_function, model_dtype
from ._notes import Notes, describe_error
from ._options import ProbeOptions
from ._prepare import PreparedBatch
from ._verdicts import Problem, default_rtol
from .report import dtype_name

__all__ = ["reference_problem"]


def reference_problem(
    model: Any, batch: PreparedBatch, forward: ForwardPass, options: ProbeOptions, notes: Notes
) -> Problem:
    """The model-dtype function of ``forward``, its reference twin, and the tolerances they are judged with."""
    dtype = batch.model_dtype
    reference, reference_dtype = _reference_function(
        model, batch, forward.function, options.output, options.fd_dtype or dtype, notes
    )
    return Problem(
        forward.function,
        reference,
        forward.selection,
        dtype,
        reference_dtype,
        default_rtol(dtype) if options.rtol is None else float(options.rtol),
        forward.gradients.engine,
        options.chunk_size,
        projection=forward.projection,
        free=batch.free,
    )


class _LowerPrecisionWatch(TorchDispatchMode):
    """Notes the first operation that turns a ``dtype`` tensor into a less precise floating one.

    A downcast of the data; constants made in float32, such as ``torch.ones(3)``, carry no data and do not count.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = torch.finfo(dtype).eps
        self.found: str | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.found is None and any(
            isinstance(a, Tensor) and a.is_floating_point() and torch.finfo(a.dtype).eps <= self.eps
            for a in (*args, *(kwargs or {}).values())
        ):
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if (
                    isinstance(tensor, Tensor)
                    and tensor.is_floating_point()
                    and torch.finfo(tensor.dtype).eps > self.eps
                ):
                    self.found = f"part of it computes in {dtype_name(tensor.dtype)} ({func})"
                    break
        return out


def _watched(function: BatchFunction, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, str | None]:
    """``function(x)`` in ``dtype``, and the first operation that computed in a lower precision (``None``)."""
    with torch.no_grad(), _LowerPrecisionWatch(dtype) as watch:
        result = function(x.to(dtype))
    return result, watch.found


def _reference_function(
    model: Any,
    batch: PreparedBatch,
    function: BatchFunction,
    output: OutputSelector,
    fd_dtype: torch.dtype,
    notes: Notes,
) -> tuple[BatchFunction, torch.dtype]:
    """The model in ``fd_dtype`` if it runs there, else in float32 for a half-precision model, else as it is.

    Each fallback says, in a note, that the check runs weaker.
    """
    x: Tensor = batch.x
    own = model_dtype(model, x)
    if fd_dtype == own:
        return function, own
    candidate = build_batch_function(model, forward=batch.forward, output=output, dtype=fd_dtype)
    reason = _cannot_run(candidate, x, fd_dtype)
    if reason is None:
        return candidate, fd_dtype
    if not isinstance(model, nn.Module):
        hint = "pass the nn.Module itself, with `forward=lambda m, x: ...`, so that a float64 copy can be made"
    else:
        hint = "the formula could not be judged in float64"
    fallback, fallback_dtype = function, own
    half = torch.finfo(own).eps > torch.finfo(torch.float32).eps
    if isinstance(model, nn.Module) and half and fd_dtype != torch.float32:
        # A half-precision model whose float64 copy computes part in float32 (norms that cast, as in Llama) runs
        # whole in float32: far finer finite differences than its own dtype's, and no cast inside.
        wider = build_batch_function(model, forward=batch.forward, output=output, dtype=torch.float32)
        if _cannot_run(wider, x, torch.float32) is None:
            fallback, fallback_dtype = wider, torch.float32
            hint = "the formula was judged in float32"
    notes.add(
        f"finite differences ran in {dtype_name(fallback_dtype)}, not {dtype_name(fd_dtype)}, with a step sized for "
        f"it: the model cannot run in {dtype_name(fd_dtype)} ({reason}); {hint}",
        weaker=True,
    )
    return fallback, fallback_dtype


def _cannot_run(candidate: BatchFunction, x: Tensor, dtype: torch.dtype) -> str | None:
    """Why ``candidate`` is no reference in ``dtype`` (``None``: it is one).

    One sample tells (a cheap check); a model that needs its batch is run on all of it. A copy that computes part
    of the model in a lower precision (norms that cast to float32, as in Hugging Face's T5 and Llama) is no
    reference: its finite differences would be that precision's round-off at a step sized for ``dtype``.
    """
    try:
        try:
            result, found = _watched(candidate, x[:1], dtype)
        except Exception:
            result, found = _watched(candidate, x, dtype)
    except Exception as error:  # the model cannot run in dtype (MPS, float32-only kernels)
        return describe_error(error)
    if result.dtype == dtype and found is None:
        return None
    return f"it returned {result.dtype}" if found is None else found
