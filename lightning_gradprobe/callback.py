"""``GradProbe``: a Lightning callback that probes input gradients during validation and alerts.

A thin shell: it draws the probe set, calls :func:`~lightning_gradprobe.probe`, gathers figures
across processes, judges them with :mod:`~lightning_gradprobe.alerts`, acts, and hands rendering to
:mod:`~lightning_gradprobe.render`. Training is never touched: the probe runs in eval mode on
detached copies of the parameters, with every RNG state restored.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from ._batches import BatchKey, Reservoir, extract, leaves, rebuild, take_rows
from ._errors import GradientCheckError
from .alerts import Alert, AlertThresholds, ProbeFigures, evaluate_alerts, figures_from_report
from .core import ProbeReport, probe

__all__ = ["GradProbe"]

OnAlert = Literal["warn", "stop", "raise"] | Callable[[Alert], None]
_SHARDED = ("FSDP", "DeepSpeed", "ModelParallel")


class GradProbe(Callback):
    r"""Probe input gradients of a few validation samples during training; alert when they can't be trusted.

    At validation time (every ``every_n_epochs`` epochs, or after every ``every_n_train_steps``
    steps; never during the sanity check), ``num_samples`` validation samples drawn uniformly by the
    callback's own seeded generator are probed with :func:`~lightning_gradprobe.probe`: per-sample
    input gradients, spot-checked against float64 finite differences, checked for NaN/Inf,
    all-zero gradients and cross-sample leakage. Figures are logged under ``gradprobe/...`` (in
    ``trainer.callback_metrics`` and every logger); alerts warn, stop, raise or call back.

    Training is bit-for-bit unaffected: the probe runs in eval mode on detached copies of the
    parameters and buffers, draws from its own generator, restores every RNG state, and never
    writes a ``.grad``. An exception inside the probe is reported once and the probe backs off; only
    ``on_alert="raise"`` ever stops a run by raising.

    Args:
        num_samples: Validation samples probed (in total, shared out across processes).
        every_n_epochs: Probe at the first validation of every n-th epoch (ignored when ``every_n_train_steps`` is set).
        every_n_train_steps: Probe at the first validation after every n training steps instead.
        target: ``"argmax"`` (the predicted class), ``"label"`` (the class in the batch's labels),
            an int output index, or a callable ``outputs -> (N, ...)``; ``None`` compares every output.
        input_key: How to take the input from a batch: a key or index, or a callable ``batch -> x``.
            Default: the batch itself if it is a tensor, ``batch[0]`` of a tuple, a usual key of a dict.
        label_key: Likewise for labels (default ``batch[1]``, or ``"y"``/``"label"``/... in a dict).
        forward: ``forward(pl_module, x) -> outputs`` (default ``pl_module(x)``).
        output: For tuple/dict outputs: index, key or callable selecting the tensor to check.
        redraw: Draw a new probe set at every probe (default: the same samples throughout).
        n_directions: Finite-difference directions per sample.
        fail_threshold: Alert when the fraction of samples judged ``"fail"`` exceeds this (``None``: off).
        check_finite: Alert on NaN/Inf input gradients.
        check_leakage: Alert when samples leak into each other through the batch.
        vanishing_threshold: Alert when more than this fraction of samples has an all-zero input
            gradient (``None``: off).
        on_alert: ``"warn"``, ``"stop"`` (end training like ``EarlyStopping``), ``"raise"``
            (:class:`~lightning_gradprobe.GradientCheckError`), or a callable receiving each :class:`Alert`.
        on_test: Also probe during ``trainer.test()``. The probe set is drawn once, from the first
            evaluation that runs, and then kept (unless ``redraw``): after a fit, ``test()`` probes the same
            validation samples, so their figures stay comparable.
        time_budget: Seconds one probe may take; past it the probe set shrinks by half (``None``: no limit).
        max_overhead: Fraction of the fit's wall time that probing (with its logging) may use. The
            first probe always runs; a later due probe is postponed while the budget is spent, so a
            very short epoch is not slowed down by a probe every epoch (``None``: follow the schedule).
        localize: When samples fail, check each submodule on its own on one failing sample and name the
            culprit in the alert (bounded: 64 submodules, ``time_budget``).
        check_parameters: Also check each submodule's gradient with respect to its own parameters (a
            ``parameter_gradients`` alert); costs a few forwards per submodule at every probe.
        layer: Dotted name of a submodule whose output is probed instead of the model's input, computed fresh
            from the stored batch at every probe (token models are probed at their embedding without it).
        tokens: ``ids -> list[str]`` (a tokenizer's ``convert_ids_to_tokens``) to label token heat maps.
        strict: Raise during the sanity check or the first validation when the callback cannot read the
            batch or run the probe, instead of warning once and pausing probing while training goes on.
        second_order: Also check the double backward through the input (for losses that differentiate input
            gradients: physics-informed networks, gradient penalties); a ``second_order_checks`` alert names
            the culprit, and ``gradprobe/second_order/{fail_fraction, margin_max}`` are logged.
        log_images: Log saliency panels to TensorBoard (when a ``TensorBoardLogger`` is attached).
        shared_scale: Keep the first probe's colour scale for all saliency pictures (default: per probe).
        feature_names: Names of tabular features, for attribution charts.
        seed: Seed of the callback's own generator (probe set, directions).
        verbose: Report alerts and probe problems through rank-zero warnings.

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
        check_parameters: bool = False,
        second_order: bool = False,
        layer: str | None = None,
        tokens: Callable[[list[int]], list[str]] | None = None,
        strict: bool = False,
        log_images: bool = True,
        shared_scale: bool = False,
        feature_names: list[str] | None = None,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        _positive_int("num_samples", num_samples)
        _positive_int("n_directions", n_directions)
        if every_n_epochs not in (None, 1) and every_n_train_steps is not None:
            raise ValueError(
                f"GradProbe: `every_n_epochs`={every_n_epochs} and `every_n_train_steps`={every_n_train_steps} are "
                "mutually exclusive; set one of them."
            )
        if every_n_epochs is not None:
            _positive_int("every_n_epochs", every_n_epochs)
        if every_n_train_steps is not None:
            _positive_int("every_n_train_steps", every_n_train_steps)
        if isinstance(target, str) and target not in ("argmax", "label"):
            raise ValueError(
                f"GradProbe: `target` must be 'argmax', 'label', an int, a callable or None; got {target!r}."
            )
        if isinstance(target, bool) or not (target is None or isinstance(target, (str, int)) or callable(target)):
            raise TypeError(
                f"GradProbe: `target` must be 'argmax', 'label', an int, a callable or None; got {target!r}."
            )
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"GradProbe: `layer` must be a submodule's dotted name (a str) or None; got {layer!r}.")
        if not callable(on_alert) and on_alert not in ("warn", "stop", "raise"):
            raise ValueError(f"GradProbe: `on_alert` must be 'warn', 'stop', 'raise' or a callable; got {on_alert!r}.")
        if time_budget is not None and not time_budget > 0:
            raise ValueError(f"GradProbe: `time_budget` must be None or > 0 seconds, got {time_budget!r}.")
        if max_overhead is not None and not 0 < max_overhead <= 1:
            raise ValueError(f"GradProbe: `max_overhead` must be None or in (0, 1], got {max_overhead!r}.")
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs if every_n_train_steps is None and every_n_epochs is not None else 1
        self.every_n_train_steps = every_n_train_steps
        self.target = target
        self.input_key = input_key
        self.label_key = label_key
        self.forward = forward
        self.output = output
        self.redraw = redraw
        self.n_directions = n_directions
        self.thresholds = AlertThresholds(fail_threshold, check_finite, check_leakage, vanishing_threshold)
        self.on_alert = on_alert
        self.on_test = on_test
        self.time_budget = time_budget
        self.max_overhead = max_overhead
        self.localize = localize
        self.check_parameters = check_parameters
        self.second_order = second_order
        self.layer = layer
        self.tokens = tokens
        self.strict = strict
        self.log_images = log_images
        self.shared_scale = shared_scale
        self.feature_names = feature_names
        self.seed = seed
        self.verbose = verbose
        # State (checkpointed).
        self.probe_inputs: Tensor | None = None
        self.probe_labels: Tensor | None = None
        self.probes_done = 0
        self.last_probe_step: int | None = None
        self.last_probe_epoch: int | None = None
        self.alerts: list[Alert] = []
        self.failures = 0
        self.active_samples = num_samples
        self._skip = 0
        self.saliency_scale: float | None = None
        # Per-run scratch.
        self.last_report: ProbeReport | None = None
        self.stopping_reason: str | None = None
        self._reservoir: Reservoir | None = None
        self._due = False
        self._disabled_reason: str | None = None
        self._warned: set[str] = set()
        self._panels: Any = None  # render.Panels, created on first use (rendering imports matplotlib)
        self._fit_started: float | None = None
        self._probing_seconds = 0.0
        self._probes_this_fit = 0
        self.postponed = 0
        self.nonfinite_inputs = 0
        self._paused_reason: str | None = None
        self._probe_costs: list[float] = []
        self._pictures = True

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(num_samples=self.num_samples, seed=self.seed)

    # ----------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = type(trainer.strategy).__name__
        if any(kind in name for kind in _SHARDED):
            self._disabled_reason = (
                f"GradProbe: skipped under {name}: parameters are sharded across processes and the probe does not "
                "gather them. Probe a checkpoint with trainer.validate() on a single device instead."
            )
            rank_zero_warn(self._disabled_reason)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_started = time.perf_counter()
        self._probing_seconds = 0.0
        self._probes_this_fit = 0
        self._probe_costs = []

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
            "probe_inputs": self.probe_inputs,
            "probe_labels": self.probe_labels,
            "probes_done": self.probes_done,
            "last_probe_step": self.last_probe_step,
            "last_probe_epoch": self.last_probe_epoch,
            "alerts": [alert.to_dict() for alert in self.alerts[-50:]],
            "failures": self.failures,
            "skip": self._skip,
            "active_samples": self.active_samples,
            "saliency_scale": self.saliency_scale,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe_inputs = state_dict.get("probe_inputs")
        self.probe_labels = state_dict.get("probe_labels")
        self.probes_done = state_dict.get("probes_done", 0)
        self.last_probe_step = state_dict.get("last_probe_step")
        self.last_probe_epoch = state_dict.get("last_probe_epoch")
        self.alerts = [Alert.from_dict(a) for a in state_dict.get("alerts", [])]
        self.failures = state_dict.get("failures", 0)
        self._skip = state_dict.get("skip", 0)
        self.active_samples = state_dict.get("active_samples", self.num_samples)
        self.saliency_scale = state_dict.get("saliency_scale")

    # ----------------------------------------------------------------- schedule and probe set
    def _is_due(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking or self._disabled_reason is not None or self._paused_reason is not None:
            return False
        if trainer.state.fn != "fit":
            return True  # an explicit trainer.validate() / trainer.test(): always probe
        if self.every_n_train_steps is not None:
            last = self.last_probe_step
            return last is None or trainer.global_step - last >= self.every_n_train_steps
        epoch = trainer.current_epoch
        return (epoch + 1) % self.every_n_epochs == 0 and epoch != self.last_probe_epoch

    def _start(self, trainer: pl.Trainer) -> None:
        if trainer.world_size > 1:  # every process decides alike: one that paused pauses all (no collective hangs)
            anywhere = trainer.strategy.reduce_boolean_decision(self._paused_reason is not None, all=False)
            if anywhere and self._paused_reason is None:
                self._paused_reason = "probing paused on another process"
        self._due = self._is_due(trainer)
        if self._due and self._skip > 0:  # backing off after a probe failure
            self._skip -= 1
            self._due = False
        self._pictures = True
        if self._due and self._over_budget(trainer):
            if self._milestone(trainer):  # probed regardless, at the cost of its checks: no pictures this time
                self._pictures = False
            else:
                self._due = False
                self.postponed += 1
        needs_samples = self.redraw or self.probe_inputs is None
        share = -(-self.active_samples // trainer.world_size)
        seed = self.seed + 7919 * trainer.global_rank + (self.probes_done if self.redraw else 0)
        self._reservoir = Reservoir(share, seed) if self._due and needs_samples else None

    def _over_budget(self, trainer: pl.Trainer) -> bool:
        if self.max_overhead is None or trainer.state.fn != "fit" or self._fit_started is None:
            return False
        if self._probes_this_fit == 0:
            return False
        elapsed = time.perf_counter() - self._fit_started
        # Steady-state cost: the first probe pays one-time costs (imports, writers, the first figure) that later
        # probes do not; they are not held against later probes.
        expected = min(self._probe_costs) if self._probe_costs else 0.0
        one_time = self._probe_costs[0] - expected if self._probe_costs else 0.0
        spent = self._probing_seconds - one_time
        over = spent + expected > self.max_overhead * (elapsed + expected)
        if trainer.world_size > 1:  # timings differ per process: rank zero decides for all
            over = bool(trainer.strategy.broadcast(over, src=0))
        if over and self.verbose and "budget" not in self._warned:
            self._warned.add("budget")
            rank_zero_info(
                f"GradProbe: probing has used {spent:.2f}s of {elapsed:.1f}s, and one more probe (~{expected:.2f}s) "
                f"would take it over `max_overhead`={self.max_overhead}; "
                "postponing probes until it is back under (the last validation, and five spread over a fit of "
                "known length, are still checked, without pictures, while the fit is under a minute). Reported once."
            )
        return over

    def _milestone(self, trainer: pl.Trainer) -> bool:
        """Whether this validation must be probed whatever the budget.

        The fit's last validation, and five spread evenly over a fit of known length, while the fit is short
        (under a minute, where probes cost little in absolute terms).
        """
        epochs = trainer.max_epochs
        if self._fit_started is None or epochs is None or epochs < 1 or self.every_n_train_steps is not None:
            return False
        epoch = trainer.current_epoch
        short = time.perf_counter() - self._fit_started <= 60.0  # in a long fit the budget alone decides
        # The first, three at quarters of the fit, and the last: five, spread.
        spread = self._probes_this_fit < 4 and epoch + 1 >= self._probes_this_fit * epochs / 4
        milestone = short and (epoch == epochs - 1 or spread)
        if trainer.world_size > 1:  # clocks differ per process: rank zero decides for all
            milestone = bool(trainer.strategy.broadcast(milestone, src=0))
        return milestone

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        if self._reservoir is None and not (trainer.sanity_checking and not self._warned & {"layout-checked"}):
            return
        started = time.perf_counter()
        try:
            inputs, labels = self._read(pl_module, batch)
            self._warned.add("layout-checked")
            if self._reservoir is not None:
                self._reservoir.offer(inputs, labels)
        except Exception as error:  # the callback's own problem: say it once, pause probing, train on
            self._pause(f"cannot read the validation batch ({type(error).__name__}: {error})")
        finally:
            self._probing_seconds += time.perf_counter() - started

    def _read(self, pl_module: pl.LightningModule, batch: Any) -> tuple[Any, Tensor | None]:
        """The inputs (a tensor, or a tuple/dict of tensors) and the labels of a batch."""
        forward = pl_module.forward if self.forward is None else None  # whose signature tells the layout
        inputs = extract(batch, self.input_key, what="input", argument="input_key", forward=forward)
        if inputs is None:
            raise ValueError("GradProbe: the batch holds no input; pass `input_key=`.")
        n = leaves(inputs)[0].shape[0]
        if self.target == "label":
            labels = extract(batch, self.label_key, what="label", argument="label_key", forward=forward)
            if labels is None:
                raise ValueError(
                    "GradProbe: target='label' but the batch has no labels; pass `label_key=` or another target."
                )
        else:  # labels only caption the pictures: take them when they are plainly there, never fail for them
            try:
                labels = extract(batch, self.label_key, what="label", argument="label_key", forward=forward)
            except ValueError:
                labels = None
            if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.shape[0] != n:
                labels = None
        return inputs, labels

    def _pause(self, reason: str) -> None:
        """Stop probing for this run (training goes on), or raise under ``strict=True``."""
        if self.strict:
            raise GradProbeSetupError(f"GradProbe (strict=True): {reason}")
        self._reservoir = None
        self._due = False
        if self._paused_reason is None:
            self._paused_reason = reason
            if self.verbose:
                rank_zero_warn(
                    f"GradProbe: {reason}. Probing is paused; training goes on. Fix it with `input_key=` (a key, a "
                    "tuple of keys, or a callable returning the model's inputs), or pass `strict=True` to fail fast."
                )

    # ----------------------------------------------------------------- probing
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due:
            return
        started = time.perf_counter()
        try:
            self._probe_and_report(trainer, pl_module)
        finally:
            cost = time.perf_counter() - started
            self._probing_seconds += cost
            self._probe_costs.append(cost)
            self._probes_this_fit += 1

    def _probe_and_report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._reservoir is not None:
            drawn = self._reservoir.result()
            self.nonfinite_inputs += self._reservoir.nonfinite
            if self._reservoir.mismatched and self.verbose and "mismatched" not in self._warned:
                self._warned.add("mismatched")
                rank_zero_info(
                    f"GradProbe: {self._reservoir.mismatched} validation rows were not drawn: their batches are "
                    "padded to another length than the first one. Pad to a fixed length to draw from every batch."
                )
            self._reservoir = None
            if drawn is not None:
                self.probe_inputs, self.probe_labels = drawn
        report, error, elapsed = self._probe_locally(trainer, pl_module)
        figures = figures_from_report(report) if report is not None else ProbeFigures()
        figures, any_error = self._gather(trainer, pl_module, figures, error is not None)
        self.probes_done += 1
        self.last_probe_step = trainer.global_step
        self.last_probe_epoch = trainer.current_epoch
        if any_error and self.strict and self.probes_done == 1:
            raise GradProbeSetupError(
                f"GradProbe (strict=True): the first probe failed ({type(error).__name__}: {error})"
            ) from error
        if any_error:
            self._back_off(error)
        if figures.probed == 0:
            return
        self.last_report = report
        if report is not None and self.verbose and "dtypes" not in self._warned:
            self._warned.add("dtypes")
            rank_zero_info(
                f"GradProbe: probing {_count(len(report.verdicts), 'sample')} per process; backward in "
                f"{report.model_dtype}, finite differences in {report.fd_dtype}, engine {report.engine}."
            )
        self._log(trainer, pl_module, figures, report)
        self._shrink_if_slow(elapsed)
        alerts = evaluate_alerts(figures, self.thresholds, trainer.global_step if trainer.state.fn == "fit" else -1)
        self.alerts = (self.alerts + alerts)[-1000:]  # a long run keeps the recent ones
        if report is not None and trainer.is_global_zero:
            self._render(trainer, report, alerts)
        self._act(trainer, alerts, report)

    def _render(self, trainer: pl.Trainer, report: ProbeReport, alerts: list[Alert]) -> None:
        try:
            from .render import Panels

            if self._panels is None:
                self._panels = Panels(self.log_images, self.shared_scale, self.feature_names, self.saliency_scale)
            assert self.probe_inputs is not None
            n = len(report.verdicts)
            labels = self.probe_labels[:n] if self.probe_labels is not None else None
            self._panels.tokens = self.tokens
            self._panels.log_images = self.log_images and self._pictures
            self._panels.write(trainer, report, alerts, take_rows(self.probe_inputs, slice(0, n)), labels)
            self.saliency_scale = self._panels.scale
        except Exception as error:  # a picture is never worth a training run
            if self.verbose and "render" not in self._warned:
                self._warned.add("render")
                rank_zero_warn(f"GradProbe: could not write the TensorBoard panels ({type(error).__name__}: {error}).")

    def _probe_locally(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[ProbeReport | None, BaseException | None, float]:
        if self.probe_inputs is None:
            return None, None, 0.0
        start = time.perf_counter()
        try:
            share = -(-self.active_samples // trainer.world_size)
            rows = take_rows(self.probe_inputs, slice(0, share))
            x = trainer.precision_plugin.convert_input(rebuild(rows, [t.to(pl_module.device) for t in leaves(rows)]))
            target: Any = self.target
            if target == "label":
                assert self.probe_labels is not None
                target = self.probe_labels[:share].to(pl_module.device).long().reshape(-1)
            report = probe(
                pl_module,
                x,
                target=target,
                forward=self.forward,
                output=self.output,
                n_directions=self.n_directions,
                seed=self.seed + self.probes_done,
                localize=self.localize,
                check_parameters=self.check_parameters,
                localize_budget=(64, self.time_budget or 30.0),
                second_order=self.second_order,
                layer=self.layer,
            )
            return report, None, time.perf_counter() - start
        except Exception as error:  # never kill the run for a probe's own failure
            return None, error, time.perf_counter() - start

    def _gather(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, figures: ProbeFigures, failed: bool
    ) -> tuple[ProbeFigures, bool]:
        if trainer.world_size == 1:
            return figures, failed
        row = torch.cat([figures.to_tensor(), torch.tensor([float(failed)], dtype=torch.float64)])
        stacked = pl_module.all_gather(row.to(pl_module.device))
        assert isinstance(stacked, Tensor)
        rows = stacked.reshape(-1, row.numel())
        combined = ProbeFigures.from_gathered(rows[:, :-1], figures.failed_samples, figures.culprits)
        return combined, bool(rows[:, -1].sum() > 0)

    def _back_off(self, error: BaseException | None) -> None:
        self.failures += 1
        self._skip = 2 ** min(self.failures, 6) - 1
        reason = f"{type(error).__name__}: {error}" if error is not None else "on another process"
        key = type(error).__name__ if error is not None else "remote"
        if self.verbose and key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(
                f"GradProbe: the probe failed ({reason}); training goes on. Skipping the next "
                f"{_count(self._skip, 'probe')} (doubling after each further failure). This is reported once per kind "
                "of error."
            )

    def _shrink_if_slow(self, elapsed: float) -> None:
        if self.time_budget is None or elapsed <= self.time_budget or self.active_samples == 1:
            return
        self.active_samples = max(1, self.active_samples // 2)
        if self.verbose:
            rank_zero_warn(
                f"GradProbe: a probe took {elapsed:.1f}s, over `time_budget`={self.time_budget}s; probing "
                f"{self.active_samples} samples from now on."
            )

    def _log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, figures: ProbeFigures, report: ProbeReport | None
    ) -> None:
        metrics = {
            "gradprobe/checks/fail_fraction": figures.failed / max(figures.checked, 1),
            "gradprobe/checks/inconclusive_fraction": figures.inconclusive / max(figures.checked, 1),
            "gradprobe/checks/margin_max": figures.worst_margin,
            "gradprobe/checks/relative_error_max": figures.worst_relative_error,
            "gradprobe/health/nonfinite_samples": float(figures.nonfinite),
            "gradprobe/health/vanishing_samples": float(figures.vanishing),
            "gradprobe/health/leaking_pairs": float(figures.leaking_pairs),
            "gradprobe/health/nonfinite_inputs": float(self.nonfinite_inputs),
        }
        if self.thresholds.fail_fraction is not None:
            metrics["gradprobe/checks/fail_threshold"] = self.thresholds.fail_fraction
        if self.second_order:
            checked = max(figures.second_order_checked, 1)
            metrics["gradprobe/second_order/fail_fraction"] = figures.second_order_failed / checked
            metrics["gradprobe/second_order/margin_max"] = figures.worst_second_order_margin
        # The same keys on every process, whether or not its own probe ran (sync_dist reduces them together).
        summary = report.summary() if report is not None else {}
        metrics["gradprobe/checks/margin_limit"] = 1.0
        metrics["gradprobe/checks/relative_error_median"] = summary.get("relative_error_median", float("nan"))
        for key in ("grad_norm_p10", "grad_norm_p50", "grad_norm_p90"):
            metrics[f"gradprobe/health/{key}"] = summary.get(key, float("nan"))
        sync = trainer.world_size > 1
        for name, value in metrics.items():
            pl_module.log(name, float(value), on_step=False, on_epoch=True, sync_dist=sync, batch_size=1)

    def _act(self, trainer: pl.Trainer, alerts: list[Alert], report: ProbeReport | None) -> None:
        if self.on_alert == "stop":
            should_stop = trainer.strategy.reduce_boolean_decision(bool(alerts), all=False)
            if should_stop and trainer.state.fn == "fit":
                trainer.should_stop = True
                self.stopping_reason = "; ".join(a.message for a in alerts) or "an alert on another process"
                rank_zero_info(f"GradProbe: stopping training at step {trainer.global_step}: {self.stopping_reason}")
        if not alerts:
            return
        if callable(self.on_alert):
            for alert in alerts:
                self.on_alert(alert)
            return
        text = "; ".join(f"[{a.condition}] {a.message}" for a in alerts)
        if self.on_alert == "raise":
            raise GradientCheckError(f"GradProbe at step {trainer.global_step}: {text}", report, tuple(alerts))
        if self.verbose and self.on_alert == "warn":
            rank_zero_warn(f"GradProbe at step {trainer.global_step}: {text}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"GradProbe: `{name}` must be an int >= 1, got {value!r}.")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


class GradProbeSetupError(RuntimeError):
    """Raised under ``GradProbe(strict=True)`` when the callback cannot read the batch or run the probe."""
