"""``gradprobe summary LOGDIR``: a terminal table of probes and alerts, read from TensorBoard event files."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .render.summary import summarize

__all__ = ["main", "summarize"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradprobe`` console command: 0 when it printed a table, 1 when there was none to print."""
    parser = argparse.ArgumentParser(prog="gradprobe", description="Inspect lightning-gradprobe results.")
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="print a table of probes and alerts from TensorBoard event files")
    summary.add_argument("logdir", help="a TensorBoard log directory (searched recursively)")
    args = parser.parse_args(argv)
    if not Path(args.logdir).exists():
        parser.error(f"logdir {args.logdir!r} does not exist")
    text = summarize(args.logdir)
    if text.startswith("no gradprobe scalars"):  # nothing to show is an error a script should see
        print(f"gradprobe: {text}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
