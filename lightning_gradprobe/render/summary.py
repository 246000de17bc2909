"""Read probes and alerts back from TensorBoard event files (with TensorBoard's own EventAccumulator)."""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["summarize"]

_COLUMNS = (
    ("fail", "gradprobe/checks/fail_fraction", "{:.0%}"),
    ("inconcl.", "gradprobe/checks/inconclusive_fraction", "{:.0%}"),
    ("margin max", "gradprobe/checks/margin_max", "{:.2g}"),
    ("rel.err max", "gradprobe/checks/relative_error_max", "{:.2g}"),
    ("|grad| p50", "gradprobe/health/grad_norm_p50", "{:.3g}"),
    ("non-finite", "gradprobe/health/nonfinite_samples", "{:.0f}"),
    ("leaks", "gradprobe/health/leaking_pairs", "{:.0f}"),
)


def summarize(logdir: str | Path) -> str:
    """Render every run under ``logdir`` that holds ``gradprobe/`` scalars as a plain-text table.

    Uses TensorBoard's own ``EventAccumulator``; alerts come from the ``gradprobe/alerts`` text log.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted({path.parent for path in Path(logdir).rglob("events.out.tfevents.*")})
    blocks = []
    for run in runs:
        events = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        tags = set(events.Tags().get("scalars", []))
        if not any(tag.startswith("gradprobe/") for tag in tags):
            continue
        by_step: dict[int, dict[str, float]] = {}
        for _, tag, _ in _COLUMNS:
            if tag in tags:
                for event in events.Scalars(tag):
                    by_step.setdefault(event.step, {})[tag] = event.value
        alerts: dict[int, list[str]] = {}
        if "gradprobe/alerts/text_summary" in events.Tags().get("tensors", []):
            for event in events.Tensors("gradprobe/alerts/text_summary"):
                lines = event.tensor_proto.string_val[0].decode().splitlines()[2:]
                alerts[event.step] = [_alert_cell(line) for line in lines if line.count("|") > 3]
        header = ["step", *(name for name, _, _ in _COLUMNS), "alerts"]
        rows = [header]
        for step in sorted(by_step):
            values = by_step[step]
            cells = [str(step)]
            for _, tag, fmt in _COLUMNS:
                value = values.get(tag)
                cells.append("-" if value is None or math.isnan(value) else fmt.format(value))
            cells.append(", ".join(alerts.get(step, [])) or "-")
            rows.append(cells)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        table = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
        table.insert(1, "  ".join("-" * width for width in widths))
        blocks.append(f"{run}\n" + "\n".join(table))
    if not blocks:
        return f"no gradprobe scalars under {logdir}"
    return "\n\n".join(blocks)


def _alert_cell(row: str) -> str:
    cells = [c.strip() for c in row.split("|")]
    condition, culprit = cells[2], cells[6] if len(cells) > 7 else "-"
    return condition if culprit in ("", "-") else f"{condition} @ {culprit.replace('`', '')}"
