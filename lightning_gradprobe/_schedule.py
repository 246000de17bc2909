"""When ``GradProbe`` probes: the schedule, the overhead budget, milestones and back-off, as plain state.

No Lightning here: the callback hands in where the trainer stands (a :class:`Moment`) and a function that makes
every process agree on a decision (rank zero's broadcast under DDP), and gets back a :class:`Plan`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = ["Budget", "Moment", "Plan", "ProbeSchedule"]

# A long fit is governed by the budget alone; one shorter than this still gets its milestone probes (first,
# quarters, last), whose cost is small in absolute terms.
SHORT_FIT_SECONDS = 60.0
MILESTONES = 4  # the first probe and three at quarters of the fit; the last validation is one more
MAX_BACK_OFF_DOUBLINGS = 6  # after a failed probe skip 1, 3, 7, ... probes, at most 63


class Plan(Enum):
    """What one validation does about probing."""

    PAUSED = "paused"
    """Probing is paused for this run (the callback could not read the batch, or was switched off)."""
    NOT_DUE = "not due"
    """The schedule has no probe here (sanity check, or between ``every_n_*``)."""
    BACKING_OFF = "backing off"
    """Due, but skipped: an earlier probe failed."""
    POSTPONED = "postponed"
    """Due, but probing is over its ``max_overhead`` budget."""
    PROBE = "probe"
    """Probe, with pictures."""
    MILESTONE = "milestone"
    """Over budget, but a milestone of a short fit: probe all the same (pictures included: they cost milliseconds)."""

    @property
    def probes(self) -> bool:
        """Whether a probe runs."""
        return self in (Plan.PROBE, Plan.MILESTONE)


@dataclass(frozen=True)
class Moment:
    """Where the trainer stands when a validation starts.

    Attributes:
        fitting: Inside ``trainer.fit`` (an explicit ``validate()``/``test()`` always probes).
        sanity_checking: During Lightning's sanity check (never probed).
        epoch: The current epoch.
        global_step: The optimizer steps taken.
        max_epochs: The fit's planned epochs, if known.

    """

    fitting: bool
    sanity_checking: bool = False
    epoch: int = 0
    global_step: int = 0
    max_epochs: int | None = None


@dataclass(frozen=True)
class Budget:
    """Probing time in a fit against its training time: what the fit without probing would have taken.

    Attributes:
        spent: Probing time so far (reading batches and the first probe's one-time costs included).
        training: The fit's time so far, all probing taken out.
        expected: One more probe's cost (the median of the probes after the first: the steady state).
        limit: ``max_overhead``: probing may add this fraction to the training time.
        reserved: The expected cost of the milestone probes still to come, which run whatever the budget.
        projected: The whole fit's training time at its pace so far (``None``: its length is not known).

    Example:
        >>> Budget(spent=0.4, training=10.0, expected=0.1, limit=0.05).over  # 0.5 s would be 5% of 10 s: fits
        False
        >>> Budget(0.4, 10.0, 0.1, 0.05, reserved=0.3, projected=14.0).over  # no room left for the milestones
        True

    """

    spent: float
    training: float
    expected: float
    limit: float
    reserved: float = 0.0
    projected: float | None = None

    @property
    def over(self) -> bool:
        """Whether one more probe would make probing more than ``limit`` of the training time.

        Now, and over the whole fit once the milestones still to come are paid for.
        """
        now = self.spent + self.expected > self.limit * self.training
        whole = self.projected is not None and self.spent + self.expected + self.reserved > self.limit * self.projected
        return now or whole

    def __str__(self) -> str:
        share = f"{self.spent / self.training:.0%} of " if self.training > 0 else ""
        return (
            f"probing has used {self.spent:.2f}s, {share}the {self.training:.1f}s spent training so far "
            f"(`max_overhead`={self.limit}); due probes are postponed while one more (~{self.expected:.2f}s) does "
            "not fit, except the milestones of a fit under a minute (the first validation, three at the quarters "
            "and the last)"
        )


def _same_everywhere(decision: bool) -> bool:
    return decision


class ProbeSchedule:
    """Decides, at the start of each validation, whether to probe.

    Args:
        every_n_epochs: Probe at the first validation of every n-th epoch.
        every_n_train_steps: Probe at the first validation after every n training steps instead.
        max_overhead: Fraction probing may add to the training time (``None``: follow the schedule).

    Example:
        >>> schedule = ProbeSchedule(every_n_epochs=2, every_n_train_steps=None, max_overhead=None)
        >>> [schedule.plan(Moment(fitting=True, epoch=e)) for e in (0, 1)]
        [<Plan.NOT_DUE: 'not due'>, <Plan.PROBE: 'probe'>]

    """

    def __init__(self, every_n_epochs: int, every_n_train_steps: int | None, max_overhead: float | None) -> None:
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.max_overhead = max_overhead
        self.last_probe_step: int | None = None
        self.last_probe_epoch: int | None = None
        self.failures = 0
        self.skip = 0
        self.postponed = 0
        self.paused: str | None = None
        self.fit_started: float | None = None
        self.probing_seconds = 0.0
        self.probe_costs: list[float] = []
        self.first_epoch: int | None = None

    def start_fit(self, now: float | None = None) -> None:
        """A fit starts: its clock and its probing time start from zero."""
        self.fit_started = time.perf_counter() if now is None else now
        self.first_epoch = None  # the epoch of this fit's first validation (a resumed fit's too)
        self.probing_seconds = 0.0
        self.probe_costs = []

    def pause(self, reason: str) -> bool:
        """Pause probing for this run; whether this is the first pause (the one to report)."""
        first = self.paused is None
        self.paused = self.paused or reason
        return first

    def is_due(self, moment: Moment) -> bool:
        """Whether the schedule asks for a probe at this validation (budget and back-off aside)."""
        if moment.sanity_checking or self.paused is not None:
            return False
        if not moment.fitting:
            return True  # an explicit trainer.validate() / trainer.test(): always probe
        if self.every_n_train_steps is not None:
            last = self.last_probe_step
            return last is None or moment.global_step - last >= self.every_n_train_steps
        last = moment.max_epochs is not None and moment.epoch == moment.max_epochs - 1  # the trained model
        return ((moment.epoch + 1) % self.every_n_epochs == 0 or last) and moment.epoch != self.last_probe_epoch

    def plan(self, moment: Moment, now: float | None = None, agree: Callable[[bool], bool] = _same_everywhere) -> Plan:
        """Decide this validation; ``agree`` makes every process take rank zero's timing-based decisions."""
        now = time.perf_counter() if now is None else now
        if moment.fitting and not moment.sanity_checking and self.first_epoch is None:
            self.first_epoch = moment.epoch
        if self.paused is not None:
            return Plan.PAUSED
        if not self.is_due(moment):
            return Plan.NOT_DUE
        if self.skip > 0:
            self.skip -= 1
            return Plan.BACKING_OFF
        budget = self.budget(moment, now)
        if budget is None or not agree(budget.over):
            return Plan.PROBE
        if agree(self.is_milestone(moment, now)):
            return Plan.MILESTONE
        self.postponed += 1
        return Plan.POSTPONED

    def budget(self, moment: Moment, now: float) -> Budget | None:
        """The probing budget of this fit (``None``: unlimited, not fitting, or no probe yet to learn a cost from).

        Every second of probing counts, the first probe's one-time costs (imports, writers) too: the budget is
        what the fit really pays. They are paid once: the next probe is expected to cost what the later ones did.
        In a short fit of known length, the milestones still to come are reserved for.
        """
        if self.max_overhead is None or not moment.fitting or self.fit_started is None or not self.probe_costs:
            return None
        training = now - self.fit_started - self.probing_seconds
        expected = statistics.median(self.probe_costs[1:] or self.probe_costs)
        epochs = moment.max_epochs
        if (
            epochs is None
            or epochs < 1
            or self.every_n_train_steps is not None
            or now - self.fit_started > SHORT_FIT_SECONDS
        ):
            return Budget(self.probing_seconds, training, expected, self.max_overhead)
        milestones_left = max(0, MILESTONES - len(self.probe_costs)) + (moment.epoch < epochs - 1)
        done, planned = self._epochs_of_this_fit(moment, epochs)
        projected = training * planned / done
        return Budget(
            self.probing_seconds, training, expected, self.max_overhead, milestones_left * expected, projected
        )

    def is_milestone(self, moment: Moment, now: float) -> bool:
        """Whether this validation is probed whatever the budget.

        The fit's last validation, and the first and three at quarters of a fit of known length, while the fit
        is short (:data:`SHORT_FIT_SECONDS`).
        """
        epochs = moment.max_epochs
        if self.fit_started is None or epochs is None or epochs < 1 or self.every_n_train_steps is not None:
            return False
        probes = len(self.probe_costs)
        short = now - self.fit_started <= SHORT_FIT_SECONDS
        done, planned = self._epochs_of_this_fit(moment, epochs)
        spread = probes < MILESTONES and done >= probes * planned / MILESTONES
        return short and (moment.epoch == epochs - 1 or spread)

    def _epochs_of_this_fit(self, moment: Moment, epochs: int) -> tuple[int, int]:
        """Epochs this fit has run (the current one included) and will run: a resumed fit counts from its start."""
        start = moment.epoch if self.first_epoch is None else min(self.first_epoch, moment.epoch)
        return moment.epoch - start + 1, max(epochs - start, 1)

    def add_time(self, seconds: float) -> None:
        """Count time spent on probing outside a probe (reading batches)."""
        self.probing_seconds += seconds

    def record_probe(self, moment: Moment, cost: float) -> None:
        """A probe ran at ``moment`` and took ``cost`` seconds."""
        self.last_probe_step = moment.global_step
        self.last_probe_epoch = moment.epoch
        if moment.fitting and self.first_epoch is None:
            self.first_epoch = moment.epoch
        self.probing_seconds += cost
        self.probe_costs.append(cost)

    def back_off(self) -> int:
        """A probe failed: skip the next probes, twice as many after each further failure; how many."""
        self.failures += 1
        self.skip = 2 ** min(self.failures, MAX_BACK_OFF_DOUBLINGS) - 1
        return self.skip

    def state_dict(self) -> dict[str, Any]:
        """The state a checkpoint keeps (keys as in earlier versions)."""
        return {
            "last_probe_step": self.last_probe_step,
            "last_probe_epoch": self.last_probe_epoch,
            "failures": self.failures,
            "skip": self.skip,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (missing keys keep their defaults)."""
        self.last_probe_step = state.get("last_probe_step")
        self.last_probe_epoch = state.get("last_probe_epoch")
        self.failures = state.get("failures", 0)
        self.skip = state.get("skip", 0)
