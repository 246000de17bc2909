"""DDP and DDP-spawn with 2 CPU processes (gloo): shared-out probes, one decision, no deadlock.

The DDP scenarios run one after another in the same two processes (started once: a process's start is most of
a small fit's time here); each is its own fit, with its own model and callback.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two processes per run

SCRIPT = Path(__file__).parent / "ddp_script.py"
DDP_SCENARIOS = {"stop": "scale:stop", "correct": "ok:stop", "budget": "ok:warn:0.05", "raise": "scale:raise"}


def _run(out, strategy, scenarios):
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), strategy, str(out), *scenarios], capture_output=True, text=True, timeout=400
    )
    results = []
    for n in range(len(scenarios)):
        written = Path(out, f"result-{n}-0.json")
        assert written.exists(), completed.stdout[-2000:] + completed.stderr[-4000:]
        results.append(json.loads(written.read_text()))
    return results, completed


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Rank zero's result of each DDP scenario, by name (the "raise" one last: it ends its fit by an exception)."""
    results, completed = _run(tmp_path_factory.mktemp("ddp"), "ddp", list(DDP_SCENARIOS.values()))
    return {name: (result, completed) for name, result in zip(DDP_SCENARIOS, results, strict=True)}


def _check_stop(result, stderr):
    assert result["outcome"] == "finished", stderr[-3000:]
    assert result["fail_fraction"] == 1.0


def test_ddp_stop_is_decided_together(ddp):
    result, completed = ddp["stop"]
    _check_stop(result, completed.stderr)
    # (the trainer's own state is readable in the launching process)
    assert result["should_stop"] and result["epoch"] == 1 and result["probes"] == 1
    assert result["probed_here"] == 4  # each of the 2 ranks probes its share of 8


def test_ddp_spawn_stop_is_decided_together(tmp_path):
    [result], completed = _run(tmp_path, "ddp_spawn", [DDP_SCENARIOS["stop"]])
    _check_stop(result, completed.stderr)


def test_ddp_raise_on_every_rank_without_deadlock(ddp):
    result, completed = ddp["raise"]
    assert result["outcome"] == "GradientCheckError", completed.stderr[-3000:]


def test_ddp_correct_model_trains_through(ddp):
    result, _ = ddp["correct"]
    assert result["outcome"] == "finished" and result["epoch"] == 4 and result["fail_fraction"] == 0.0


def test_ddp_overhead_budget_decided_by_rank_zero(ddp):
    """Timings differ per process; rank zero's budget decision is broadcast, so no rank probes (and gathers) alone."""
    result, _ = ddp["budget"]
    assert result["outcome"] == "finished" and result["epoch"] == 4
    assert result["probes"] >= 1 and result["probes"] + result["postponed"] == 4
