"""Taking inputs and labels out of a batch, and drawing a uniform sample from a stream of batches."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .core._inputs import is_additive_mask

__all__ = [
    "BatchKey",
    "BatchLayoutError",
    "Reservoir",
    "read_batch",
    "extract",
    "finite_rows",
    "leaves",
    "rebuild",
    "take_rows",
]

BatchKey = str | int | tuple[str | int, ...] | Callable[[Any], Any] | None
"""How to take the inputs from a batch: a key or index, a tuple of them (several inputs), or a callable."""

_INPUT_KEYS = ("x", "input", "inputs", "image", "images", "features", "pixel_values", "input_values", "inputs_embeds")
_LABEL_KEYS = ("y", "label", "labels", "target", "targets")


class BatchLayoutError(ValueError):
    """The callback cannot read the batch as configured; the message says what to pass."""


def extract(batch: Any, key: BatchKey, *, what: str, argument: str, forward: Callable[..., Any] | None = None) -> Any:
    """Take the inputs (``what="input"``) or labels (``what="label"``) out of a batch.

    Defaults for inputs: a tensor batch is the input; a tuple/list holds ``(x, y, ...)``, or ``(x1, x2, ..., y)``
    when ``forward`` takes several positional inputs; a dict gives the entries that ``forward`` takes as keyword
    arguments (the Hugging Face convention, labels left out), else its one input-like entry (``x``, ``image``,
    ``pixel_values``, ...). Inputs may come out as a tensor, a tuple or a dict of tensors.

    Example:
        >>> import torch
        >>> x, y = torch.zeros(2, 3), torch.tensor([0, 1])
        >>> extract((x, y), None, what="label", argument="label_key").tolist()
        [0, 1]
        >>> extract({"image": x}, None, what="input", argument="input_key").shape
        torch.Size([2, 3])
        >>> def forward(input_ids, attention_mask=None): ...
        >>> sorted(extract({"input_ids": y, "attention_mask": y, "labels": y}, None, what="input",
        ...                argument="input_key", forward=forward))
        ['attention_mask', 'input_ids']

    """
    value: Any
    if callable(key):
        value = key(batch)
    elif isinstance(key, tuple):
        value = tuple(_select(batch, k, argument) for k in key)
    elif key is not None:
        value = _select(batch, key, argument)
    elif isinstance(batch, Tensor):
        value = batch if what == "input" else None
    elif isinstance(batch, Mapping):
        value = _from_dict(batch, what, argument, forward)
    elif isinstance(batch, Sequence) and not isinstance(batch, str):
        if what == "input":
            count = min(_positional_inputs(forward), max(len(batch) - 1, 1))
            value = batch[0] if count <= 1 else tuple(batch[:count])
        else:
            position = max(_positional_inputs(forward), 1)
            value = batch[position] if len(batch) > position else None
    else:
        raise BatchLayoutError(
            f"GradProbe: cannot take the {what} out of a {type(batch).__name__} batch; pass `{argument}=`."
        )
    if value is not None and not _is_tensors(value):
        raise BatchLayoutError(
            f"GradProbe: the batch's {what} is a {type(value).__name__}, not a tensor or a tuple/dict of tensors; "
            f"pass `{argument}=` (a key, a tuple of keys, or a callable)."
        )
    return value


def read_batch(
    batch: Any,
    *,
    input_key: BatchKey,
    label_key: BatchKey,
    labels_required: bool,
    forward: Callable[..., Any] | None,
) -> tuple[Any, Tensor | None]:
    """The inputs (a tensor, or a tuple/dict of tensors) and the labels of a batch.

    Labels that are not ``labels_required`` only caption pictures: they are taken when they are plainly there
    (one per sample), and never a reason to fail.

    Example:
        >>> import torch
        >>> x, y = torch.zeros(2, 3), torch.tensor([0, 1])
        >>> inputs, labels = read_batch((x, y), input_key=None, label_key=None, labels_required=False, forward=None)
        >>> inputs.shape, labels.tolist()
        (torch.Size([2, 3]), [0, 1])

    """
    inputs = extract(batch, input_key, what="input", argument="input_key", forward=forward)
    if inputs is None:
        raise ValueError("GradProbe: the batch holds no input; pass `input_key=`.")
    if labels_required:
        labels = extract(batch, label_key, what="label", argument="label_key", forward=forward)
        if labels is None:
            raise ValueError(
                "GradProbe: target='label' but the batch has no labels; pass `label_key=` or another target."
            )
        return inputs, labels
    try:
        labels = extract(batch, label_key, what="label", argument="label_key", forward=forward)
    except ValueError:
        return inputs, None
    n = leaves(inputs)[0].shape[0]
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.shape[0] != n:
        return inputs, None
    return inputs, labels


def _select(batch: Any, key: str | int, argument: str) -> Any:
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError) as error:
        raise BatchLayoutError(
            f"GradProbe: `{argument}`={key!r} does not select anything from the batch ({error})."
        ) from None


def _from_dict(batch: Mapping[str, Any], what: str, argument: str, forward: Callable[..., Any] | None) -> Any:
    if what == "label":
        found = [name for name in _LABEL_KEYS if name in batch]
        return batch[found[0]] if found else None
    entries = {k: v for k, v in batch.items() if k not in _LABEL_KEYS and isinstance(v, Tensor)}
    accepted = _keyword_inputs(forward, entries)
    if accepted:
        return accepted
    found = [name for name in _INPUT_KEYS if name in batch]
    if found:
        return batch[found[0]]
    raise BatchLayoutError(
        f"GradProbe: cannot tell which entries of the batch dict are the model's inputs (keys {sorted(batch)}; "
        "the model's forward takes none of them by name); pass `input_key=` with a key, a tuple of keys, or a "
        "callable."
    )


def _keyword_inputs(forward: Callable[..., Any] | None, entries: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries ``forward`` takes by keyword (all of them when it takes ``**kwargs``)."""
    parameters = _parameters(forward)
    if parameters is None:
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return entries
    named = {k: v for k, v in entries.items() if k in parameters and parameters[k].kind is not _POSITIONAL_ONLY}
    required = [n for n, p in parameters.items() if p.default is inspect.Parameter.empty and p.kind in _NAMED_KINDS]
    return named if named and all(n in named for n in required) else {}


def _positional_inputs(forward: Callable[..., Any] | None) -> int:
    """How many positional inputs ``forward`` requires (1 when unknown)."""
    parameters = _parameters(forward)
    if parameters is None:
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters.values() if p.kind in kinds and p.default is inspect.Parameter.empty]
    return max(len(required), 1)


_POSITIONAL_ONLY = inspect.Parameter.POSITIONAL_ONLY
_NAMED_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _parameters(forward: Callable[..., Any] | None) -> Mapping[str, inspect.Parameter] | None:
    if forward is None:
        return None
    try:
        return inspect.signature(forward).parameters
    except (TypeError, ValueError):  # builtins and the like
        return None


def _is_tensors(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, Mapping):
        return bool(value) and all(isinstance(v, Tensor) for v in value.values())
    if isinstance(value, (tuple, list)):
        return bool(value) and all(isinstance(v, Tensor) for v in value)
    return False


def leaves(inputs: Any) -> list[Tensor]:
    """The tensors of an input structure (a tensor, a tuple/list or a dict of tensors), in order."""
    if isinstance(inputs, Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return list(inputs.values())
    return list(inputs)


def rebuild(like: Any, tensors: Sequence[Tensor]) -> Any:
    """The structure of ``like`` with ``tensors`` as its leaves."""
    if isinstance(like, Tensor):
        return tensors[0]
    if isinstance(like, Mapping):
        return dict(zip(like.keys(), tensors, strict=True))
    return type(like)(tensors)


def take_rows(inputs: Any, rows: Any) -> Any:
    """Rows (a slice or an index tensor) of every leaf of an input structure."""
    return rebuild(inputs, [t[rows] for t in leaves(inputs)])


def finite_rows(inputs: Any) -> Tensor:
    """``(N,)`` whether each sample's floating inputs are all finite (additive masks, holding -inf, aside)."""
    first = leaves(inputs)[0]
    keep = torch.ones(first.shape[0], dtype=torch.bool, device=first.device)
    for tensor in leaves(inputs):
        if tensor.is_floating_point():
            finite = tensor.reshape(tensor.shape[0], -1).isfinite().all(1)
            if not bool(finite.all()) and is_additive_mask(tensor):
                continue
            keep &= finite
    return keep


class Reservoir:
    """A uniform sample of ``k`` rows from a stream of batches (Algorithm R), with its own generator.

    Works for datasets of unknown length (iterable datasets) and never touches the global RNG.

    Example:
        >>> import torch
        >>> reservoir = Reservoir(3, seed=0)
        >>> for start in range(0, 100, 10):
        ...     reservoir.offer(torch.arange(start, start + 10).float().unsqueeze(1), None)
        >>> reservoir.seen, reservoir.inputs.shape
        (100, torch.Size([3, 1]))

    """

    def __init__(self, k: int, seed: int) -> None:
        self.k = k
        self.seen = 0
        self.nonfinite = 0
        self.mismatched = 0  # rows of batches whose per-sample shapes differ from the first (dynamic padding)
        self.generator = torch.Generator().manual_seed(seed)
        self.inputs: Any = None
        self.labels: Tensor | None = None

    def offer(self, inputs: Any, labels: Tensor | None) -> None:
        """Consider every row of a batch (copies only the rows it keeps, to CPU).

        ``inputs`` is a tensor, or a tuple/dict of tensors with the batch dimension first. Rows whose floating
        inputs hold NaN/Inf are left out (and counted in ``nonfinite``): the stream's later rows take their place.
        Batches whose per-sample shapes differ from the first one's (padding to each batch's longest sequence)
        are left out too (counted in ``mismatched``).
        """
        with torch.inference_mode(False):  # batches under trainer.validate() are inference tensors
            good = finite_rows(inputs)
            if not bool(good.all()):
                self.nonfinite += int((~good).sum())
                index = good.nonzero().flatten()
                inputs = take_rows(inputs, index)
                labels = labels[index.to(labels.device)] if labels is not None else None
            if leaves(inputs)[0].shape[0]:
                self._offer(inputs, labels)

    def _offer(self, inputs: Any, labels: Tensor | None) -> None:
        n = leaves(inputs)[0].shape[0]
        if self.inputs is not None and [t.shape[1:] for t in leaves(self.inputs)] != [
            t.shape[1:] for t in leaves(inputs)
        ]:
            self.mismatched += n  # padded to another length: the probe set keeps one shape
            return
        positions = torch.arange(self.seen, self.seen + n)
        self.seen += n
        # Row t (0-based stream position) replaces slot j ~ U{0..t} when j < k; the first k fill in order.
        draws = (torch.rand(n, generator=self.generator, dtype=torch.float64) * (positions + 1)).long()
        slots = torch.where(positions < self.k, positions, draws)
        keep = (slots < self.k).nonzero().flatten()
        if not len(keep):
            return
        rows = [t[keep.to(t.device)].detach().to("cpu", copy=True) for t in leaves(inputs)]
        if self.inputs is None:
            self.inputs = rebuild(inputs, [torch.empty((self.k, *r.shape[1:]), dtype=r.dtype) for r in rows])
            if labels is not None:
                self.labels = torch.empty((self.k, *labels.shape[1:]), dtype=labels.dtype)
        label_rows = labels[keep.to(labels.device)].detach().to("cpu", copy=True) if labels is not None else None
        stored = leaves(self.inputs)
        for row, slot in enumerate(slots[keep].tolist()):  # later rows overwrite earlier ones, as in Algorithm R
            for target, source in zip(stored, rows, strict=True):
                target[slot] = source[row]
            if self.labels is not None and label_rows is not None:
                self.labels[slot] = label_rows[row]

    def result(self) -> tuple[Any, Tensor | None] | None:
        """The drawn rows (fewer than ``k`` if the stream was shorter), or ``None`` if nothing was seen."""
        if self.inputs is None:
            return None
        size = min(self.k, self.seen)
        inputs = rebuild(self.inputs, [t[:size].clone() for t in leaves(self.inputs)])
        return inputs, None if self.labels is None else self.labels[:size].clone()
