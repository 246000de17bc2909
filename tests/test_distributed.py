"""DDP and DDP-spawn with 2 CPU processes (gloo): shared-out probes, one decision, no deadlock."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two processes per test

SCRIPT = Path(__file__).parent / "ddp_script.py"


def _run(tmp_path, strategy, bug, on_alert, *extra):
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), strategy, bug, on_alert, str(tmp_path), *extra],
        capture_output=True,
        text=True,
        timeout=240,
    )
    results = sorted(tmp_path.glob("result-*.json"))
    assert results, completed.stdout[-2000:] + completed.stderr[-4000:]
    return json.loads(results[0].read_text()), completed


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_stop_is_decided_together(tmp_path, strategy):
    result, completed = _run(tmp_path, strategy, "scale", "stop")
    assert result["outcome"] == "finished", completed.stderr[-3000:]
    assert result["fail_fraction"] == 1.0
    if strategy == "ddp":  # the trainer's own state is readable in the launching process
        assert result["should_stop"] and result["epoch"] == 1 and result["probes"] == 1
        assert result["probed_here"] == 4  # each of the 2 ranks probes its share of 8


def test_ddp_raise_on_every_rank_without_deadlock(tmp_path):
    result, completed = _run(tmp_path, "ddp", "scale", "raise")
    assert result["outcome"] == "GradientCheckError", completed.stderr[-3000:]


def test_ddp_correct_model_trains_through(tmp_path):
    result, _ = _run(tmp_path, "ddp", "ok", "stop")
    assert result["outcome"] == "finished" and result["epoch"] == 4 and result["fail_fraction"] == 0.0


def test_ddp_overhead_budget_decided_by_rank_zero(tmp_path):
    """Timings differ per process; rank zero's budget decision is broadcast, so no rank probes (and gathers) alone."""
    result, _ = _run(tmp_path, "ddp", "ok", "warn", "0.05")
    assert result["outcome"] == "finished" and result["epoch"] == 4
    assert result["probes"] >= 1 and result["probes"] + result["postponed"] == 4
