"""Run test subprocesses side by side, as many at a time as this process may use cores.

Multi-process fits and whole examples spend most of their time starting Python and importing Lightning, mostly
on one core: a module's launches start together when its first test asks, and each test reads its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager


@contextmanager
def side_by_side(commands: dict[str, Sequence[object]], timeout: float = 400) -> Iterator[Launches]:
    """Start every ``python *command`` (a pool as wide as the usable cores); yield their results by name.

    On leaving, launches not yet started are cancelled and running ones waited for (each ends by its timeout).
    """
    pool = ThreadPoolExecutor(max_workers=_cores())
    try:
        yield Launches({name: pool.submit(_run, command, timeout) for name, command in commands.items()})
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Launches:
    """The launches of one module, by name: ``launches[name]`` waits for that one's completed process."""

    def __init__(self, futures: dict[str, Future[subprocess.CompletedProcess[str]]]) -> None:
        self.futures = futures

    def __getitem__(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.futures[name].result()

    def succeeded(self, name: str) -> subprocess.CompletedProcess[str]:
        """``self[name]``, asserted to have exited 0 (the failure shows the ends of its output)."""
        done = self[name]
        assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        return done


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (not on every platform)
        return os.cpu_count() or 2


def _run(command: Sequence[object], timeout: float) -> subprocess.CompletedProcess[str]:
    """The completed process; one that ran past ``timeout`` is killed and reported as exit code -9, its output kept."""
    args = [sys.executable, *map(str, command)]
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as expired:
        out, err = (_text(stream) for stream in (expired.stdout, expired.stderr))
        return subprocess.CompletedProcess(args, -9, out, err + f"\n[killed: still running after {timeout:.0f} s]")


def _text(stream: bytes | str | None) -> str:
    return stream.decode(errors="replace") if isinstance(stream, bytes) else stream or ""
