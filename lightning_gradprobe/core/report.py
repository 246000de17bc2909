"""The probe's result: verdicts, evidence and gradient health, as a plain object."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from .._errors import GradientCheckError

__all__ = ["Culprit", "CulpritKind", "ParameterCheck", "ProbeReport", "SecondOrderReport", "Verdict", "dtype_name"]


class Verdict(str, Enum):
    """Per-sample verdict. Compares equal to its string value (``Verdict.PASS == "pass"``)."""

    PASS = "pass"
    """Autograd agrees with a reliable finite difference in every judged direction."""
    PRECISION_LIMITED = "precision-limited"
    """The model-dtype backward misses the tolerance, but the same backward in float64 agrees: the formula is right."""
    INCONCLUSIVE = "inconclusive"
    """The finite difference cannot be trusted here (kink, discontinuity, non-finite values, mixed batch)."""
    FAIL = "fail"
    """The backward disagrees with a reliable finite difference, at two step sizes and in float64 too."""
    UNCHECKED = "unchecked"
    """The sample's gradient was computed (saliency, health) but not spot-checked."""

    def __str__(self) -> str:
        return self.value


class CulpritKind(str, Enum):
    """Which of a submodule's own derivatives is wrong. Compares equal to its value (``"input"``)."""

    INPUT = "input"
    """The gradient with respect to its input."""
    PARAMETER = "parameter"
    """The gradient with respect to its own parameters (what training consumes)."""
    SECOND_ORDER = "second-order"
    """Its double backward through its input."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Culprit:
    """A submodule whose own backward disagrees with finite differences.

    Attributes:
        module: Its qualified name in the model (``""`` for the model itself).
        module_type: Its class name.
        kind: Which of its derivatives is wrong (a :class:`CulpritKind`).
        relative_error: The worst relative error of its own check.
        verdict: The verdict of its own check.
        explained_by: For a container, the failing descendants that explain its failure.
        finding: Why it cannot be differentiated twice, when that is the failure.

    Example:
        >>> culprit = Culprit("encoder.1", "Swish", CulpritKind.INPUT, 0.1)
        >>> culprit.label
        'encoder.1 (Swish, input)'
        >>> Culprit.from_dict(culprit.to_dict()) == culprit
        True

    """

    module: str
    module_type: str
    kind: CulpritKind
    relative_error: float
    verdict: Verdict = Verdict.FAIL
    explained_by: tuple[str, ...] = ()
    finding: str | None = None

    @property
    def label(self) -> str:
        """``"name (Type, kind)"``: the short form alerts and panels quote."""
        return f"{self.module or '<model>'} ({self.module_type}, {self.kind})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (checkpoints, loggers)."""
        return {
            "module": self.module,
            "module_type": self.module_type,
            "kind": self.kind.value,
            "relative_error": self.relative_error,
            "verdict": self.verdict.value,
            "explained_by": list(self.explained_by),
            "finding": self.finding,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Culprit:
        """Inverse of :meth:`to_dict`."""
        return Culprit(
            str(data["module"]),
            str(data["module_type"]),
            CulpritKind(data["kind"]),
            float(data["relative_error"]),
            Verdict(data.get("verdict", Verdict.FAIL.value)),
            tuple(data.get("explained_by", ())),
            data.get("finding"),
        )

    def __str__(self) -> str:
        name = self.module or "<model>"
        tail = f" (explained by {', '.join(self.explained_by)})" if self.explained_by else ""
        if self.finding:
            reason = f"explained by {', '.join(self.explained_by)}" if self.explained_by else self.finding
            return f"not twice differentiable: {name} ({self.module_type}; {reason})"
        what = {CulpritKind.INPUT: "input gradient", CulpritKind.PARAMETER: "parameter gradient"}.get(
            self.kind, "double backward"
        )
        return (
            f"{name} ({self.module_type}): {what} disagrees with finite differences, "
            f"relative error {self.relative_error:.3g}{tail}"
        )


@dataclass(frozen=True, eq=False)
class SecondOrderReport:
    """Second-order check of one probe: the double backward through the input, per sample.

    Attributes:
        verdicts: One :class:`~lightning_gradprobe.Verdict` per sample (``unchecked`` where not checked).
        margin: ``(N, k)`` error over allowed error per direction (``<= 1`` passes; NaN: unchecked).
        relative_error: ``(N, k)`` relative error of the Hessian-vector products (float64 formula).
        resolution: ``(N, k)`` what a pass certifies, relative to the scale of ``H v``.
        finding: Why the model cannot be differentiated twice, when it cannot (then every checked sample fails).
        culprits: Submodules whose own double backward is wrong or missing, deepest first (``localize=True``).
        mixed_term: Verdict on the mixed term a gradient penalty sends to the weights, ``d/dtheta (u . grad_x s)``,
            along random parameter directions in float64 (``None``: no parameters, e.g. a plain callable).
        mixed_margin: Its worst margin (error / allowed error).

    """

    verdicts: tuple[Verdict, ...]
    margin: Tensor
    relative_error: Tensor
    resolution: Tensor
    finding: str | None = None
    culprits: tuple[Culprit, ...] = ()
    mixed_term: Verdict | None = None
    mixed_margin: float = float("nan")

    @property
    def failed(self) -> list[int]:
        """Indices of samples whose second-order check failed."""
        return [i for i, v in enumerate(self.verdicts) if v is Verdict.FAIL]

    @property
    def ok(self) -> bool:
        """Whether no sample failed, the mixed term did not fail, and the model can be differentiated twice."""
        return not self.failed and self.finding is None and self.mixed_term is not Verdict.FAIL

    def headline(self) -> str:
        """Verdict counts, and the mixed term's verdict: ``"fail 8, mixed term fail"``."""
        counts = ", ".join(f"{v} {c}" for v in Verdict if (c := sum(1 for w in self.verdicts if w is v)))
        return counts + (f", mixed term {self.mixed_term}" if self.mixed_term is not None else "")

    def __str__(self) -> str:
        counts = ", ".join(f"{v} {c}" for v in Verdict if (c := sum(1 for w in self.verdicts if w is v)))
        margins = self.margin[~self.margin.isnan()]
        worst = f"{float(margins.max()):.2g}" if margins.numel() else "n/a"
        lines = [f"second order (double backward through the input): {counts}; margin max {worst}"]
        if self.mixed_term is not None:
            lines.append(
                f"  mixed term d/dtheta (u . grad_x s), what a gradient penalty sends to the weights: "
                f"{self.mixed_term} (margin {self.mixed_margin:.2g})"
            )
        if self.finding:
            lines.append(f"  finding: {self.finding}")
        lines += [f"  culprit: {culprit}" for culprit in self.culprits]
        return "\n".join(lines)


@dataclass(frozen=True)
class ParameterCheck:
    """The whole-model check of parameter gradients (``probe(check_parameters=True)``, the default).

    Attributes:
        verdict: ``pass``, ``fail`` or ``inconclusive``: autograd's gradient of a random combination of the checked
            outputs with respect to every trainable parameter, along random directions, against float64 central
            differences.
        margin: Its worst margin (error / allowed error; ``<= 1`` passes).
        relative_error: Its worst relative error.
        parameters: Trainable floating parameters (scalars) the directions span.
        frozen: Floating parameters (scalars) left out because they do not require grad.

    """

    verdict: Verdict
    margin: float
    relative_error: float
    parameters: int
    frozen: int = 0

    def __str__(self) -> str:
        frozen = f", {self.frozen} frozen left out" if self.frozen else ""
        return (
            f"parameter gradients (whole model, {self.parameters} parameters{frozen}): {self.verdict} "
            f"(margin {self.margin:.2g})"
        )


@dataclass(frozen=True, eq=False)
class ProbeReport:
    """What :func:`~lightning_gradprobe.probe` found. Per-sample tensors have the batch size ``N`` first.

    Attributes:
        verdicts: One :class:`Verdict` per sample.
        saliency: Input gradient of each sample's target, shaped like the inputs (signed): a tensor, or the inputs'
            tuple/dict structure (``None`` for entries that are not differentiated); with ``layer``, the gradient
            with respect to that layer's output.
        batch_independent: Whether no sample's outputs depend on another sample's input (``None``: not checked).
        leaking_pairs: ``(i, j)`` pairs where sample ``i``'s outputs depend on sample ``j``'s input (the forward
            mixes samples, confirmed by finite differences across samples).
        mixing_pairs: ``(i, j)`` pairs where the *backward* sends output ``i``'s gradient to input ``j`` although
            the forward keeps them apart (finite differences show no dependence): a wrong backward, ``fail``.
        blind_pairs: Those of ``leaking_pairs`` found by the forward alone, where the backward claims no
            cross-sample gradient at all: it treats something computed across the batch as a constant (batch
            statistics in a hand-written backward, a detached batch statistic).
        checked: Indices of the samples that were spot-checked against finite differences.
        relative_error: ``(N, k)`` relative error of the backward's formula per direction, as decided: the
            reference-dtype (float64) Jacobian against finite differences (NaN: unchecked).
        fd_error: ``(N, k)`` the finite difference's own error bound, relative (the noise floor).
        margin: ``(N, k)`` error over allowed error of the check that decided each direction: ``<= 1`` passes.
            For a float32 model, the larger of the formula's margin and that of its float32 Jacobian.
        resolution: ``(N, k)`` what a pass certifies: the backward's error along the direction is below this
            fraction of the scale of ``J v`` (at most 1% for a ``pass``).
        dtype_error: ``(N, k)`` the model-dtype Jacobian's distance from the float64 one along each direction,
            relative to the same scale (NaN when the model computes in the reference dtype).
        steps: ``(N,)`` the step finally used per sample (NaN: unchecked).
        rechecked_nearby: ``(N,)`` whether some direction was re-checked at a nearby point with a smaller
            step (the sample sat on a tie or kink, or the first check was not a clean pass).
        grad_norm: ``(N,)`` Frobenius norm of each sample's input Jacobian.
        nonfinite_count: ``(N,)`` NaN/Inf entries in each sample's input Jacobian.
        zero_fraction: ``(N,)`` fraction of exactly-zero entries in each sample's input Jacobian.
        engine: ``"torch.func"`` or ``"autograd"`` (the fallback).
        engine_note: Why the fallback ran, if it did.
        model_dtype: The dtype the model and its backward computed in.
        fd_dtype: The dtype of the finite differences.
        n_outputs: Outputs compared per sample (after target selection or projection).
        projected: Whether outputs were compared through random projections (many outputs).
        rtol: Relative tolerance granted to the model-dtype backward.
        notes: Human-readable remarks (fallbacks, skipped checks).
        layer: The submodule whose output was probed instead of the inputs (a token model's embedding is found
            automatically), else ``None``.
        token_scores: For a ``(N, L, E)`` layer output: per-token ``"norm"`` (L2 norm of the gradient over ``E``)
            and ``"grad_x_input"`` (gradient x embedding, summed over ``E``), each ``(N, L)``.
        second_order: The :class:`SecondOrderReport` of the double backward through the input, when asked for
            (``probe(..., second_order=True)``), else ``None``.
        exempt: The submodules exempt from the check (``probe(exempt=...)``): their backward is intentionally not
            the derivative; the model after the last of them was checked as a whole, every other submodule alone.
        parameter_check: The :class:`ParameterCheck` of the gradients with respect to the parameters (``None``:
            not asked for, or nothing trainable); when it fails, ``culprits`` name the submodule and ``"parameter"``.

    """

    verdicts: tuple[Verdict, ...]
    saliency: Any
    batch_independent: bool | None
    leaking_pairs: tuple[tuple[int, int], ...]
    checked: Tensor
    relative_error: Tensor
    fd_error: Tensor
    margin: Tensor
    resolution: Tensor
    dtype_error: Tensor
    steps: Tensor
    rechecked_nearby: Tensor
    grad_norm: Tensor
    nonfinite_count: Tensor
    zero_fraction: Tensor
    engine: str
    engine_note: str | None
    model_dtype: torch.dtype
    fd_dtype: torch.dtype
    n_outputs: int
    projected: bool
    rtol: float
    notes: tuple[str, ...] = field(default=())
    outputs: Tensor | None = None
    culprits: tuple[Culprit, ...] = ()
    localization_note: str | None = None
    forward_mode_mismatch: tuple[int, ...] | None = None
    mixing_pairs: tuple[tuple[int, int], ...] = ()
    blind_pairs: tuple[tuple[int, int], ...] = ()
    second_order: SecondOrderReport | None = None
    layer: str | None = None
    token_scores: dict[str, Tensor] | None = None
    parameter_check: ParameterCheck | None = None
    exempt: tuple[str, ...] = ()

    @property
    def failed(self) -> list[int]:
        """Indices of samples judged ``"fail"``."""
        return [i for i, v in enumerate(self.verdicts) if v is Verdict.FAIL]

    @property
    def counts(self) -> dict[str, int]:
        """How many samples got each verdict."""
        return {v.value: sum(1 for w in self.verdicts if w is v) for v in Verdict}

    @property
    def ok(self) -> bool:
        """Whether nothing wrong was found.

        No ``"fail"``, no non-finite input gradient, samples independent, no parameter-gradient
        culprit, forward mode consistent (each where checked).
        """
        return not self.problems()

    def problems(self) -> list[str]:
        """One sentence per reason ``ok`` is False (empty when ``ok``)."""
        found = []
        if self.failed:
            worst = self.margin[self.failed].nan_to_num(nan=0.0).max()
            found.append(
                f"{_count(len(self.failed), 'sample')} of {len(self.checked)} checked fail: the backward disagrees "
                f"with finite differences (worst margin {float(worst):.3g}, i.e. error / allowed error; samples "
                f"{self.failed[:8]})"
            )
        if self.mixing_pairs:
            found.append(
                f"the backward mixes samples that the forward keeps apart, e.g. (output, input) pairs "
                f"{list(self.mixing_pairs[:6])}: a reduction over the batch axis in a hand-written backward?"
            )
        bad = (self.nonfinite_count > 0).nonzero().flatten().tolist()
        if bad:
            found.append(f"non-finite input gradients in samples {bad[:8]}")
        wrong_weights = [c for c in self.culprits if c.kind is CulpritKind.PARAMETER]
        if wrong_weights:
            found.append(
                "parameter gradients disagree with finite differences in "
                + ", ".join(f"{c.module or '<model>'} ({c.module_type})" for c in wrong_weights)
            )
        elif self.parameter_check is not None and self.parameter_check.verdict is Verdict.FAIL and not self.failed:
            found.append(
                "parameter gradients disagree with finite differences (whole-model check along random parameter "
                f"directions, margin {self.parameter_check.margin:.3g}); no single submodule's own check failed"
            )
        if self.forward_mode_mismatch:
            found.append(
                f"forward mode (jvp) disagrees with reverse mode on samples {list(self.forward_mode_mismatch)}"
            )
        second = self.second_order
        if second is not None and not second.ok:
            whats = []
            if second.finding:
                whats.append(f"the model cannot be differentiated twice ({second.finding})")
            elif second.failed:
                whats.append(
                    f"{_count(len(second.failed), 'sample')}' double backward through the input disagrees with "
                    f"finite differences of first-order gradients (samples {second.failed[:8]})"
                )
            if second.mixed_term is Verdict.FAIL:
                whats.append(
                    "the mixed term d/dtheta (u . grad_x s), what a gradient penalty sends to the weights, "
                    f"disagrees with finite differences (margin {second.mixed_margin:.3g})"
                )
            found.append("second order: " + "; ".join(whats) + "".join(f"; culprit: {c}" for c in second.culprits[:3]))
        if self.batch_independent is False:
            blind = (
                "; the backward claims no cross-sample gradient for them (batch statistics treated as constants?)"
                if self.blind_pairs
                else ""
            )
            found.append(
                f"samples are not independent: outputs depend on other samples' inputs, e.g. (output, input) "
                f"pairs {list(self.leaking_pairs[:6])}{blind}"
            )
        return found

    def setup_summary(self) -> str:
        """How the probe ran, in words: samples, dtypes, engine."""
        return (
            f"{_count(len(self.verdicts), 'sample')}; backward in {self.model_dtype}, finite differences in "
            f"{self.fd_dtype}, engine {self.engine}"
        )

    def raise_if_failed(self) -> None:
        """Raise :class:`~lightning_gradprobe.GradientCheckError` (carrying this report) unless ``ok``."""
        if not self.ok:
            raise GradientCheckError("gradient check failed: " + "; ".join(self.problems()) + f"\n{self}", self)

    def summary(self) -> dict[str, float]:
        """Scalar figures for logging: verdict fractions, error and gradient-norm statistics."""
        n_checked = max(len(self.checked), 1)
        counts = self.counts
        errors = self.relative_error[self.checked].flatten()
        errors = errors[errors.isfinite()]
        norms = self.grad_norm.double()
        norms = norms[norms.isfinite()]
        margins = self.margin[self.checked].flatten()
        margins = margins[~margins.isnan()]
        figures = {
            "margin_max": float(margins.max()) if margins.numel() else float("nan"),
            "fail_fraction": counts["fail"] / n_checked,
            "inconclusive_fraction": counts["inconclusive"] / n_checked,
            "precision_limited_fraction": counts["precision-limited"] / n_checked,
            "relative_error_max": float(errors.max()) if errors.numel() else float("nan"),
            "relative_error_median": float(errors.median()) if errors.numel() else float("nan"),
            "nonfinite_count": float(self.nonfinite_count.sum()),
            "zero_fraction_mean": float(self.zero_fraction.double().mean()),
            "leaking_pairs": float(len(self.leaking_pairs)),
        }
        for q in (0.1, 0.5, 0.9):
            key = f"grad_norm_p{int(q * 100)}"
            figures[key] = float(torch.quantile(norms, q)) if norms.numel() else float("nan")
        return figures

    def __str__(self) -> str:
        counts = ", ".join(f"{v} {c}" for v, c in self.counts.items() if c)
        steps = self.steps[self.checked]
        steps = steps[steps.isfinite()]
        step_text = f"{float(steps.min()):.2g}..{float(steps.max()):.2g}" if steps.numel() else "n/a"
        fd_noise = self.fd_error[self.checked]
        fd_noise = fd_noise[fd_noise.isfinite()]
        noise_text = f"{float(fd_noise.median()):.2g}" if fd_noise.numel() else "n/a"
        margins = self.margin[self.checked]
        margins = margins[~margins.isnan()]
        margin_text = f"{float(margins.max()):.2g}" if margins.numel() else "n/a"
        passed = [i for i in self.checked.tolist() if self.verdicts[i] is Verdict.PASS]
        certified = self.resolution[passed]
        certified = certified[certified.isfinite()]
        resolution_text = (
            f"; a pass certifies the backward to {float(certified.max()):.1g} of |J v|" if len(certified) else ""
        )
        lines = [
            f"ProbeReport: {'OK' if self.ok else 'NOT OK'} - {counts} ({_count(len(self.verdicts), 'sample')})"
            + (f"; second order: {self.second_order.headline()}" if self.second_order is not None else ""),
            f"  engine {self.engine}; backward in {dtype_name(self.model_dtype)} (rtol {self.rtol:g})"
            + (f", its formula judged in {dtype_name(self.fd_dtype)}" if self.fd_dtype != self.model_dtype else "")
            + f"; finite differences in {dtype_name(self.fd_dtype)}, central, step {step_text} "
            f"(eps^(1/3) x input scale), median noise floor {noise_text} relative",
            f"  margin max {margin_text} (error / allowed error; <= 1 passes){resolution_text}",
            f"  outputs compared per sample: {self.n_outputs}{' (random projections)' if self.projected else ''}; "
            f"directions per sample: {self.relative_error.shape[1]}",
            f"  batch independent: {self.batch_independent}"
            + (
                f" (in the forward; the backward mixes {len(self.mixing_pairs)} (output, input) sample pairs)"
                if self.mixing_pairs
                else ""
            ),
        ]
        for i in self.checked.tolist():
            if self.verdicts[i] is Verdict.PASS:
                continue
            nearby = " (re-checked at a nearby point)" if bool(self.rechecked_nearby[i]) else ""
            dtype_text = (
                f", {dtype_name(self.model_dtype)} Jacobian off the float64 one by {_figures(self.dtype_error[i])}"
                if bool(self.dtype_error[i].isfinite().any())
                else ""
            )
            lines.append(
                f"  sample {i}: {self.verdicts[i]}{nearby} - margin per direction {_figures(self.margin[i])}, "
                f"relative error {_figures(self.relative_error[i])}, finite-difference error bound "
                f"{_figures(self.fd_error[i])}{dtype_text}"
            )
        moved = int(self.rechecked_nearby.sum())
        if moved:
            lines.append(
                f"  {_count(moved, 'sample')} re-checked at a nearby point (1% of the input scale away, step / 8): a "
                "kink or tie inside the stencil at the sample itself (max-pool over a flat region, ReLU at 0) "
                "cannot decide a verdict; a reliable failure is never moved"
            )
        if self.parameter_check is not None:
            lines.append(f"  {self.parameter_check}")
        lines += [f"  culprit: {culprit}" for culprit in self.culprits]
        if self.localization_note:
            lines.append(f"  localization: {self.localization_note}")
        if self.second_order is not None:
            lines += ["  " + line for line in str(self.second_order).splitlines()]
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  problem: {p}" for p in self.problems()]
        return "\n".join(lines)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).replace("torch.", "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _figures(values: Tensor) -> list[float]:
    return [float(f"{v:.2g}") for v in values.tolist()]
