"""Run test subprocesses side by side, as many at a time as there are cores.

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
    """Start every ``python *command`` at once (a pool of ``os.cpu_count()``); yield their results by name."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        yield Launches({name: pool.submit(_run, command, timeout) for name, command in commands.items()})


class Launches:
    """The launches of one module, by name: ``launches[name]`` waits for that one's completed process."""

    def __init__(self, futures: dict[str, Future[subprocess.CompletedProcess[str]]]) -> None:
        self.futures = futures

    def __getitem__(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.futures[name].result()


def _run(command: Sequence[object], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *map(str, command)], capture_output=True, text=True, timeout=timeout, check=False
    )
