"""The tests' shared set-up: ``tests/`` on the path, and the background launches of ``side_by_side``.

A test module that defines ``launch(root: Path) -> {name: command}`` (and may set ``LAUNCH_TIMEOUT``, seconds) gets
its launches started when collection ends, while this process runs the other tests: the tests marked
``launched`` (they read the launches) run last.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from side_by_side import BACKGROUND

_ROOTS: list[Path] = []


def pytest_configure() -> None:
    # One intra-op thread: the launches share the cores with this process (two spinning thread pools per core made
    # small tests ten times slower).
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("launched") is not None)  # (stable: the order otherwise)


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    modules = {}
    for item in session.items:
        module = getattr(item, "module", None)
        if item.get_closest_marker("launched") and hasattr(module, "launch"):
            modules.setdefault(module.__name__, module)
    if modules:
        _ROOTS.append(Path(tempfile.mkdtemp(prefix="gradprobe-launches-")))
    for name, module in modules.items():
        root = _ROOTS[0] / name
        root.mkdir()
        BACKGROUND.start(name, module.launch(root), root, timeout=getattr(module, "LAUNCH_TIMEOUT", 400))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if BACKGROUND.summary():
        terminalreporter.write_line(f"background launches ended: {BACKGROUND.summary()} (after collection)")


def pytest_sessionfinish(exitstatus: int) -> None:
    # (a session that stopped early, -x or Ctrl-C, does not wait for launches no test will read)
    BACKGROUND.close(kill=exitstatus in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.TESTS_FAILED))
    for root in _ROOTS:
        shutil.rmtree(root, ignore_errors=True)
