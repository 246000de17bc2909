"""``GradProbe``: a Lightning callback that probes input gradients during validation and alerts.

A thin shell that wires Lightning's hooks to small units: :class:`~._schedule.ProbeSchedule` decides when to
probe, :class:`~._probe_set.ProbeSet` keeps the probed samples, :func:`~lightning_gradprobe.probe` checks
them, :mod:`~lightning_gradprobe.alerts` judges the figures gathered across processes, and
:mod:`~lightning_gradprobe.render` draws them. Training is never touched: the probe runs in eval mode on
detached copies of the parameters, with every RNG state restored.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from enum import Enum
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from ._arguments import check_arguments
from ._batches import BatchKey, leaves, read_batch, rebuild
from ._errors import GradientCheckError, GradProbeSetupError
from ._probe_set import ProbeSet
from ._schedule import Moment, Plan, ProbeSchedule
from .alerts import Alert, AlertThresholds, ProbeFigures, evaluate_alerts, figures_from_report
from .core import ProbeReport
from .core._exempt import ExemptSpec
from .core._options import ProbeOptions
from .core._probe import run_probe
from .core._sharding import tensor_parallel
from .render import Panels, logging_step
from .render.metrics import probe_metrics

__all__ = ["GradProbe", "GradProbeStoppingReason"]

OnAlert = Literal["warn", "stop", "raise"] | Callable[[Alert], None]
_UNSUPPORTED_SHARDING = ("FSDP", "DeepSpeed")  # Lightning's FSDP1 and DeepSpeed strategies (GPU only there)
_KEPT_ALERTS = 1000  # a long run keeps the recent alerts in memory, and the last 50 in checkpoints


class GradProbeStoppingReason(Enum):
    """Why ``GradProbe(on_alert="stop")`` stopped training, as Lightning's ``EarlyStoppingReason``."""

    NOT_STOPPED = 0
    ALERT = 1
    """An alert fired on this process (``stopping_reason_message`` quotes it)."""
    REMOTE = 2
    """An alert fired on another process; every process stops together."""


class GradProbe(Callback):
    r"""Probe input gradients of a few validation samples during training; alert when they can't be trusted.

    At validation time, ``num_samples`` validation samples drawn by the callback's own generator are probed
    with :func:`~lightning_gradprobe.probe` (input gradients against float64 finite differences, NaN/Inf,
    all-zero gradients, cross-sample leakage). Figures are logged under ``gradprobe/...`` in every logger;
    alerts warn, stop, raise or call back. Training is bit-for-bit unaffected (eval mode, detached copies of
    the parameters, RNG states restored, no ``.grad`` written); a probe's own failure is reported and backed
    off from, and only ``on_alert="raise"`` ever ends a run by raising.

    Args:
        num_samples: Validation samples probed (in total, shared out across DDP processes; under FSDP2 every
            process probes the same ones, in lockstep).
        every_n_epochs: Probe at the first validation of every n-th epoch.
        every_n_train_steps: Probe at the first validation after every n training steps instead.
        target: ``"argmax"``, ``"label"`` (the batch's labels), an int output index, a callable
            ``outputs -> (N, ...)``, or ``None`` (every output).
        input_key: How to take the input from a batch: a key or index, a tuple of them, or a callable
            (default: the batch, ``batch[0]``, the dict entries the module's ``forward`` takes, or a usual key).
        label_key: Likewise for labels (default ``batch[1]``, or ``"y"``/``"label"``/... in a dict).
        forward: ``forward(pl_module, x) -> outputs`` (default ``pl_module(x)``).
        output: For tuple/dict outputs: index, key or callable selecting the tensor to check.
        redraw: Draw a new probe set at every probe (default: the same samples throughout).
        n_directions: Finite-difference directions per sample.
        fail_threshold: Alert when the fraction of samples judged ``"fail"`` exceeds this (``None``: off).
        check_finite: Alert on NaN/Inf input gradients.
        check_leakage: Alert when samples leak into each other through the batch.
        vanishing_threshold: Alert when more than this fraction of samples has an all-zero input gradient.
        on_alert: ``"warn"``, ``"stop"`` (end training like ``EarlyStopping``), ``"raise"``
            (:class:`~lightning_gradprobe.GradientCheckError`), or a callable receiving each :class:`Alert`.
        on_test: Also probe during ``trainer.test()`` (on the probe set drawn first, unless ``redraw``).
        time_budget: Seconds one probe may take; past it the probe set shrinks by half (``None``: no limit).
        max_overhead: Fraction probing may add to the training time; due probes past it are postponed. The
            milestones of a fit under a minute (the first validation, three at the quarters, the last) run
            whatever the budget. ``None``: follow the schedule.
        localize: When samples fail, name the culprit submodule in the alert.
        check_parameters: Check the gradients with respect to the parameters too, the ones training consumes (a
            ``parameter_gradients`` alert naming the submodule; on by default, a few forwards of two samples).
        layer: Dotted name of a submodule whose output is probed instead of the model's input.
        exempt: Submodules (names, types, instances) whose backward is intentionally not the derivative.
        tokens: ``ids -> list[str]`` (a tokenizer's ``convert_ids_to_tokens``) to label token heat maps.
        strict: Raise (:class:`~lightning_gradprobe.GradProbeSetupError`) when the batch cannot be read or the
            first probe fails, instead of warning once and pausing probing while training goes on.
        second_order: Also check the double backward through the input (physics-informed losses, gradient
            penalties): a ``second_order_checks`` alert and ``gradprobe/second_order/...`` scalars.
        log_images: Log saliency pictures to every logger that takes images (TensorBoard, W&B, MLflow, ...).
        shared_scale: Keep the first probe's colour scale for all saliency pictures (default: per probe).
        feature_names: Names of tabular features, for attribution charts.
        seed: Seed of the callback's own generator (probe set, directions).
        verbose: Report alerts and probe problems through rank-zero warnings.

    Attributes:
        stopping_reason: A :class:`GradProbeStoppingReason`; ``stopping_reason_message`` says it in words.
        last_report: The last :class:`~lightning_gradprobe.ProbeReport` of this process.
        alerts: The :class:`~lightning_gradprobe.alerts.Alert` records so far (the last 1000).
        schedule, samples: When to probe (a ``ProbeSchedule``) and which samples (a ``ProbeSet``).

    Example:
        >>> from lightning_gradprobe import GradProbe
        >>> callback = GradProbe(num_samples=4, on_alert="stop", fail_threshold=0.25)
        >>> callback.state_key
        "GradProbe{'num_samples': 4, 'seed': 0}"

    """

    def __init__(
        self,
        num_samples: int = 8,
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        target: str | int | Callable[[Tensor], Tensor] | None = "argmax",
        input_key: BatchKey = None,
        label_key: BatchKey = None,
        forward: Callable[[pl.LightningModule, Tensor], Any] | None = None,
        output: str | int | Callable[[Any], Tensor] | None = None,
        redraw: bool = False,
        n_directions: int = 4,
        fail_threshold: float | None = 0.0,
        check_finite: bool = True,
        check_leakage: bool = True,
        vanishing_threshold: float | None = 0.5,
        on_alert: OnAlert = "warn",
        on_test: bool = False,
        time_budget: float | None = 60.0,
        max_overhead: float | None = 0.05,
        localize: bool = True,
        check_parameters: bool = True,
        second_order: bool = False,
        layer: str | None = None,
        exempt: ExemptSpec = None,
        tokens: Callable[[list[int]], list[str]] | None = None,
        strict: bool = False,
        log_images: bool = True,
        shared_scale: bool = False,
        feature_names: list[str] | None = None,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        check_arguments(locals())
        self.num_samples, self.target, self.seed = num_samples, target, seed
        self.input_key, self.label_key, self.forward = input_key, label_key, forward
        self.thresholds = AlertThresholds(fail_threshold, check_finite, check_leakage, vanishing_threshold)
        self.on_alert, self.on_test, self.time_budget, self.strict, self.verbose = (
            on_alert, on_test, time_budget, strict, verbose
        )  # fmt: skip
        self.log_images, self.shared_scale, self.feature_names, self.tokens = (
            log_images, shared_scale, feature_names, tokens
        )  # fmt: skip
        self.probe_options = ProbeOptions(
            n_directions=n_directions, seed=seed, forward=forward, output=output, localize=localize,
            check_parameters=check_parameters, localize_budget=(64, time_budget or 30.0), second_order=second_order,
            layer=layer, exempt=exempt,
        )  # fmt: skip
        by_steps = every_n_train_steps is not None
        self.schedule = ProbeSchedule(1 if by_steps else every_n_epochs or 1, every_n_train_steps, max_overhead)
        self.samples = ProbeSet(num_samples, seed, redraw)
        self.probes_done = 0
        self.alerts: list[Alert] = []
        self.saliency_scale: float | None = None
        self.last_report: ProbeReport | None = None
        self.stopping_reason = GradProbeStoppingReason.NOT_STOPPED
        self.stopping_reason_message: str | None = None
        self._plan = Plan.NOT_DUE
        self._said: set[str] = set()  # one-time messages already given
        self._panels: Panels | None = None
        self._lockstep = False  # a sharded model: every process probes the same samples (see ``setup``)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(num_samples=self.num_samples, seed=self.seed)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._lockstep = False
        reason = _unsupported_strategy(trainer.strategy)
        if reason is not None:
            self.schedule.pause(reason)
            rank_zero_warn(reason)
        elif "ModelParallel" in type(trainer.strategy).__name__:
            # FSDP2: every process probes the same samples in lockstep (the same collectives in the same order).
            self._lockstep = trainer.world_size > 1

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.schedule.start_fit()

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect(trainer, pl_module, batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module)

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_test:
            self._start(trainer)

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.on_test:
            self._collect(trainer, pl_module, batch)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_test:
            self._finish(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.samples.state_dict(),
            **self.schedule.state_dict(),
            "alerts": [alert.to_dict() for alert in self.alerts[-50:]],
            "stopping_reason": self.stopping_reason.value,
            **{key: getattr(self, key) for key in ("probes_done", "saliency_scale", "stopping_reason_message")},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples.load_state_dict(state_dict)
        self.schedule.load_state_dict(state_dict)
        self.probes_done = state_dict.get("probes_done", 0)
        self.alerts = [Alert.from_dict(a) for a in state_dict.get("alerts", [])]
        self.saliency_scale = state_dict.get("saliency_scale")
        self.stopping_reason = GradProbeStoppingReason(state_dict.get("stopping_reason", 0))
        self.stopping_reason_message = state_dict.get("stopping_reason_message")

    def _start(self, trainer: pl.Trainer) -> None:
        distributed = trainer.world_size > 1
        if distributed:  # every process decides alike: one that paused pauses all (no collective hangs)
            paused = trainer.strategy.reduce_boolean_decision(self.schedule.paused is not None, all=False)
            if paused:
                self.schedule.pause("probing paused on another process")

        def agree(decision: bool) -> bool:  # timings differ per process: rank zero decides for all
            return bool(trainer.strategy.broadcast(decision, src=0)) if distributed else decision

        moment = _moment(trainer)
        self._plan = self.schedule.plan(moment, agree=agree)
        if self._plan in (Plan.POSTPONED, Plan.MILESTONE):  # over budget: say how far, once
            self._say("budget", f"GradProbe: {self.schedule.budget(moment, time.perf_counter())}.", warning=False)
        world_size, rank = (1, 0) if self._lockstep else (trainer.world_size, trainer.global_rank)
        self.samples.begin(due=self._plan.probes, world_size=world_size, rank=rank, probes_done=self.probes_done)

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        if not self.samples.drawing and not (trainer.sanity_checking and not self.samples.layout_checked):
            return
        started = time.perf_counter()
        try:
            inputs, labels = read_batch(
                batch,
                input_key=self.input_key,
                label_key=self.label_key,
                labels_required=self.target == "label",
                forward=pl_module.forward if self.forward is None else None,  # whose signature tells the layout
            )
            self.samples.layout_checked = True
            self.samples.offer(inputs, labels)
        except Exception as error:  # the callback's own problem: say it once, pause probing, train on
            self._pause(f"cannot read the validation batch ({type(error).__name__}: {error})")
        finally:
            self.schedule.add_time(time.perf_counter() - started)

    def _pause(self, reason: str) -> None:
        """Stop probing for this run (training goes on), or raise under ``strict=True``."""
        if self.strict:
            raise GradProbeSetupError(f"GradProbe (strict=True): {reason}")
        self.samples.stop_drawing()  # (this validation still ends with the collectives every process runs)
        if self.schedule.pause(reason) and self.verbose:
            rank_zero_warn(
                f"GradProbe: {reason}. Probing is paused; training goes on. Fix it with `input_key=` (a key, a "
                "tuple of keys, or a callable returning the model's inputs), or pass `strict=True` to fail fast."
            )

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._plan.probes:
            return
        started = time.perf_counter()
        try:
            self._probe_and_report(trainer, pl_module)
        finally:
            self.schedule.record_probe(_moment(trainer), time.perf_counter() - started)

    def _probe_and_report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.samples.finish()
        if self._lockstep:  # rank zero's draw, probed by every process
            self.samples.inputs, self.samples.labels = trainer.strategy.broadcast(
                (self.samples.inputs, self.samples.labels), src=0
            )
            if tensor_parallel(pl_module):  # (the same structure on every process: all pause alike)
                reason = (
                    "GradProbe: skipped under tensor parallelism (a parameter is a DTensor outside every fully_shard "
                    "module): only data-parallel sharding (FSDP2's fully_shard) is probed. Probe a checkpoint with "
                    "trainer.validate() on a single device."
                )
                if self.schedule.pause(reason):
                    rank_zero_warn(reason)
                return
        if self.samples.mismatched:
            self._say("mismatched", f"GradProbe: {self.samples.mismatch_note()}", warning=False)
        options = replace(self.probe_options, seed=self.seed + self.probes_done)
        world_size = 1 if self._lockstep else trainer.world_size
        report, error, elapsed = _probe_share(trainer, pl_module, self.samples, options, self.target, world_size)
        figures = figures_from_report(report) if report is not None else ProbeFigures()
        if self._lockstep:  # the same figures everywhere; a failure anywhere is shared, and so is the time
            any_error = trainer.strategy.reduce_boolean_decision(error is not None, all=False)
            elapsed = float(trainer.strategy.broadcast(elapsed, src=0))
        else:
            figures, any_error = _gather(trainer, pl_module, figures, error is not None)
        self.probes_done += 1
        if any_error and self.strict and self.probes_done == 1:
            raise GradProbeSetupError(
                f"GradProbe (strict=True): the first probe failed ({type(error).__name__}: {error})"
            ) from error
        if any_error:
            self._back_off(error)
        if figures.probed == 0 or (any_error and self._lockstep):  # (in lockstep every process stops here alike)
            return
        self.last_report = report
        if report is not None:
            where = "every process the same ones, in lockstep" if self._lockstep else "per process"
            self._say("dtypes", f"GradProbe: probing {report.setup_summary()} ({where}).", warning=False)
        second_order, nonfinite = self.probe_options.second_order, self.samples.nonfinite_inputs
        metrics = probe_metrics(figures, report, self.thresholds, second_order=second_order, nonfinite_inputs=nonfinite)
        _log(trainer, pl_module, metrics)
        self._shrink_if_slow(elapsed)
        alerts = evaluate_alerts(figures, self.thresholds, logging_step(trainer) if _fitting(trainer) else -1)
        self.alerts = (self.alerts + alerts)[-_KEPT_ALERTS:]
        if report is not None and trainer.is_global_zero:
            self._render(trainer, report, alerts)
        self._act(trainer, alerts, report)

    def _render(self, trainer: pl.Trainer, report: ProbeReport, alerts: list[Alert]) -> None:
        try:
            if self._panels is None:
                self._panels = Panels(self.log_images, self.shared_scale, self.feature_names, self.saliency_scale)
            self._panels.tokens = self.tokens
            inputs, labels = self.samples.rows(len(report.verdicts))
            if mismatch := _feature_names_mismatch(self.feature_names, inputs):
                self._say("names", mismatch)
            self._panels.write(trainer, report, alerts, inputs, labels)
            self.saliency_scale = self._panels.scale
        except Exception as error:  # a picture is never worth a training run
            self._say("render", f"GradProbe: could not write the TensorBoard panels ({type(error).__name__}: {error}).")

    def _back_off(self, error: BaseException | None) -> None:
        skip = self.schedule.back_off()
        reason = f"{type(error).__name__}: {error}" if error is not None else "on another process"
        self._say(
            type(error).__name__ if error is not None else "remote",
            f"GradProbe: the probe failed ({reason}); training goes on. Skipping the next {_count(skip, 'probe')} "
            "(doubling after each further failure). This is reported once per kind of error.",
        )

    def _shrink_if_slow(self, elapsed: float) -> None:
        if self.time_budget is not None and elapsed > self.time_budget and self.samples.shrink():
            size = self.samples.size
            self._say(f"shrink {size}", f"GradProbe: a probe took {elapsed:.1f}s, over `time_budget`, probing {size}.")

    def _act(self, trainer: pl.Trainer, alerts: list[Alert], report: ProbeReport | None) -> None:
        stop = self.on_alert == "stop" and trainer.strategy.reduce_boolean_decision(bool(alerts), all=False)
        if stop and _fitting(trainer):  # every process decides alike: an alert anywhere stops all
            trainer.should_stop = True
            self.stopping_reason = GradProbeStoppingReason.ALERT if alerts else GradProbeStoppingReason.REMOTE
            self.stopping_reason_message = "; ".join(a.message for a in alerts) or "an alert on another process"
            rank_zero_info(f"GradProbe: stopping at step {logging_step(trainer)}: {self.stopping_reason_message}")
        if not alerts:
            return
        if callable(self.on_alert):
            for alert in alerts:
                self.on_alert(alert)
            return
        text = "; ".join(f"[{a.condition}] {a.message}" for a in alerts)
        if self.on_alert == "raise":
            raise GradientCheckError(f"GradProbe at step {logging_step(trainer)}: {text}", report, tuple(alerts))
        if self.verbose and self.on_alert == "warn":
            rank_zero_warn(f"GradProbe at step {logging_step(trainer)}: {text}")

    def _say(self, key: str, message: str, *, warning: bool = True) -> None:
        """Give a message once per run (a rank-zero warning, or info), when ``verbose``."""
        if not self.verbose or key in self._said:
            return
        self._said.add(key)
        (rank_zero_warn if warning else rank_zero_info)(message)


def _probe_share(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    samples: ProbeSet,
    options: ProbeOptions,
    target: Any,
    world_size: int,
) -> tuple[ProbeReport | None, BaseException | None, float]:
    """Probe this process's share of the samples: the report, or the error that stopped it; the seconds taken.

    In lockstep (a sharded model) ``world_size`` is 1: every process probes all of them.
    """
    if samples.inputs is None:
        return None, None, 0.0
    start = time.perf_counter()
    try:
        rows, labels = samples.share(world_size)
        x = trainer.precision_plugin.convert_input(rebuild(rows, [t.to(pl_module.device) for t in leaves(rows)]))
        if target == "label":
            if labels is None:
                raise ValueError("GradProbe: target='label' but no labels were drawn with the samples.")
            target = labels.to(pl_module.device).long().reshape(-1)
        return run_probe(pl_module, x, replace(options, target=target)), None, time.perf_counter() - start
    except Exception as error:  # never kill the run for a probe's own failure
        return None, error, time.perf_counter() - start


def _unsupported_strategy(strategy: Any) -> str | None:
    """Why the probe cannot run under ``strategy``, naming what to use instead; ``None`` when it can."""
    name = type(strategy).__name__
    if any(kind in name for kind in _UNSUPPORTED_SHARDING):
        return (
            f"GradProbe: skipped under {name}: its parameters are sharded in a way the probe does not gather. Train "
            "with ModelParallelStrategy and fully_shard() in configure_model (FSDP2), which GradProbe probes layer "
            "by layer, or probe a checkpoint with trainer.validate() on a single device."
        )
    return None


def _log(trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float]) -> None:
    """Log the scalars; the same keys on every process, so that ``sync_dist`` reduces them together."""
    sync = trainer.world_size > 1
    for name, value in metrics.items():
        pl_module.log(name, float(value), on_step=False, on_epoch=True, sync_dist=sync, batch_size=1)


def _gather(
    trainer: pl.Trainer, pl_module: pl.LightningModule, figures: ProbeFigures, failed: bool
) -> tuple[ProbeFigures, bool]:
    """Every process's figures added together, and whether a probe failed anywhere."""
    if trainer.world_size == 1:
        return figures, failed
    row = torch.cat([figures.to_tensor(), torch.tensor([float(failed)], dtype=torch.float64)])
    stacked = pl_module.all_gather(row.to(pl_module.device))
    if not isinstance(stacked, Tensor):
        raise TypeError(f"GradProbe: all_gather returned {type(stacked).__name__}, not a tensor.")
    rows = stacked.reshape(-1, row.numel())
    combined = ProbeFigures.from_gathered(rows[:, :-1], figures.failed_samples, figures.culprits)
    return combined, bool(rows[:, -1].sum() > 0)


def _feature_names_mismatch(names: list[str] | None, inputs: Any) -> str | None:
    """What is wrong with ``feature_names`` for tabular ``inputs`` ``(N, F)``, if anything."""
    width = inputs.shape[-1] if isinstance(inputs, Tensor) and inputs.ndim == 2 else None
    if names is None or width is None or len(names) == width:
        return None
    return (
        f"GradProbe: `feature_names` has {len(names)} names for {width} features; the pictures name them "
        f"f0..f{width - 1}. Pass one name per feature."
    )


def _fitting(trainer: pl.Trainer) -> bool:
    return trainer.state.fn == TrainerFn.FITTING


def _moment(trainer: pl.Trainer) -> Moment:
    return Moment(
        _fitting(trainer), trainer.sanity_checking, trainer.current_epoch, trainer.global_step, trainer.max_epochs
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
