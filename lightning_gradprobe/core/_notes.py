"""What a probe noted: remarks for the report, and which of them are also said as a warning, once per model."""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["Note", "Notes", "describe_error", "subject_name", "warn_once"]


@dataclass(frozen=True)
class Note:
    """One remark of a probe.

    Attributes:
        text: What happened, one clause.
        weaker: Whether a check ran weaker than its defaults (shown with a ``"weaker check: "`` prefix).
        warn: Whether it is also said as a ``RuntimeWarning`` (weaker checks always are), once per model.

    """

    text: str
    weaker: bool = False
    warn: bool = False

    def __str__(self) -> str:
        return f"weaker check: {self.text}" if self.weaker else self.text


class Notes:
    """The notes of one probe, in the order they were made.

    Example:
        >>> notes = Notes(subject=None)
        >>> notes.add("forward mode not checked")
        >>> notes.add("finite differences ran in float32", weaker=True)
        >>> notes.texts()
        ('forward mode not checked', 'weaker check: finite differences ran in float32')

    """

    def __init__(self, subject: Any) -> None:
        self.subject = subject
        self._notes: list[Note] = []

    def add(self, text: str, *, weaker: bool = False, warn: bool = False) -> None:
        """Note ``text``; ``weaker`` when a check runs weaker than its defaults, ``warn`` to say it as a warning."""
        self._notes.append(Note(text, weaker, warn or weaker))

    def extend(self, texts: tuple[str, ...] | list[str]) -> None:
        """Note each of ``texts`` (plain remarks)."""
        for text in texts:
            self.add(text)

    def texts(self) -> tuple[str, ...]:
        """Every note as the report shows it."""
        return tuple(str(note) for note in self._notes)

    def say_warnings(self, stacklevel: int = 3) -> None:
        """Warn about the notes that ask for it, once per model and note."""
        name = subject_name(self.subject)
        for note in self._notes:
            if note.warn:
                warn_once(self.subject, str(note), f"gradprobe: {name}: {note}. (Shown once per model.)", stacklevel)


def subject_name(subject: Any) -> str:
    """A name for a model in messages: its class, or a callable's qualified name."""
    if isinstance(subject, nn.Module):
        return type(subject).__name__
    return getattr(subject, "__qualname__", type(subject).__name__)


# Which reasons were said for which model: keyed by the model object itself (so a new model is told again), or by
# its name where the object cannot be referenced weakly (builtins).
_SAID: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
_SAID_BY_NAME: dict[str, set[str]] = {}


def warn_once(subject: Any, reason: str, message: str, stacklevel: int = 3) -> None:
    """``warnings.warn(message)`` unless ``reason`` was already said for ``subject`` (a model or callable)."""
    try:
        said = _SAID.setdefault(subject, set())
    except TypeError:  # not weakly referenceable, or unhashable
        said = _SAID_BY_NAME.setdefault(subject_name(subject), set())
    if reason in said:
        return
    said.add(reason)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def describe_error(error: BaseException, width: int = 120) -> str:
    r"""``"Type: first line of the message"`` (cut at ``width``), also for an empty message (a bare ``assert``).

    Example:
        >>> describe_error(AssertionError())
        'AssertionError'
        >>> describe_error(ValueError("bad input\nmore"))
        'ValueError: bad input'

    """
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:width]}" if lines else type(error).__name__
