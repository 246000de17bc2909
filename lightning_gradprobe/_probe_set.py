"""The validation samples ``GradProbe`` probes: drawn once (or at every probe) from the validation stream, kept.

No Lightning here: the callback hands in batches as it sees them; this store draws a uniform sample with its own
generator, keeps it (checkpointed), and hands back each process's share.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._batches import Reservoir, leaves, take_rows

__all__ = ["ProbeSet"]

# Each process draws from its own stream with its own seed: rank r's generator is seeded seed + this x r.
_RANK_SEED_STRIDE = 7919


class ProbeSet:
    """The probed samples and how they are drawn.

    Args:
        size: Samples probed in total, shared out across processes (halved when a probe is too slow).
        seed: Seed of the draws.
        redraw: Draw new samples at every probe instead of keeping the first draw.

    Example:
        >>> import torch
        >>> samples = ProbeSet(size=4, seed=0, redraw=False)
        >>> samples.begin(due=True, world_size=1, rank=0, probes_done=0)
        >>> samples.offer(torch.randn(10, 3), torch.arange(10))
        >>> samples.finish()
        >>> samples.inputs.shape, samples.share(world_size=2)[0].shape
        (torch.Size([4, 3]), torch.Size([2, 3]))

    """

    def __init__(self, size: int, seed: int, redraw: bool) -> None:
        self.size = size
        self.seed = seed
        self.redraw = redraw
        self.inputs: Any = None
        self.labels: Tensor | None = None
        self.nonfinite_inputs = 0  # validation rows left out for NaN/Inf inputs, over the run
        self.mismatched = 0  # rows of the last draw left out: padded to another length than the first batch
        self.layout_checked = False  # whether a batch was read once (during the sanity check)
        self._reservoir: Reservoir | None = None

    @property
    def drawing(self) -> bool:
        """Whether this validation's batches are being drawn from."""
        return self._reservoir is not None

    def begin(self, *, due: bool, world_size: int, rank: int, probes_done: int) -> None:
        """A validation starts: draw from it when a probe is due and samples are needed."""
        needs_samples = self.redraw or self.inputs is None
        seed = self.seed + _RANK_SEED_STRIDE * rank + (probes_done if self.redraw else 0)
        self._reservoir = Reservoir(self._per_process(world_size), seed) if due and needs_samples else None

    def stop_drawing(self) -> None:
        """Draw nothing more from this validation (probing paused)."""
        self._reservoir = None

    def offer(self, inputs: Any, labels: Tensor | None) -> None:
        """Consider the rows of one validation batch."""
        if self._reservoir is not None:
            self._reservoir.offer(inputs, labels)

    def finish(self) -> None:
        """The validation ended: keep what was drawn (if anything)."""
        reservoir, self._reservoir = self._reservoir, None
        if reservoir is None:
            return
        self.nonfinite_inputs += reservoir.nonfinite
        self.mismatched = reservoir.mismatched
        drawn = reservoir.result()
        if drawn is not None:
            self.inputs, self.labels = drawn

    def mismatch_note(self) -> str:
        """What the last draw left out because of padding, in words."""
        return (
            f"{self.mismatched} validation rows were not drawn: their batches are padded to another length than the "
            "first one. Pad to a fixed length to draw from every batch."
        )

    def share(self, world_size: int) -> tuple[Any, Tensor | None]:
        """The share of the samples a process probes: its inputs and labels."""
        return self.rows(self._per_process(world_size))

    def rows(self, count: int) -> tuple[Any, Tensor | None]:
        """The first ``count`` samples and their labels (what a report of ``count`` samples was made from)."""
        labels = self.labels[:count] if self.labels is not None else None
        return take_rows(self.inputs, slice(0, count)), labels

    def shrink(self) -> bool:
        """Halve the samples probed (a probe took too long); whether there was anything to halve."""
        if self.size == 1:
            return False
        self.size = max(1, self.size // 2)
        return True

    def _per_process(self, world_size: int) -> int:
        return -(-self.size // world_size)

    def __len__(self) -> int:
        return 0 if self.inputs is None else leaves(self.inputs)[0].shape[0]

    def state_dict(self) -> dict[str, Any]:
        """The state a checkpoint keeps (keys as in earlier versions)."""
        return {"probe_inputs": self.inputs, "probe_labels": self.labels, "active_samples": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (missing keys keep their defaults)."""
        self.inputs = state.get("probe_inputs")
        self.labels = state.get("probe_labels")
        self.size = state.get("active_samples", self.size)
