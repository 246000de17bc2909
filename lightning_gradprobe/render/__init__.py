"""Rendering: the only place that knows TensorBoard and matplotlib."""

from __future__ import annotations

from typing import Any

__all__ = ["render_report"]


def render_report(trainer: Any, report: Any, callback: Any) -> None:
    """Write a probe's panels to the trainer's TensorBoard logger, if it has one (rank zero only)."""
    return None
