"""Run test subprocesses side by side, and alongside the tests of this process.

Multi-process fits, whole examples and fresh-process measurements spend most of their time starting Python and
importing Lightning, mostly on one core. A test module that defines ``launch(root) -> {name: command}`` gets its
launches started in the background when collection ends (``conftest.py``), in a pool as wide as the usable cores,
while the tests of this process run; its tests that read them (marked ``launched``) run last, through
``BACKGROUND.launches(__name__)``, which waits for the ones asked for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from subprocess import PIPE

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
        self._running: set[subprocess.Popen[str]] = set()
        self._started = 0.0

    def start(self, module: str, commands: dict[str, Command], root: Path, timeout: float) -> None:
        """Queue ``python *command`` for each command of ``module`` (which write under ``root``); each is killed, with
        every process it started, past ``timeout`` seconds."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=_cores(), thread_name_prefix="launch")
            self._started = time.monotonic()
        launches = Launches({}, root)
        for name, command in commands.items():
            launches.futures[name] = self._pool.submit(self._run, command, timeout, launches.ended, name)
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

    def close(self, *, kill: bool = False) -> None:
        """Cancel the launches not yet started; wait for the running ones, or with ``kill`` (a session that stopped
        early: ``-x``, Ctrl-C) end them."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        pool.shutdown(wait=False, cancel_futures=True)
        if kill:
            for process in list(self._running):
                _kill(process)
        pool.shutdown(wait=True)

    def _run(
        self, command: Command, timeout: float, ended: dict[str, float], name: str
    ) -> subprocess.CompletedProcess[str]:
        """The completed process (``ended[name]`` gets the time it ended); one that ran past ``timeout`` is killed and
        reported as exit code -9, its output kept."""
        args = [sys.executable, *map(str, command)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # (one thread per process: they already share the cores)
        # (its own session: a timeout kills the processes it starts too, such as a Lightning launcher's ranks)
        with subprocess.Popen(args, stdout=PIPE, stderr=PIPE, text=True, env=env, start_new_session=True) as process:
            self._running.add(process)
            try:
                out, err = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill(process)
                out, err = process.communicate()
                err += f"\n[killed: still running after {timeout:.0f} s]"
            finally:
                self._running.discard(process)
                ended[name] = time.monotonic()
        return subprocess.CompletedProcess(args, process.returncode, out, err)


BACKGROUND = Background()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (not on every platform)
        return os.cpu_count() or 2


def _kill(process: subprocess.Popen[str]) -> None:
    """Kill ``process`` and every process of its session."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):  # gone already, or no process groups here
        process.kill()
