"""Say where, not only that: check each submodule on its own, and parameter gradients too.

When a sample fails, the inputs every submodule sees on that sample are recorded (forward pre-hooks),
then each submodule is probed on its own as a function of its (first floating) input, with the same
finite-difference machinery as :func:`~lightning_gradprobe.probe` (handed in as ``check``, so that this
module does not import the probe that calls it). The deepest submodules are checked first, within a
module and a time budget. Parameter gradients are checked per submodule against central differences
along random directions in the space of its own parameters, in float64.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._finite_differences import Stencil, compare
from ._isolation import isolated
from ._layers import first_floating
from ._notes import describe_error
from ._sharding import unsharded
from .report import Culprit, CulpritKind, ProbeReport, Verdict

__all__ = ["Check", "Culprit", "CulpritKind", "Localization", "check_parameters", "localize"]

Check = Callable[..., ProbeReport]
"""The check localization runs on each submodule: :func:`~lightning_gradprobe.probe`'s signature."""


@dataclass(frozen=True)
class Localization:
    """The result of checking submodules one by one."""

    culprits: tuple[Culprit, ...]
    checked: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    cut_short: str | None = None


Slot = int | str
"""Where a submodule's differentiated input sits in its call: a position, or a keyword."""


class _Call(nn.Module):
    """A submodule as a function of one of its recorded inputs (the others held fixed)."""

    def __init__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], slot: Slot | None) -> None:
        super().__init__()
        self.module = module
        self._args = args
        self._kwargs = kwargs
        self._slot = slot

    def forward(self, x: Tensor | None = None) -> Tensor:
        """The submodule's output with ``x`` at the slot (``None``: the recorded inputs as they are)."""
        dtype = x if x is not None else next((p for p in self.module.parameters() if p.is_floating_point()), None)
        args = [_like(a, dtype) for a in self._args]
        kwargs = {k: _like(v, dtype) for k, v in self._kwargs.items()}
        if isinstance(self._slot, int):
            args[self._slot] = x
        elif isinstance(self._slot, str):
            kwargs[self._slot] = x
        return first_floating(self.module(*args, **kwargs))


def floating_slot(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Slot | None:
    """The first floating tensor input of a recorded call: positional first, then keyword (``model(**inputs)``)."""
    slots: list[tuple[Slot, Any]] = [*enumerate(args), *kwargs.items()]
    return next((slot for slot, value in slots if isinstance(value, Tensor) and value.is_floating_point()), None)


def _input_at(args: tuple[Any, ...], kwargs: dict[str, Any], slot: Slot) -> Tensor:
    value = args[slot] if isinstance(slot, int) else kwargs[slot]
    if not isinstance(value, Tensor):
        raise TypeError(f"localize: the input at {slot!r} is a {type(value).__name__}, not a tensor.")
    return value


def _like(value: Any, x: Tensor | None) -> Any:
    if x is not None and isinstance(value, Tensor) and value.is_floating_point():
        return value.to(x.dtype)
    return value


def record_inputs(model: nn.Module, sample: Tensor, forward: Callable[[Any, Tensor], Any] | None) -> dict[str, Any]:
    """The positional and keyword inputs each submodule receives on ``sample`` (first call only)."""
    seen: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name not in seen:
                seen[name] = (
                    tuple(a.detach().clone() if isinstance(a, Tensor) else a for a in args),
                    {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in kwargs.items()},
                )

        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(hook_for(name), with_kwargs=True))
    try:
        with torch.no_grad():
            model(sample) if forward is None else forward(model, sample)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def localize(
    model: nn.Module,
    sample: Tensor,
    *,
    check: Check,
    forward: Callable[[Any, Tensor], Any] | None = None,
    n_directions: int = 4,
    seed: int = 0,
    max_modules: int = 64,
    time_budget: float = 30.0,
    parameters: bool = False,
    second_order: bool = False,
    skip: frozenset[str] = frozenset(),
) -> Localization:
    """Check every submodule of ``model`` on its own, on one sample, deepest first.

    Args:
        model: The model (an ``nn.Module``).
        sample: One sample with its batch dimension, ``(1, ...)``.
        check: The check run on each submodule, :func:`~lightning_gradprobe.probe`.
        forward: ``forward(model, x)`` if ``model(x)`` is not how to run it.
        n_directions: Finite-difference directions per submodule check.
        seed: Seed of the probes' own generators.
        max_modules: Most submodules checked.
        time_budget: Seconds the whole localization may take.
        parameters: Also check each submodule's gradient with respect to its own parameters.
        second_order: Check each submodule's double backward through its input instead of its first order.
        skip: Submodules not to check (exempt ones, and the containers that hold them).

    Returns:
        A :class:`Localization`: culprits deepest first (a container after the children that explain it).

    """
    started = time.perf_counter()
    failing: dict[tuple[str, CulpritKind], float] = {}
    findings: dict[str, str] = {}
    checked: list[str] = []
    skipped: dict[str, str] = {}
    cut_short = None
    modules = dict(model.named_modules())
    with isolated(model, sample.device):  # grad on, eval mode, RNGs restored: also under Lightning's no_grad
        recorded = record_inputs(model, sample.detach().clone(), forward)
        names = sorted((n for n in recorded if n not in skip), key=lambda n: (-_depth(n), n))
        for count, name in enumerate(names):
            if count >= max_modules:
                cut_short = f"module budget reached: checked {max_modules} of {len(names)} submodules"
                break
            if time.perf_counter() - started > time_budget:
                cut_short = f"time budget of {time_budget:.0f}s reached: checked {len(checked)} of {len(names)}"
                break
            module = modules[name]
            args, kwargs = recorded[name]
            slot = floating_slot(args, kwargs)
            if slot is None:  # (an embedding of token ids): only its own parameters can be checked
                if not parameters or not _has_own_parameters(module):
                    skipped[name] = "no floating tensor input"
                    continue
                checked.append(name)
            else:
                report = _check_alone(check, module, args, kwargs, slot, n_directions, seed, second_order)
                if isinstance(report, str):
                    skipped[name] = report
                    continue
                checked.append(name)
                failing.update(_failures(name, report, second_order, findings))
            if parameters:
                try:
                    weight_error = check_parameters(module, args, kwargs, slot, n_directions=n_directions, seed=seed)
                except Exception as problem:  # e.g. parameters tied in a parent: not judged, but said
                    skipped[f"{name} (parameters)"] = f"{describe_error(problem)}"
                    continue
                if weight_error is not None:
                    failing[(name, CulpritKind.PARAMETER)] = weight_error
    return Localization(_culprits(failing, modules, findings), tuple(checked), skipped, cut_short)


def _has_own_parameters(module: nn.Module) -> bool:
    return any(p.is_floating_point() for p in module.parameters(recurse=False))


def _check_alone(
    check: Check,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    slot: Slot,
    n_directions: int,
    seed: int,
    second_order: bool,
) -> ProbeReport | str:
    """The submodule probed on its own as a function of its input at ``slot``, or why it could not be."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return check(
                _Call(module, args, kwargs, slot),
                _input_at(args, kwargs, slot),
                target=None,
                n_directions=n_directions,
                seed=seed,
                check_batch=False,
                check_parameters=False,  # each submodule's own parameters are checked on their own
                second_order=second_order,
            )
    except Exception as error:  # a submodule that cannot be probed alone is skipped, with its reason
        return f"{describe_error(error)}"


def _failures(
    name: str, report: ProbeReport, second_order: bool, findings: dict[str, str]
) -> dict[tuple[str, CulpritKind], float]:
    """What a submodule's own check found (its findings noted in ``findings``)."""
    if second_order:
        if report.second_order is not None and not report.second_order.ok:
            if report.second_order.finding:
                findings[name] = report.second_order.finding
            return {(name, CulpritKind.SECOND_ORDER): _worst(report.second_order.relative_error)}
    elif Verdict.FAIL in report.verdicts:
        return {(name, CulpritKind.INPUT): _worst(report.relative_error)}
    return {}


def _culprits(
    failing: dict[tuple[str, CulpritKind], float], modules: dict[str, nn.Module], findings: dict[str, str]
) -> tuple[Culprit, ...]:
    """Culprits deepest first; a container's input or double-backward failure is explained by its descendants'."""
    out = []
    for (name, kind), error in failing.items():
        same_kind = [other for other, other_kind in failing if other_kind is kind and kind is not CulpritKind.PARAMETER]
        children = tuple(o for o in same_kind if o != name and (name == "" or o.startswith(name + ".")))
        culprit = Culprit(
            _shown(name), _type_name(modules[name]), kind, error, Verdict.FAIL, tuple(map(_shown, children)),
            findings.get(name),
        )  # fmt: skip
        out.append(culprit)
    out.sort(key=lambda c: (len(c.explained_by) > 0, -_depth(c.module), c.module, c.kind.value))
    return tuple(out)


def _shown(name: str) -> str:
    """A submodule's name as the user wrote the model: without ``torch.compile``'s ``_orig_mod`` wrapper."""
    return name.replace("_orig_mod.", "").replace("._orig_mod", "").removesuffix("_orig_mod")


def _type_name(module: nn.Module) -> str:
    """A submodule's class as the user wrote it: FSDP2's ``fully_shard`` makes ``Block`` an ``FSDPBlock``."""
    kind = type(module)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a build without torch.distributed
        return kind.__name__
    if isinstance(module, FSDPModule):  # (FSDPBlock, FSDPModule, Block, ...)
        return next((k.__name__ for k in kind.__mro__[1:] if not issubclass(k, FSDPModule)), kind.__name__)
    return kind.__name__


def _worst(relative_error: Tensor) -> float:
    return float(relative_error.nan_to_num(0).max()) if relative_error.numel() else float("nan")


def _depth(name: str) -> int:
    return 0 if name == "" else name.count(".") + 1


def check_parameters(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    slot: Slot | None,
    *,
    n_directions: int = 4,
    seed: int = 0,
) -> float | None:
    """Check ``module``'s gradient with respect to its *own* parameters (not its children's), in float64.

    Compares ``u^T J_theta v`` (reverse mode, a few random output projections ``u``) with central
    differences along random parameter directions ``v``, using the same error bound and retry-free
    comparison as the input check.

    Returns:
        The worst relative error if the check fails, else ``None`` (also when there is nothing to check).

    """
    own = {n: p for n, p in module.named_parameters(recurse=False) if p.is_floating_point()}
    if not own:
        return None
    generator = torch.Generator().manual_seed(seed)
    tensors = {  # (a sharded module's tensors gathered whole, one at a time)
        n: unsharded(t).to(torch.float64) for n, t in module.state_dict(keep_vars=True).items() if t.is_floating_point()
    }
    names = list(own)
    theta = torch.cat([tensors[n].flatten() for n in names])
    inputs = () if slot is None else (_input_at(args, kwargs, slot).detach().to(torch.float64),)
    call = _Call(module, args, kwargs, slot)

    def evaluate(flat: Tensor) -> Tensor:
        pieces, offset = {}, 0
        for n in names:
            size = tensors[n].numel()
            pieces["module." + n] = flat[offset : offset + size].view_as(tensors[n])
            offset += size
        merged = {"module." + k: v for k, v in tensors.items()} | pieces
        return functional_call(call, merged, inputs, tie_weights=False).reshape(-1)

    with torch.no_grad():
        f0 = evaluate(theta)
    n_out = f0.numel()
    projections = torch.randn((n_out, n_directions), generator=generator, dtype=torch.float64) / n_out**0.5
    projections = projections.to(theta.device)
    leaf = theta.clone().requires_grad_(True)
    projected = evaluate(leaf) @ projections
    rows = torch.stack(
        [
            torch.autograd.grad(projected[j], leaf, retain_graph=True, allow_unused=True, materialize_grads=True)[0]
            for j in range(n_directions)
        ]
    )  # (q, P): u_j^T J_theta
    directions = torch.randn((n_directions, theta.numel()), generator=generator, dtype=torch.float64).to(theta.device)
    directions /= directions.pow(2).mean(1, keepdim=True).sqrt()
    step = torch.finfo(torch.float64).eps ** (1 / 3) * max(1.0, float(theta.pow(2).mean().sqrt()))
    with torch.no_grad():
        plus = torch.stack([evaluate(theta + step * v) @ projections for v in directions])
        minus = torch.stack([evaluate(theta - step * v) @ projections for v in directions])
    d_plus = (theta + step * directions) - theta
    d_minus = theta - (theta - step * directions)
    stencil = Stencil(
        (f0 @ projections)[None],
        plus[None],
        minus[None],
        d_plus[None],
        d_minus[None],
        torch.finfo(torch.float64).eps,
    )
    result = compare(rows[None], stencil, rtol=1e-6)
    failed = result.reliable & ~result.passed
    if bool(failed.any()):
        return float(result.relative_error[failed].max())
    return None
