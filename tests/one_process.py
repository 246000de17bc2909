"""Run scripts one after another in this one process, each as ``__main__`` with its own arguments.

Starting Python and importing Lightning costs 5-8 s of CPU here, most of a small example's run: the examples'
test runs them in two such processes, side by side, instead of one process each. Each script gets its own
``sys.argv`` and ``sys.path[0]``, and its file descriptors 1 and 2 (everything it prints, logging included) go to
``OUT/<name>.out`` and ``OUT/<name>.err``; its exit status (0, a ``SystemExit`` code, or 1 for an exception, whose
traceback ends ``.err``) goes to ``OUT/<name>.status``. The process exits 0 once every script has run.

Run:  python tests/one_process.py OUT NAME SCRIPT [ARGS...] -- NAME SCRIPT [ARGS...] ...
"""

from __future__ import annotations

import os
import runpy
import sys
import traceback
from pathlib import Path


def run(script: str, args: list[str], out: Path, name: str) -> int:
    """``python script *args``, in this process; its exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    argv, path0 = sys.argv, sys.path[0]
    with open(out / f"{name}.out", "w") as stdout, open(out / f"{name}.err", "w") as stderr:
        os.dup2(stdout.fileno(), 1)
        os.dup2(stderr.fileno(), 2)
        try:
            sys.argv, sys.path[0] = [script, *args], str(Path(script).resolve().parent)
            runpy.run_path(script, run_name="__main__")
            status = 0
        except SystemExit as exit_:
            code = exit_.code
            status = code if isinstance(code, int) else (0 if code is None else 1)
        except BaseException:  # the script's own failure: its traceback, as Python would print it
            traceback.print_exc()
            status = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            sys.argv, sys.path[0] = argv, path0
    return status


def main() -> None:
    out, rest = Path(sys.argv[1]), sys.argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    while rest:
        cut = rest.index("--") if "--" in rest else len(rest)
        (name, script, *args), rest = rest[:cut], rest[cut + 1 :]
        (out / f"{name}.status").write_text(str(run(script, args, out, name)))


if __name__ == "__main__":
    main()
