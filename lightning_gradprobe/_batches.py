"""Taking inputs and labels out of a batch, and drawing a uniform sample from a stream of batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchKey", "Reservoir", "extract"]

BatchKey = str | int | Callable[[Any], Tensor] | None

_INPUT_KEYS = ("x", "input", "inputs", "image", "images", "features")
_LABEL_KEYS = ("y", "label", "labels", "target", "targets")


def extract(batch: Any, key: BatchKey, *, what: str, argument: str) -> Tensor | None:
    """Take the inputs (``what="input"``) or labels (``what="label"``) out of a batch.

    Defaults: a tensor batch is the input (and has no label); a tuple/list holds ``(x, y, ...)``;
    a dict is searched for the usual key names.

    Example:
        >>> import torch
        >>> x, y = torch.zeros(2, 3), torch.tensor([0, 1])
        >>> extract((x, y), None, what="label", argument="label_key").tolist()
        [0, 1]
        >>> extract({"image": x}, None, what="input", argument="input_key").shape
        torch.Size([2, 3])

    """
    value: Any
    if callable(key):
        value = key(batch)
    elif key is not None:
        try:
            value = batch[key]
        except (KeyError, IndexError, TypeError) as error:
            raise ValueError(
                f"GradProbe: `{argument}`={key!r} does not select anything from the batch ({error})."
            ) from None
    elif isinstance(batch, Tensor):
        value = batch if what == "input" else None
    elif isinstance(batch, Mapping):
        names = _INPUT_KEYS if what == "input" else _LABEL_KEYS
        found = [name for name in names if name in batch]
        if not found:
            if what == "label":
                return None
            raise ValueError(
                f"GradProbe: cannot tell which entry of the batch dict is the input (keys {sorted(batch)}); "
                f"pass `{argument}=` with the key, or a callable."
            )
        value = batch[found[0]]
    elif isinstance(batch, Sequence) and not isinstance(batch, str):
        position = 0 if what == "input" else 1
        value = batch[position] if len(batch) > position else None
    else:
        raise ValueError(
            f"GradProbe: cannot take the {what} out of a {type(batch).__name__} batch; pass `{argument}=`."
        )
    if value is not None and not isinstance(value, Tensor):
        raise ValueError(
            f"GradProbe: the batch's {what} is a {type(value).__name__}, not a tensor; pass `{argument}=`."
        )
    return value


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
        self.generator = torch.Generator().manual_seed(seed)
        self.inputs: Tensor | None = None
        self.labels: Tensor | None = None

    def offer(self, inputs: Tensor, labels: Tensor | None) -> None:
        """Consider every row of a batch (copies only the rows it keeps, to CPU)."""
        with torch.inference_mode(False):  # batches under trainer.validate() are inference tensors
            self._offer(inputs, labels)

    def _offer(self, inputs: Tensor, labels: Tensor | None) -> None:
        n = inputs.shape[0]
        positions = torch.arange(self.seen, self.seen + n)
        self.seen += n
        # Row t (0-based stream position) replaces slot j ~ U{0..t} when j < k; the first k fill in order.
        draws = (torch.rand(n, generator=self.generator, dtype=torch.float64) * (positions + 1)).long()
        slots = torch.where(positions < self.k, positions, draws)
        keep = (slots < self.k).nonzero().flatten()
        if not len(keep):
            return
        rows = inputs[keep.to(inputs.device)].detach().to("cpu", copy=True)
        if self.inputs is None:
            self.inputs = torch.empty((self.k, *rows.shape[1:]), dtype=rows.dtype)
            if labels is not None:
                self.labels = torch.empty((self.k, *labels.shape[1:]), dtype=labels.dtype)
        label_rows = labels[keep.to(labels.device)].detach().to("cpu", copy=True) if labels is not None else None
        for row, slot in enumerate(slots[keep].tolist()):  # later rows overwrite earlier ones, as in Algorithm R
            self.inputs[slot] = rows[row]
            if self.labels is not None and label_rows is not None:
                self.labels[slot] = label_rows[row]

    def result(self) -> tuple[Tensor, Tensor | None] | None:
        """The drawn rows (fewer than ``k`` if the stream was shorter), or ``None`` if nothing was seen."""
        if self.inputs is None:
            return None
        size = min(self.k, self.seen)
        return self.inputs[:size].clone(), None if self.labels is None else self.labels[:size].clone()
