"""Parameter gradients, checked on the whole model at once: what training consumes.

A wrong *weight* gradient (a hand-written linear, convolution or normalisation whose ``grad_input`` is right and
whose ``grad_weight`` is not) passes every input check. Here the function under test is

    ``s(theta) = sum_i u_i . selected outputs_i(theta)``,

a random combination ``u`` of the checked outputs of a few samples, as a function of every trainable parameter.
Its gradient comes from one float64 backward (the same code on a float64 copy of the parameters); it is compared
along random directions ``v`` in parameter space with float64 central differences of ``s`` (two forwards of those
samples per direction). First one direction is screened at the step where the stencil's own error bound is
tightest (``sqrt(eps)``): a clean pass there ends the check. Anything else goes to both directions at the default
step, by the rules of every other check: a clean check passes; anything else is checked again with step / 8,
where a failure must repeat with the same finite-difference derivative (and must not pass with step x 8 at a 4x
smaller error, checked only then). Only when this fails does localization check each submodule's own
parameters, to name the culprit.

Frozen parameters (``requires_grad=False``) get no direction; parameters shared between modules (tied embeddings)
are one parameter, whose gradient sums both uses.

Memory: a small model (up to 8M weights, 64 MiB in float64) is held twice more in float64 (where it rests and
where it is moved to, one flat tensor each), and its gradient; a big one never is. Its
parameters are :class:`~._cast.LazyCast` casts made op by op, moved by ``+- h v`` as each cast is made (an
embedding lookup casts and moves the rows it reads alone); its directions (random signs, sized by each parameter
tensor's own RMS) are drawn from per-parameter seeds, kept as a byte per sign up to 16M weights and drawn again
when needed beyond; and each parameter's gradient is reduced to ``grad . v`` as soon as autograd hands it over, then
dropped. The comparison needs nothing else (:class:`ParameterSpace`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ._cast import LazyCast, use_lazy_casts
from ._finite_differences import Comparison, Directional, Stencil, compare_directional
from ._functions import BatchFunction, ParameterFunction
from ._sharding import unsharded
from ._verdicts import Problem, central_derivative, consistent, default_rtol
from .report import ParameterCheck, Verdict

__all__ = ["ParameterSpace", "check_parameter_gradients"]

PARAMETER_SAMPLES = 2  # samples whose outputs carry the check: every weight is used by any sample
# Random directions in parameter space: one can miss a small block at the default step (4 of 600 weight bugs
# measured; none with the screen at sqrt(eps), which still checks one direction only where it passes).
PARAMETER_DIRECTIONS = 2
_CHUNK = 1 << 20  # weights moved or reduced by one call: 8 MiB of float64 at a time
_KEPT_DIRECTION_BYTES = 16 << 20  # directions kept whole up to this size (a model of up to 1M weights)
_KEPT_SIGN_BYTES = 32 << 20  # a mid-sized model's signs kept as drawn, a byte each (up to 16M weights)
# A failure stands this many times farther from D(h/8) than D(h) and D(h/8) are from each other.
_NOISE_SPREAD = 4.0
# A failure must stand with the step grown this much too: at small steps a float64 function computed through
# cancellation (1 - tanh(z)^2 at a saturated unit) moves by few units in the last place, and two stencils there can
# agree on a biased derivative that a grown step resolves (measured: 0.15% off at h and h/8, 0.007% at 8h). It is
# dismissed only where the grown step's error is this many times smaller than the finer step's: a wrong gradient's
# error stays the same at every step (measured: 2.9e-4 at h/8, h and 8h, on a layer norm's affine weight x1.1,
# where the grown step's looser bound alone would have passed it).
_GROWN_STEP = 8.0
_RESOLVED_BY_GROWING = 4.0
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

    space = ParameterSpace(parameters, ref, generator, PARAMETER_DIRECTIONS)

    def judge(model_at: BatchFunction) -> tuple[Verdict, float, float]:
        def value_at(_: Sequence[Tensor]) -> Tensor:  # (at space.values, held in place: moved, never replaced)
            return (problem.selection(model_at(xs), ixs).to(ref) * combination).sum()

        return space.judge(value_at, rtol=default_rtol(ref), floor=_FLOOR, screen=True)

    verdict, margin, relative_error = parameters.held(space.values, judge)
    trainable = space.trainable_count
    return ParameterCheck(verdict, margin, relative_error, trainable, space.count - trainable)


class ParameterSpace:
    """A model's parameters as one point to differentiate at and to step away from, without copies of the model.

    Holds the parameters in ``dtype`` (``values``: views of one flat tensor for a small model, plain copies for a
    mid-sized one, :class:`~._cast.LazyCast` casts made op by op for a big or sharded one) and ``n_directions``
    random sign directions over the trainable ones (a small model's drawn at once and kept as one matrix, so that
    ``theta + step v`` is placed with one call; a big one's drawn from per-parameter seeds again when needed, a
    chunk at a time: then nothing the size of the model is stored). On each parameter
    tensor a direction has the size of that tensor's own RMS (at least 1, as an input's step is sized by the
    input), so that a layer of large weights does not set the step of a layer of small ones. :meth:`judge`
    compares autograd's directional derivative of a scalar function of the parameters with central differences
    along those directions.

    Args:
        function: The model as a function of its parameters (its tensors are never written).
        dtype: The dtype of the values (the reference dtype: float64).
        generator: Draws the directions (or their seeds).
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
        self.trainable = [i for i, t in enumerate(function.trainable) if t]
        self.count = sum(p.numel() for p in self.sources)
        self.trainable_count = sum(self.sources[i].numel() for i in self.trainable)
        self.sharded = function.sharded
        self.lazy = function.sharded or use_lazy_casts(self.sources, dtype)
        # A small model's directions are kept, drawn at once, as one (directions, weights) matrix: the gradient is
        # reduced with one product. Its values are then views of one flat tensor, placed at theta + step v with one
        # call. A big one's directions are drawn again from per-parameter seeds each time they are needed, a chunk
        # at a time.
        small = n_directions * self.trainable_count * torch.finfo(dtype).bits // 8 <= _KEPT_DIRECTION_BYTES
        small &= len({p.device for p in self.sources}) <= 1
        self._at_rest: Tensor | None = None  # a small model's values where they rest, flat: trainable ones first
        self._flat: Tensor | None = None
        if small and not self.lazy:
            frozen = [i for i, t in enumerate(function.trainable) if not t]
            order = self.trainable + frozen
            device = self.sources[0].device if self.sources else torch.device("cpu")
            self._at_rest = torch.empty(self.count, dtype=dtype, device=device)
            torch._foreach_copy_(_views(self._at_rest, self.sources, order), [p.detach() for p in self.sources])
            self._flat = self._at_rest.clone()
            self.values = _views(self._flat, self.sources, order)
        else:
            self.values = [LazyCast(p, dtype) if self.lazy else p.to(dtype, copy=True) for p in self.sources]
        with torch.no_grad():  # per parameter: the size of its direction's entries
            squares = self._squares()
        self.norm = sum(squares) ** 0.5  # |theta|, every parameter
        trainable_squares = sum(squares[i] for i in self.trainable)
        overall = max(1.0, (trainable_squares / max(self.trainable_count, 1)) ** 0.5)
        self.sizes = {
            i: max(1.0, (squares[i] / max(self.sources[i].numel(), 1)) ** 0.5) if per_tensor else overall
            for i in self.trainable
        }
        self._kept: Tensor | None = None
        self._offsets: dict[int, int] = {}
        self.seeds: list[list[int]] = []
        self._signs: dict[tuple[int, int], Tensor] = {}  # a mid-sized model's signs, drawn once
        self._keep_signs = not small and n_directions * self.trainable_count <= _KEPT_SIGN_BYTES
        # Rows PyTorch gives no gradient on purpose (an embedding's padding row) are never moved.
        self.fixed_rows: dict[int, list[int]] = {}
        for i, row in function.fixed_rows:
            if i in self.sizes:
                self.fixed_rows.setdefault(i, []).append(row)
        if small:
            self._kept = self._draw_kept(generator, n_directions, dtype)
        else:
            self.seeds = torch.randint(1 << 62, (n_directions, len(self.sources)), generator=generator).tolist()

    def _squares(self) -> list[float]:
        """``|theta_i|^2`` per parameter, sizing the directions.

        Norms in the parameter's own dtype (no float64 copy of a big weight; one call for an unsharded model's), in
        float64 where that overflows.
        """
        if self.sharded:  # (each gathered whole in its turn)
            norms = [torch._foreach_norm([unsharded(p).detach()])[0] for p in self.sources]
        else:
            norms = list(torch._foreach_norm([p.detach() for p in self.sources])) if self.sources else []
        squares = [float(n) ** 2 for n in torch.stack([n.double().cpu() for n in norms]).tolist()] if norms else []
        for i, square in enumerate(squares):
            if not math.isfinite(square):
                whole = unsharded(self.sources[i]).detach()
                squares[i] = float(torch.linalg.vector_norm(whole, dtype=torch.float64)) ** 2
        return squares

    def _draw_kept(self, generator: torch.Generator, n_directions: int, dtype: torch.dtype) -> Tensor:
        """Every direction over every trainable weight, ``(directions, weights)``, from one draw of random bytes."""
        offset, sizes, counts = 0, [], []
        for i in self.trainable:
            self._offsets[i], offset = offset, offset + self.sources[i].numel()
            sizes.append(self.sizes[i])
            counts.append(self.sources[i].numel())
        packed = torch.randint(0, 256, (n_directions, (offset + 7) // 8), generator=generator, dtype=torch.uint8)
        device = self.sources[self.trainable[0]].device if self.trainable else torch.device("cpu")
        kept = _unpack(packed.to(device))[:, :offset].to(dtype).mul_(2).sub_(1)  # +-1 (elementwise passes: cheap)
        for row in kept if counts else ():
            torch._foreach_mul_(list(row.split(counts)), sizes)
        for i, rows in self.fixed_rows.items():  # (a view per parameter, its fixed rows zeroed)
            shape = (n_directions, *self.sources[i].shape)
            kept[:, self._offsets[i] : self._offsets[i] + self.sources[i].numel()].view(shape)[:, rows] = 0
        return kept

    @property
    def n_directions(self) -> int:
        """How many directions."""
        return len(self.seeds) if self._kept is None else self._kept.shape[0]

    def signs(self, direction: int, i: int) -> Tensor:
        """Direction ``direction``'s signs on parameter ``i``, flat (``True``: ``+``).

        A small model's are read from its kept directions; a big model's are drawn from their own seed, as random
        bytes of eight signs each (4x faster than a draw per sign): kept once drawn where all of them fit
        ``_KEPT_SIGN_BYTES`` (a byte per sign), else drawn afresh each time.
        """
        if self._kept is not None:
            return self.direction(direction, i, self._kept.dtype).reshape(-1) > 0
        kept = self._signs.get((direction, i))
        if kept is not None:
            return kept
        source = self.sources[i]
        draw = torch.Generator(device=source.device).manual_seed(self.seeds[direction][i])
        n = source.numel()
        packed = torch.randint(0, 256, ((n + 7) // 8,), generator=draw, dtype=torch.uint8, device=source.device)
        signs = _unpack(packed)[:n]
        if self._keep_signs:  # every move and reduction reads them again
            self._signs[(direction, i)] = signs
        return signs

    def _drawn(self, direction: int, i: int, dtype: torch.dtype) -> Tensor:
        source = self.sources[i]
        positive = torch.full((), self.sizes[i], dtype=dtype, device=source.device)
        return torch.where(self.signs(direction, i).reshape(source.shape), positive, -positive)

    def direction(self, direction: int, i: int, dtype: torch.dtype) -> Tensor:
        """Direction ``direction`` on parameter ``i``, whole: ``+-`` the parameter's size (kept for a small model)."""
        if self._kept is None:
            return self._drawn(direction, i, dtype)
        start = self._offsets[i]
        return self._kept[direction, start : start + self.sources[i].numel()].view(self.sources[i].shape)

    def reduce(self, i: int, gradient: Tensor) -> tuple[Tensor, Tensor]:
        """``gradient . v`` on parameter ``i`` per direction, and ``|gradient|^2`` (non-finite entries as 0).

        In float64. A big model's a chunk at a time: nothing the parameter's size is made but the signs (a byte per
        weight).
        """
        signs = [self.signs(d, i).to(gradient.device) for d in range(self.n_directions)]
        flat = gradient.reshape(-1)
        along = torch.zeros(self.n_directions, dtype=torch.float64, device=gradient.device)
        square = torch.zeros((), dtype=torch.float64, device=gradient.device)
        for start in range(0, flat.numel(), _CHUNK):
            chunk = flat[start : start + _CHUNK].double()
            total = chunk.sum()
            for d, sign in enumerate(signs):  # the + entries twice, less all of them: two passes, not four
                along[d] += 2 * torch.dot(chunk, sign[start : start + _CHUNK].to(chunk.dtype)) - total
            chunk_square = torch.dot(chunk, chunk)
            square += chunk_square if bool(chunk_square.isfinite()) else chunk.nan_to_num(0.0, 0.0, 0.0).pow(2).sum()
        return along * self.sizes[i], square

    def displace_(self, value: Tensor, direction: int, i: int, step: float) -> Tensor:
        """``value += step v`` on parameter ``i``, in place (a big model's a chunk at a time)."""
        if self._kept is not None:
            return value.add_(self.direction(direction, i, value.dtype), alpha=step)
        if not value.is_contiguous():  # (channels_last weights): the signs run in the parameter's logical order
            return value.copy_(self.displace_(value.contiguous(), direction, i, step))
        rows = self.fixed_rows.get(i)
        resting = value[rows].clone() if rows else None  # (moved from where it rests: these rows stay there)
        signs, flat = self.signs(direction, i).to(value.device), value.view(-1)
        for start in range(0, flat.numel(), _CHUNK):
            flat[start : start + _CHUNK].add_(
                _plus_minus_one(signs[start : start + _CHUNK], value.dtype), alpha=step * self.sizes[i]
            )
        if resting is not None:
            value[rows] = resting
        return value

    def displace_rows_(self, value: Tensor, direction: int, i: int, step: float, index: Tensor) -> Tensor:
        """:meth:`displace_` of rows ``index`` of 2-D parameter ``i`` alone, ``value`` being those rows, in place."""
        source = self.sources[i]
        signs = self.signs(direction, i).to(value.device).view(source.shape).index_select(0, index.to(value.device))
        delta = _plus_minus_one(signs, value.dtype)
        rows = self.fixed_rows.get(i)
        if rows:  # (rows that rest where they are, wherever the lookup reads them)
            delta.mul_(~torch.isin(index, torch.tensor(rows, device=index.device)).unsqueeze(1).to(device=value.device))
        return value.add_(delta, alpha=step * self.sizes[i])

    def gradient(self, value_at: ValueAt) -> tuple[Tensor, Tensor, float]:
        """``value_at(values)``, autograd's ``grad . v`` per direction, and ``sum_i size_i^2 |grad_i|^2``.

        Of the gradient only these are kept, what the comparison reads: each parameter's gradient is reduced as
        soon as autograd has it, and dropped (a hook after accumulation), so a gradient of the whole model is
        never held.
        """
        if self._kept is not None:
            return self._kept_gradient(value_at)
        along = torch.zeros(self.n_directions, dtype=torch.float64)
        spread = torch.zeros((), dtype=torch.float64)
        leaves = [self.values[i].requires_grad_(True) for i in self.trainable]

        def reduce(i: int) -> Callable[[Tensor], None]:
            def hook(leaf: Tensor) -> None:
                grad = leaf.grad
                leaf.grad = None
                if grad is None:
                    return
                moved, square = self.reduce(i, grad.detach())
                along.add_(moved.cpu())
                spread.add_(self.sizes[i] ** 2 * square.cpu())

            return hook

        handles = [
            leaf.register_post_accumulate_grad_hook(reduce(i)) for i, leaf in zip(self.trainable, leaves, strict=True)
        ]
        try:
            value = value_at(self.values)
            if value.requires_grad:
                torch.autograd.backward(value, inputs=leaves)
            return value.detach(), along, float(spread)
        finally:
            for handle in handles:
                handle.remove()
            for leaf in leaves:
                leaf.grad = None
                leaf.requires_grad_(False)

    def _kept_gradient(self, value_at: ValueAt) -> tuple[Tensor, Tensor, float]:
        """:meth:`gradient` of a small model: the whole gradient at once, reduced with one product."""
        assert self._kept is not None
        leaves = [self.values[i].requires_grad_(True) for i in self.trainable]
        try:
            value = value_at(self.values)
            if not value.requires_grad:
                return value.detach(), torch.zeros(self.n_directions, dtype=torch.float64), 0.0
            grads = [g.detach() for g in torch.autograd.grad(value, leaves, allow_unused=True, materialize_grads=True)]
        finally:
            for leaf in leaves:
                leaf.requires_grad_(False)
        along = (self._kept @ torch.cat([g.reshape(-1) for g in grads]).to(self._kept.dtype)).double().cpu()
        norms = torch.stack(torch._foreach_norm(grads)).double()
        if not bool(norms.isfinite().all()):  # (non-finite entries count as 0)
            norms = torch.stack([g.nan_to_num(0.0, 0.0, 0.0).double().norm() for g in grads])
        sizes = torch.tensor([self.sizes[i] for i in self.trainable], dtype=torch.float64, device=norms.device)
        return value.detach(), along, float((norms.pow(2) * sizes.pow(2)).sum())

    def judge(
        self, value_at: ValueAt, *, rtol: float, floor: float, screen: bool = False
    ) -> tuple[Verdict, float, float]:
        """Autograd's ``grad . v`` against central differences of ``value_at`` along each direction.

        A clean first check passes; anything else is checked again with step / 8, where a failure must repeat
        with the same finite-difference derivative (``D(h) = D(h/8)``), farther from it than the two differences
        are from each other (see :func:`_beyond_their_spread`), and must not pass with step x 8 with an error at
        least 4x smaller (what a derivative biased by cancellation does; a wrong gradient's error stays). Returns the
        verdict, the worst margin of the deciding checks, and the worst relative error.

        With ``screen``, a pass can come first from the first direction alone, at step ``sqrt(eps)`` instead of
        ``eps^(1/3)``: two forwards instead of four. A stencil's bound on its own error is its second difference
        (``h^2 |v'Hv|``, what a kink inside it shows) plus round-off (``eps |f|``); against the measured ``2 h |g.v|``
        the two balance at ``h ~ sqrt(eps)``, where the bound is tightest: a wrong weight gradient that the
        default step's curvature hides (a layer norm's affine weight x1.1: an error of 2.7e-5 of ``g.v``, where
        4.4e-5 is allowed) stands out there. Only a clean pass ends the check early: anything else (a wrong
        gradient, round-off a cancelling function makes larger than ``eps |f|``) goes on to the checks above, which
        alone can fail.
        """
        value, along, spread = self.gradient(value_at)
        dtype = value.dtype
        gain = (value.abs().double() / max(self.norm, self.count**0.5)).reshape(1)
        step = torch.finfo(dtype).eps ** (1 / 3)  # default_step's, on directions sized by each parameter

        def check(size: float, directions: int | None = None) -> tuple[Stencil, Comparison]:
            stencil, autograd = self._stencil(value_at, value, along, spread, size, directions)
            return stencil, compare_directional(autograd, stencil, rtol, gain=gain, floor=floor)

        if screen:  # one direction, where the stencil's bound is tightest: only a clean pass ends the check here
            _, screened = check(torch.finfo(dtype).eps ** 0.5, 1)
            if bool((screened.passed & screened.reliable & screened.resolved).all()):
                return Verdict.PASS, float(screened.margin.max()), float(screened.relative_error.max())
        stencil, first = check(step)
        clean = first.passed & first.reliable & first.resolved
        if bool(clean.all()):
            return Verdict.PASS, float(first.margin.max()), float(first.relative_error.max())
        finer_stencil, finer = check(step / 8)
        same = consistent(stencil, finer_stencil)
        failed = (first.reliable & ~first.passed) & (finer.reliable & ~finer.passed) & same
        failed &= _beyond_their_spread(stencil, finer_stencil, finer)
        if bool(failed.any()):  # (only then: four more forwards) a failure must not vanish with a grown step
            _, grown = check(step * _GROWN_STEP)
            resolved = grown.relative_error * _RESOLVED_BY_GROWING < finer.relative_error
            failed &= ~(grown.passed & grown.reliable & resolved)
        judged = clean | (finer.passed & finer.reliable & finer.resolved)
        margin = float(torch.where(clean, first.margin, finer.margin).max())
        relative_error = float(torch.where(clean, first.relative_error, finer.relative_error).max())
        if bool(failed.any()):
            return Verdict.FAIL, margin, relative_error
        return (Verdict.PASS if bool(judged.all()) else Verdict.INCONCLUSIVE), margin, relative_error

    def _place(self, direction: int, step: float) -> None:
        """Put the values at ``theta + step v`` along ``direction``: exactly, from where they rest."""
        if self._flat is not None and self._kept is not None:  # one call for every parameter
            n = self._kept.shape[1]
            assert self._at_rest is not None
            torch.add(self._at_rest[:n], self._kept[direction], alpha=step, out=self._flat[:n])
            return
        self._rest()
        for i in self.trainable:
            value = self.values[i]
            if isinstance(value, LazyCast):  # moved as each cast is made
                value.shift = _Shift(self, direction, i, step)
            else:
                self.displace_(value, direction, i, step)

    def _rest(self) -> None:
        """Put the values back exactly where they rest: casts of the model's own tensors."""
        if self._flat is not None:
            assert self._at_rest is not None
            self._flat.copy_(self._at_rest)
        elif self.lazy:
            for i in self.trainable:
                cast = self.values[i]
                assert isinstance(cast, LazyCast)
                cast.shift, cast._held = None, None  # (a value the forward wrote into is dropped too)
        else:
            torch._foreach_copy_([self.values[i] for i in self.trainable], [self.sources[i] for i in self.trainable])

    def _stencil(
        self, value_at: ValueAt, value: Tensor, along: Tensor, spread: float, step: float, directions: int | None = None
    ) -> tuple[Stencil, Directional]:
        """Central differences of ``value_at`` along every direction, and autograd's side of the comparison.

        The values are moved to ``theta + step v`` and ``theta - step v`` (in place, or as each lazy cast is made),
        and put back exactly from the model's tensors. The displacements
        are the nominal ``+-step v``: the rounding of ``theta +- step v`` moves them by about
        ``eps |theta| / step`` relative (1e-12 in float64), far below any tolerance. They are kept as their
        length only (``d+ = d- = step |v|`` along one axis): the comparison reads nothing else of them once
        ``grad . v`` is taken.
        """
        k, dtype = directions or self.n_directions, value.dtype
        along = along[:k]
        f_plus, f_minus = [], []
        with torch.no_grad():
            try:
                for d in range(k):
                    self._place(d, step)
                    f_plus.append(value_at(self.values).detach())
                    self._place(d, -step)
                    f_minus.append(value_at(self.values).detach())
            finally:
                self._rest()
        # |step v|, and the typical size of grad . (2 step v) over random signs: sqrt(sum_i grad_i^2 v_i^2).
        length = step * sum(self.sources[i].numel() * self.sizes[i] ** 2 for i in self.trainable) ** 0.5
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


def _beyond_their_spread(coarse: Stencil, fine: Stencil, comparison: Comparison) -> Tensor:
    """Whether autograd is farther from ``D(h/8)`` than ``_NOISE_SPREAD`` times ``|D(h) - D(h/8)|``, ``(1, k)``.

    A function computed through cancellation (``1 - tanh(z)^2`` at a saturated unit) carries noise far above
    ``eps |f|``, which a stencil's second difference may show small by chance; two stencils' derivatives then
    differ by about that noise. A failure must stand out of it (a wrong gradient does, by its whole error).
    """
    (a, _), (b, length) = central_derivative(coarse), central_derivative(fine)
    spread = (a - b).norm(dim=-1) * length
    return comparison.relative_error * comparison.scale > _NOISE_SPREAD * spread


def _unpack(packed: Tensor) -> Tensor:
    """Random bytes as eight signs each, along their last dimension (``True``: ``+``)."""
    bits = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> bits) & 1).flatten(-2).view(torch.bool)


def _views(flat: Tensor, sources: Sequence[Tensor], order: Sequence[int]) -> list[Tensor]:
    """One view of ``flat`` per source, in the sources' order, laid out in ``flat`` in ``order``."""
    views: list[Tensor] = [flat] * len(sources)
    start = 0
    for i in order:
        views[i] = flat[start : start + sources[i].numel()].view(sources[i].shape)
        start += sources[i].numel()
    return views


def _plus_minus_one(signs: Tensor, dtype: torch.dtype) -> Tensor:
    """``+1`` where ``signs`` is true, ``-1`` elsewhere (exact: a move by it is ``value +- step``, one rounding)."""
    return signs.to(dtype).mul_(2).sub_(1)


class _Shift:
    """A lazy cast's move: ``value + step v`` on parameter ``i`` along direction ``direction``."""

    def __init__(self, space: ParameterSpace, direction: int, i: int, step: float) -> None:
        self.space, self.direction, self.i, self.step = space, direction, i, step

    def __call__(self, value: Tensor) -> Tensor:
        return self.space.displace_(value, self.direction, self.i, self.step)  # a fresh cast: written in place

    def rows(self, value: Tensor, index: Tensor) -> Tensor:
        """The move of rows ``index`` of the parameter alone, ``value`` being those rows (an embedding lookup's)."""
        return self.space.displace_rows_(value, self.direction, self.i, self.step, index)
