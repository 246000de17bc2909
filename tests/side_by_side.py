"""Run test subprocesses side by side, and alongside the tests of this process.

Multi-process fits, whole examples and fresh-process measurements spend most of their time starting Python and
importing Lightning, mostly on one core. A test module that defines ``launch(root) -> {name: command}`` gets its
launches started in the background when collection ends (``conftest.py``), in a pool as wide as the usable cores,
while the tests of this process run (those modules' tests run last); its tests read them with
``BACKGROUND.launches(__name__)``, which waits for the ones asked for.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

Command = Sequence[object]


class Launches:
    """The launches of one module, by name: ``launches[name]`` waits for that one's completed process.

    ``root`` is the folder they were given to write under.
    """

    def __init__(self, futures: dict[str, Future[subprocess.CompletedProcess[str]]], root: Path) -> None:
        self.futures, self.root = futures, root
        self.ended: dict[str, float] = {}

    def __getitem__(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.futures[name].result()

    def succeeded(self, name: str) -> subprocess.CompletedProcess[str]:
        """``self[name]``, asserted to have exited 0 (the failure shows the ends of its output)."""
        done = self[name]
        assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        return done


class Background:
    """Every module's launches, started in the order given, as many at a time as this process may use cores."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._modules: dict[str, Launches] = {}
        self._started = 0.0

    def start(self, module: str, commands: dict[str, Command], root: Path, timeout: float) -> None:
        """Queue ``python *command`` for each command of ``module`` (which write under ``root``); each is killed past
        ``timeout`` seconds."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=_cores(), thread_name_prefix="launch")
            self._started = time.monotonic()
        pool = self._pool
        launches = Launches({}, root)
        for name, command in commands.items():
            launches.futures[name] = pool.submit(_run, command, timeout, launches.ended, name)
        self._modules[module] = launches

    def launches(self, module: str) -> Launches:
        """``module``'s launches (started by ``conftest.py`` when its tests were collected)."""
        return self._modules[module]

    def summary(self) -> str:
        """When each module's launches ended, in seconds since the first was queued (for the session's summary)."""
        ends = []
        for module, launches in self._modules.items():
            if launches.ended:
                ends.append(f"{module} {max(launches.ended.values()) - self._started:.0f} s")
        return ", ".join(ends)

    def close(self) -> None:
        """Cancel the launches not yet started and wait for the running ones (each ends by its timeout)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


BACKGROUND = Background()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (not on every platform)
        return os.cpu_count() or 2


def _run(command: Command, timeout: float, ended: dict[str, float], name: str) -> subprocess.CompletedProcess[str]:
    """The completed process; one that ran past ``timeout`` is killed and reported as exit code -9, its output kept.

    ``ended[name]`` gets the time it ended.
    """
    try:
        return _completed(command, timeout)
    finally:
        ended[name] = time.monotonic()


def _completed(command: Command, timeout: float) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, *map(str, command)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # (one thread per process: they already share the cores)
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    except subprocess.TimeoutExpired as expired:
        out, err = (_text(stream) for stream in (expired.stdout, expired.stderr))
        return subprocess.CompletedProcess(args, -9, out, err + f"\n[killed: still running after {timeout:.0f} s]")


def _text(stream: bytes | str | None) -> str:
    return stream.decode(errors="replace") if isinstance(stream, bytes) else stream or ""
