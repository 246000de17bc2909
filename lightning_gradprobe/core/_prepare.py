"""Stage 2 of a probe: the inputs as the engine sees them, one floating batch and how the model runs on it.

A plain floating tensor is used as it is. Tuples, lists and dicts are packed into one floating batch (masks and
ids travel with their samples as frozen coordinates). Token models are probed at the embedding that consumes
their ids, and ``layer=`` probes any submodule's output, computed fresh and fed back through a forward hook.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._functions import model_dtype
from ._inputs import Packed, is_additive_mask, pack
from ._layers import LAYER, capture_output, find_token_embedding, replaced_output, resolve_layer
from ._notes import Notes

__all__ = ["PreparedBatch", "check_finite_batch", "device_of", "prepare_batch"]

Forward = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class PreparedBatch:
    """The inputs as the engine sees them.

    Attributes:
        x: ``(N, ...)`` the floating batch that is differentiated (a detached copy).
        forward: ``forward(model, x)``, how the model runs on ``x`` (``None``: ``model(x)``).
        model_dtype: The dtype the model and its backward compute in.
        packed: How ``x`` unpacks into the model's structured inputs (``None`` for a plain tensor).
        layer: The submodule whose output is probed instead of the inputs, else ``None``.
        layer_output: That submodule's output on the inputs.
        whole_forward: How the whole model runs on ``x`` with the layer computing its own output, not the probed
            one (what the parameters' gradients go through); ``None``: ``forward``.

    """

    x: Tensor
    forward: Forward | None
    model_dtype: torch.dtype
    packed: Packed | None = None
    layer: str | None = None
    layer_output: Tensor | None = None
    whole_forward: Forward | None = None

    @property
    def parameter_forward(self) -> Forward | None:
        """How the model runs on ``x`` for the parameters' gradients: every layer computing its own output."""
        return self.whole_forward or self.forward

    @property
    def size(self) -> int:
        """The number of samples."""
        return self.x.shape[0]

    @property
    def free(self) -> Tensor | None:
        """``(D,)`` which coordinates of ``x`` are differentiated (``None``: all of them)."""
        return None if self.packed is None else self.packed.free

    def structured(self, gradient: Tensor) -> Any:
        """A gradient with respect to ``x`` in the inputs' own structure (the layer's, when probing at a layer)."""
        if self.packed is None:
            return gradient
        structured = self.packed.structure(gradient.reshape(gradient.shape[0], -1))
        return structured[LAYER] if self.layer is not None else structured

    def token_scores(self, gradient: Tensor) -> dict[str, Tensor] | None:
        """Per-token norm and gradient x embedding of a ``(N, L, E)`` layer gradient (``None`` otherwise)."""
        output = self.layer_output
        if output is None or output.ndim != 3 or self.packed is None:
            return None
        layer_gradient = self.packed.structure(gradient.reshape(gradient.shape[0], -1))[LAYER].double()
        return {
            "norm": layer_gradient.norm(dim=-1).cpu(),
            "grad_x_input": (layer_gradient * output.double()).sum(-1).cpu(),
        }


def prepare_batch(
    model: Any, inputs: Any, *, forward: Forward | None, layer: str | nn.Module | None, notes: Notes
) -> PreparedBatch:
    """Pack structured inputs; find a token model's embedding; set up probing at a layer's output."""
    if isinstance(inputs, Tensor) and inputs.is_floating_point() and layer is None:
        x = inputs.detach().clone()
        return _checked(PreparedBatch(x, forward, model_dtype(model, x)))

    def call_raw(m: Any, raw: Any) -> Any:
        if forward is not None:
            return forward(m, raw)
        if isinstance(raw, Mapping):
            return m(**raw)
        return m(*raw) if isinstance(raw, (tuple, list)) else m(raw)

    entries = as_entries(inputs)
    tensors = [v for v in entries.values() if isinstance(v, Tensor)]
    floating = [v for v in tensors if v.is_floating_point()]
    if layer is None:
        # (beside token ids, additive masks alone are no input to differentiate: the embedding's output is)
        if floating and (not all(map(is_additive_mask, floating)) or all(v.is_floating_point() for v in tensors)):
            packed = pack(inputs)
            if packed.masks:
                names = ", ".join(repr(key) for key in packed.masks)
                notes.add(f"input {names} is an additive mask: passed to the model, not differentiated")
            return _checked(
                PreparedBatch(
                    packed.flat,
                    lambda m, x: call_raw(m, packed.unpack(x, _compute_dtype(m, x, packed))),
                    _packed_dtype(model, packed),
                    packed,
                )
            )
        layer = _token_embedding(model, inputs, entries, call_raw, notes)
    name, module = resolve_layer(model, layer)
    output = capture_output(module, lambda: call_raw(model, inputs))
    packed = pack({LAYER: output, **entries}, differentiate=lambda key, _value: key == LAYER)

    def at_layer(m: Any, x: Tensor) -> Any:
        values = packed.unpack(x, _compute_dtype(m, x, packed))
        with replaced_output(module, values[LAYER]):
            return call_raw(m, _rebuild(inputs, values))

    def whole(m: Any, x: Tensor) -> Any:
        return call_raw(m, _rebuild(inputs, packed.unpack(x, _compute_dtype(m, x, packed))))

    dtype = _packed_dtype(model, packed)
    return _checked(PreparedBatch(packed.flat, at_layer, dtype, packed, name, output, whole))


def _checked(batch: PreparedBatch) -> PreparedBatch:
    check_finite_batch(batch.x, batch.packed)
    return batch


def _packed_dtype(model: Any, packed: Packed) -> torch.dtype:
    """A module computes in its own dtype; a plain callable in its first differentiated input's."""
    return model_dtype(model, packed.flat) if isinstance(model, nn.Module) else packed.input_dtype


def check_finite_batch(x: Tensor, packed: Packed | None) -> None:
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


def _compute_dtype(model: Any, x: Tensor, packed: Packed) -> torch.dtype | None:
    """The dtype a packed batch's floating inputs are handed to the model in.

    ``x``'s when it is not the packing dtype (the float64 reference: a module's parameters are float64 there too,
    or cast as each submodule runs when it is sharded); else a module's own, and for a plain callable each input's
    own.
    """
    if x.dtype != packed.pack_dtype:
        return x.dtype
    if isinstance(model, nn.Module):
        return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return None


def _token_embedding(
    model: Any, inputs: Any, entries: dict[Any, Any], call_raw: Callable[[Any, Any], Any], notes: Notes
) -> nn.Module:
    """Zero-config token models: the nn.Embedding that consumes an integer input, said once."""
    ids = [v for v in entries.values() if isinstance(v, Tensor) and v.ndim > 0 and not v.is_floating_point()]
    if isinstance(model, nn.Module):
        for candidate in ids:
            found = find_token_embedding(model, candidate, lambda: call_raw(model, inputs))
            if found is not None:
                notes.add(
                    f"token model: probed at the output of the embedding `{found[0]}` (token ids have no input "
                    "gradient); pass `layer=` to probe elsewhere",
                    warn=True,
                )
                return found[1]
    kinds = sorted({str(v.dtype) for v in ids}) or [type(inputs).__name__]
    raise TypeError(
        f"probe: the inputs hold no floating tensor ({', '.join(kinds)}), and no nn.Embedding of the model consumes "
        "them. Input gradients of integer inputs (token ids) do not exist: probe an embedding's (or any layer's) "
        'output with `layer=` (a submodule or its dotted name), e.g. `probe(model, ids, layer="embed")`.'
    )


def as_entries(inputs: Any) -> dict[Any, Any]:
    """The entries of a tuple/list (by position), a dict (by key), or a single input (key ``0``)."""
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


def device_of(inputs: Any) -> torch.device:
    """The device of the first tensor among the inputs."""
    for value in as_entries(inputs).values():
        if isinstance(value, Tensor):
            return value.device
    raise TypeError(
        f"probe: `inputs` must be a tensor, a tuple/list or a dict of tensors, got {type(inputs).__name__}."
    )
