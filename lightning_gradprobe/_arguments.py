"""``GradProbe``'s arguments, checked at construction: each error names the argument, the value and the fix."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["check_arguments"]

_FLAGS = (
    "redraw",
    "check_finite",
    "check_leakage",
    "on_test",
    "localize",
    "check_parameters",
    "second_order",
    "strict",
    "log_images",
    "shared_scale",
    "verbose",
)
_CALLABLES = ("forward", "tokens")
_ON_ALERT = ("warn", "stop", "raise")
_TARGETS = ("argmax", "label")


def check_arguments(arguments: Mapping[str, Any]) -> None:
    """Raise ``TypeError``/``ValueError`` for the first argument of ``GradProbe`` that cannot work.

    Example:
        >>> check_arguments({"seed": "abc"})
        Traceback (most recent call last):
        ...
        TypeError: GradProbe: `seed` must be an int (the seed of the callback's own generator), got 'abc'.

    """
    for name in ("num_samples", "n_directions"):
        if name in arguments:
            _positive_int(name, arguments[name])
    for name in ("every_n_epochs", "every_n_train_steps"):
        if arguments.get(name) is not None:
            _positive_int(name, arguments[name])
    every_n_epochs, every_n_train_steps = arguments.get("every_n_epochs"), arguments.get("every_n_train_steps")
    if every_n_epochs not in (None, 1) and every_n_train_steps is not None:
        raise ValueError(
            f"GradProbe: `every_n_epochs`={every_n_epochs} and `every_n_train_steps`={every_n_train_steps} are "
            "mutually exclusive; set one of them."
        )
    if "seed" in arguments and (isinstance(arguments["seed"], bool) or not isinstance(arguments["seed"], int)):
        raise TypeError(
            f"GradProbe: `seed` must be an int (the seed of the callback's own generator), got {arguments['seed']!r}."
        )
    _check_target(arguments.get("target", "argmax"))
    _check_choices(arguments)
    _check_numbers(arguments)
    for name in _FLAGS:
        if name in arguments and not isinstance(arguments[name], bool):
            raise TypeError(f"GradProbe: `{name}` must be True or False, got {arguments[name]!r}.")
    for name in _CALLABLES:
        if arguments.get(name) is not None and not callable(arguments[name]):
            raise TypeError(f"GradProbe: `{name}` must be a callable or None, got {arguments[name]!r}.")
    names = arguments.get("feature_names")
    if names is not None and (isinstance(names, str) or not all(isinstance(n, str) for n in names)):
        raise TypeError(
            f"GradProbe: `feature_names` must be a list of str (one per tabular feature) or None, got {names!r}."
        )


def _check_target(target: Any) -> None:
    if isinstance(target, str) and target not in _TARGETS:
        raise ValueError(f"GradProbe: `target` must be 'argmax', 'label', an int, a callable or None; got {target!r}.")
    if isinstance(target, bool) or not (target is None or isinstance(target, (str, int)) or callable(target)):
        raise TypeError(f"GradProbe: `target` must be 'argmax', 'label', an int, a callable or None; got {target!r}.")


def _check_choices(arguments: Mapping[str, Any]) -> None:
    on_alert = arguments.get("on_alert", "warn")
    if not callable(on_alert) and on_alert not in _ON_ALERT:
        raise ValueError(f"GradProbe: `on_alert` must be 'warn', 'stop', 'raise' or a callable; got {on_alert!r}.")
    layer = arguments.get("layer")
    if layer is not None and not isinstance(layer, str):
        raise TypeError(f"GradProbe: `layer` must be a submodule's dotted name (a str) or None; got {layer!r}.")
    for name in ("input_key", "label_key"):
        key = arguments.get(name)
        if key is not None and not isinstance(key, (str, int, tuple)) and not callable(key):
            raise TypeError(
                f"GradProbe: `{name}` must be a key or index of the batch, a tuple of them, a callable "
                f"`batch -> value`, or None; got {key!r}."
            )
    exempt = arguments.get("exempt")
    entries = exempt if isinstance(exempt, (list, tuple)) else [] if exempt is None else [exempt]
    if any(not isinstance(e, (str, type, nn.Module)) for e in entries):
        raise TypeError(
            f"GradProbe: `exempt` must be submodule names, nn.Module types or instances (or a list of them); got "
            f"{exempt!r}."
        )
    output = arguments.get("output")
    if output is not None and not isinstance(output, (str, int)) and not callable(output):
        raise TypeError(f"GradProbe: `output` must be an index, a key, a callable or None; got {output!r}.")


_NUMBERS: dict[str, tuple[Callable[[float], bool], str]] = {
    "time_budget": (lambda v: v > 0, "None or > 0 seconds"),
    "max_overhead": (lambda v: 0 < v <= 1, "None or in (0, 1]: the fraction probing may add to the training time"),
}


def _check_numbers(arguments: Mapping[str, Any]) -> None:
    for name, (valid, what) in _NUMBERS.items():
        value = arguments.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not valid(value):
            raise ValueError(f"GradProbe: `{name}` must be {what}, got {value!r}.")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"GradProbe: `{name}` must be an int >= 1, got {value!r}.")
