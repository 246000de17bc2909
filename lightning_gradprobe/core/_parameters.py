"""Parameter gradients, checked on the whole model at once: what training consumes.

A wrong *weight* gradient (a hand-written linear, convolution or normalisation whose ``grad_input`` is right and
whose ``grad_weight`` is not) passes every input check. Here the function under test is

    ``s(theta) = sum_i u_i . selected outputs_i(theta)``,

a random combination ``u`` of the checked outputs of a few samples, as a function of every trainable parameter.
Its gradient comes from one float64 backward (the same code on a float64 copy of the parameters); it is compared
along random directions ``v`` in parameter space with float64 central differences of ``s`` (two forwards of those
samples per direction), by the rules of every other check: a clean first check passes; anything else is checked
again with step / 8, where a failure must repeat with the same finite-difference derivative. Only when this fails
does localization check each submodule's own parameters, to name the culprit.

Frozen parameters (``requires_grad=False``) get no direction; parameters shared between modules (tied embeddings)
are one parameter, whose gradient sums both uses.

Memory and time: nothing the size of the model is held beyond one float64 copy of the parameters and autograd's
gradient of it (each parameter a tensor of its own: slices of one flat vector would make autograd build a
zero-filled gradient of the whole vector per parameter). Directions are random signs, one byte per weight, sized
by each parameter tensor's own RMS; the finite differences move the copy in place, one parameter at a time, and
put it back exactly from the model's own tensors; the comparison needs only ``grad . v``, accumulated as the
parameters go by (:class:`ParameterSpace`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ._finite_differences import Comparison, Directional, Stencil, compare_directional
from ._functions import ParameterFunction
from ._verdicts import Problem, consistent, default_rtol
from .report import ParameterCheck, Verdict

__all__ = ["ParameterSpace", "check_parameter_gradients"]

PARAMETER_SAMPLES = 2  # samples whose outputs carry the check: every weight is used by any sample
PARAMETER_DIRECTIONS = 2  # random directions in parameter space: one can miss a small block (1 in 100 measured)
_GROUP_ELEMENTS = 1 << 20  # parameters moved with one call, up to this many weights (8 MiB of float64 moves)
# Directional derivatives below this fraction of the problem's own scale (|s| / |theta|) are round-off.
_FLOOR = 1e-6

ValueAt = Callable[[Sequence[Tensor]], Tensor]
"""A scalar function of one tensor per parameter (see :class:`ParameterSpace`)."""


def check_parameter_gradients(
    model: nn.Module,
    parameters: ParameterFunction,
    problem: Problem,
    x: Tensor,
    index: Tensor,
    *,
    n_outputs: int,
    generator: torch.Generator,
) -> ParameterCheck | None:
    """Judge the gradient of ``s(theta)`` (see the module docstring) on the first samples of ``x``.

    Returns ``None`` when the model has no trainable floating parameter.
    """
    if not any(parameters.trainable):
        return None
    ref = problem.reference_dtype
    xs, ixs = x[:PARAMETER_SAMPLES].to(ref), index[:PARAMETER_SAMPLES]
    combination = torch.randn((xs.shape[0], n_outputs), generator=generator, dtype=torch.float64) / n_outputs**0.5
    combination = combination.to(device=xs.device, dtype=ref)

    def value_at(values: Sequence[Tensor]) -> Tensor:
        return (problem.selection(parameters.call(values, xs), ixs).to(ref) * combination).sum()

    space = ParameterSpace(parameters, ref, generator, PARAMETER_DIRECTIONS)
    verdict, margin, relative_error = space.judge(value_at, rtol=default_rtol(ref), floor=_FLOOR)
    trainable = space.trainable_count
    return ParameterCheck(verdict, margin, relative_error, trainable, space.count - trainable)


class ParameterSpace:
    """A model's parameters as one point to differentiate at and to step away from, without copies of the model.

    Holds one copy of the parameters in ``dtype`` (``values``) and ``n_directions`` random sign directions over
    the trainable ones. On each parameter tensor a direction has the size of that tensor's own RMS (at least 1,
    as an input's step is sized by the input), so that a layer of large weights does not set the step of a
    layer of small ones. :meth:`judge` compares autograd's directional derivative of a scalar function of the
    parameters with central differences along those directions.

    Args:
        function: The model as a function of its parameters (its tensors are never written).
        dtype: The dtype of the copy (the reference dtype: float64).
        generator: Draws the directions.
        n_directions: How many directions.
        per_tensor: Size each tensor's entries by its own RMS; else every entry by the RMS of all trainable
            weights (steadier for strongly curved functions of the weights, such as a gradient of the input).

    Example:
        >>> from lightning_gradprobe.core._functions import build_parameter_function
        >>> model = nn.Linear(3, 2)
        >>> function = build_parameter_function(model, forward=None, output=None)
        >>> space = ParameterSpace(function, torch.float64, torch.Generator().manual_seed(0), 2)
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> space.judge(lambda values: function.call(values, x).pow(2).sum(), rtol=1e-10, floor=1e-6)[0]
        <Verdict.PASS: 'pass'>

    """

    def __init__(
        self,
        function: ParameterFunction,
        dtype: torch.dtype,
        generator: torch.Generator,
        n_directions: int,
        *,
        per_tensor: bool = True,
    ):
        self.sources = function.parameters
        self.values = [p.to(dtype, copy=True) for p in self.sources]
        self.trainable = [i for i, t in enumerate(function.trainable) if t]
        self.count = sum(p.numel() for p in self.sources)
        self.trainable_count = sum(self.sources[i].numel() for i in self.trainable)
        with torch.no_grad():  # per parameter: the size of its direction's entries
            squares = [float(value.double().pow(2).sum()) for value in self.values]
        self.norm = sum(squares) ** 0.5  # |theta|, every parameter
        trainable_squares = sum(squares[i] for i in self.trainable)
        overall = max(1.0, (trainable_squares / max(self.trainable_count, 1)) ** 0.5)
        self.sizes = {
            i: max(1.0, (squares[i] / max(self.sources[i].numel(), 1)) ** 0.5) if per_tensor else overall
            for i in self.trainable
        }
        self.signs = [{i: _signs(self.sources[i], generator) for i in self.trainable} for _ in range(n_directions)]
        # Parameters moved together (one foreach call per group): small models pay a few calls, not one per
        # tensor; a group's directions are materialised at once, so a group stays small next to the model.
        self.groups: list[list[int]] = []
        filled = _GROUP_ELEMENTS
        for i in self.trainable:
            if filled >= _GROUP_ELEMENTS:
                self.groups.append([])
                filled = 0
            self.groups[-1].append(i)
            filled += self.sources[i].numel()
        self._slot = {i: slot for slot, i in enumerate(self.trainable)}

    def gradient(self, value_at: ValueAt) -> tuple[Tensor, list[Tensor]]:
        """``value_at(values)`` and autograd's gradient of it, per trainable parameter (zeros where unused)."""
        leaves = [self.values[i].requires_grad_(True) for i in self.trainable]
        try:
            value = value_at(self.values)
            if not value.requires_grad:
                return value.detach(), [torch.zeros_like(leaf) for leaf in leaves]
            gradient = torch.autograd.grad(value, leaves, allow_unused=True, materialize_grads=True)
            return value.detach(), [g.detach() for g in gradient]
        finally:
            for leaf in leaves:
                leaf.requires_grad_(False)

    def judge(self, value_at: ValueAt, *, rtol: float, floor: float) -> tuple[Verdict, float, float]:
        """Autograd's ``grad . v`` against central differences of ``value_at`` along each direction.

        A clean first check passes; anything else is checked again with step / 8, where a failure must repeat
        with the same finite-difference derivative (``D(h) = D(h/8)``). Returns the verdict, the worst margin of
        the deciding checks, and the worst relative error.
        """
        value, gradient = self.gradient(value_at)
        dtype = self.values[0].dtype
        gain = (value.abs().double() / max(self.norm, self.count**0.5)).reshape(1)
        step = torch.finfo(dtype).eps ** (1 / 3)  # default_step's, on directions sized by each parameter

        def check(size: float) -> tuple[Stencil, Comparison]:
            stencil, autograd = self._stencil(value_at, value, gradient, size)
            return stencil, compare_directional(autograd, stencil, rtol, gain=gain, floor=floor)

        stencil, first = check(step)
        clean = first.passed & first.reliable & first.resolved
        if bool(clean.all()):
            return Verdict.PASS, float(first.margin.max()), float(first.relative_error.max())
        finer_stencil, finer = check(step / 8)
        same = consistent(stencil, finer_stencil)
        failed = (first.reliable & ~first.passed) & (finer.reliable & ~finer.passed) & same
        judged = clean | (finer.passed & finer.reliable & finer.resolved)
        margin = float(torch.where(clean, first.margin, finer.margin).max())
        relative_error = float(torch.where(clean, first.relative_error, finer.relative_error).max())
        if bool(failed.any()):
            return Verdict.FAIL, margin, relative_error
        return (Verdict.PASS if bool(judged.all()) else Verdict.INCONCLUSIVE), margin, relative_error

    def _directions(self, direction: int, group: list[int]) -> list[Tensor]:
        """Direction ``direction`` on the parameters of ``group``: ``+-`` each one's size, by its signs."""
        moves = []
        for i in group:
            value = self.values[i]
            positive = torch.full((), self.sizes[i], dtype=value.dtype, device=value.device)
            moves.append(torch.where(self.signs[direction][i].to(value.device), positive, -positive))
        return moves

    def _move(self, direction: int, step: float, gradient: list[Tensor] | None = None) -> float:
        """Move the copy from where it rests by ``step`` along ``direction``; ``grad . v`` when given the gradient."""
        along = []
        for group in self.groups:
            moves = self._directions(direction, group)
            if gradient is not None:
                along += [
                    torch.dot(gradient[self._slot[i]].reshape(-1), v.reshape(-1))
                    for i, v in zip(group, moves, strict=True)
                ]
            torch._foreach_add_([self.values[i] for i in group], moves, alpha=step)
        return float(torch.stack(along).double().sum()) if along else 0.0

    def _rest(self) -> None:
        """Put the copy back exactly where it rests: a cast of the model's own tensors."""
        torch._foreach_copy_([self.values[i] for i in self.trainable], [self.sources[i] for i in self.trainable])

    def _stencil(
        self, value_at: ValueAt, value: Tensor, gradient: list[Tensor], step: float
    ) -> tuple[Stencil, Directional]:
        """Central differences of ``value_at`` along every direction, and autograd's side of the comparison.

        The copy is moved to ``theta + step v`` and ``theta - step v`` in place, a group of parameters at a time,
        and put back exactly from the model's tensors. The displacements are the nominal ``+-step v``: the
        rounding of ``theta +- step v`` moves them by about ``eps |theta| / step`` relative (1e-12 in float64),
        far below any tolerance. They are kept as their length only (``d+ = d- = step |v|`` along one axis): the
        comparison reads nothing else of them once ``grad . v`` is taken.
        """
        k, dtype = len(self.signs), value.dtype
        along = torch.zeros(k, dtype=torch.float64)  # grad . v
        f_plus, f_minus = [], []
        with torch.no_grad():
            try:
                for d in range(k):
                    along[d] = self._move(d, step, gradient)
                    f_plus.append(value_at(self.values).detach())
                    self._rest()
                    self._move(d, -step)
                    f_minus.append(value_at(self.values).detach())
                    self._rest()
            finally:
                self._rest()
        # |step v|, and the typical size of grad . (2 step v) over random signs: sqrt(sum_i grad_i^2 v_i^2).
        length = step * sum(self.sources[i].numel() * self.sizes[i] ** 2 for i in self.trainable) ** 0.5
        spread = float(
            torch.stack(
                [
                    self.sizes[i] ** 2 * g.nan_to_num(0.0, 0.0, 0.0).double().pow(2).sum()
                    for i, g in zip(self.trainable, gradient, strict=True)
                ]
            ).sum()
        )
        autograd = Directional(
            predicted=(2 * step * along).to(dtype).reshape(1, k, 1),
            asymmetry=torch.zeros(1, k, 1, dtype=dtype),  # d+ = d-
            displacement=torch.full((1, k), 2 * length, dtype=dtype),
            typical=torch.full((1, k), 2 * step * spread**0.5, dtype=dtype).nan_to_num(nan=0.0),
        )
        half = torch.full((1, k, 1), length, dtype=dtype)
        stencil = Stencil(
            value.reshape(1, 1).to(dtype),
            torch.stack(f_plus).reshape(1, k, 1).to(dtype),
            torch.stack(f_minus).reshape(1, k, 1).to(dtype),
            half,
            half,
            torch.finfo(dtype).eps,
        )
        return stencil, autograd


def _signs(parameter: Tensor, generator: torch.Generator) -> Tensor:
    """Random signs, one bool per weight, on the parameter's device (drawn on the CPU generator)."""
    return torch.randint(0, 2, parameter.shape, generator=generator, dtype=torch.uint8).bool().to(parameter.device)
