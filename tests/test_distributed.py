"""DDP and DDP-spawn with 2 CPU processes (gloo): shared-out probes, one decision, no deadlock.

The DDP scenarios run one after another in the same two processes (started once: a process's start is most of
a small fit's time here); each is its own fit, with its own model and callback. The DDP and DDP-spawn launches
run side by side.
"""

import json
from pathlib import Path

import pytest
from side_by_side import BACKGROUND

pytestmark = [pytest.mark.slow, pytest.mark.launched]  # two processes per run

SCRIPT = Path(__file__).parent / "ddp_script.py"
DDP_SCENARIOS = {"stop": "scale:stop", "correct": "ok:stop", "budget": "ok:warn:0.05", "raise": "scale:raise"}
SCENARIOS = {"ddp": list(DDP_SCENARIOS.values()), "ddp_spawn": [DDP_SCENARIOS["stop"]]}
LAUNCH_TIMEOUT = 600  # (four fits one after another in one launch)


def launch(root):
    """One launch per strategy (DDP's "raise" last: it ends its fit by an exception), each writing under its folder."""
    for strategy in SCENARIOS:
        (root / strategy).mkdir()
    return {strategy: [SCRIPT, strategy, root / strategy, *SCENARIOS[strategy]] for strategy in SCENARIOS}


@pytest.fixture(scope="module")
def runs():
    """Rank zero's result of each scenario, by name."""
    return _Results(BACKGROUND.launches(__name__))


class _Results:
    def __init__(self, launches) -> None:
        self.launches = launches

    def __call__(self, strategy: str, name: str) -> tuple[dict, str]:
        """Rank zero's result of scenario ``name`` under ``strategy``, and the launch's standard error."""
        completed = self.launches.succeeded(strategy)
        n = SCENARIOS[strategy].index(DDP_SCENARIOS[name])
        written = self.launches.root / strategy / f"result-{n}-0.json"
        assert written.exists(), completed.stdout[-2000:] + completed.stderr[-4000:]
        return json.loads(written.read_text()), completed.stderr


def _check_stop(result, stderr):
    assert result["outcome"] == "finished", stderr[-3000:]
    assert result["fail_fraction"] == 1.0


def test_ddp_stop_is_decided_together(runs):
    result, stderr = runs("ddp", "stop")
    _check_stop(result, stderr)
    # (the trainer's own state is readable in the launching process)
    assert result["should_stop"] and result["epoch"] == 1 and result["probes"] == 1
    assert result["probed_here"] == 4  # each of the 2 ranks probes its share of 8


def test_ddp_spawn_stop_is_decided_together(runs):
    _check_stop(*runs("ddp_spawn", "stop"))


def test_ddp_raise_on_every_rank_without_deadlock(runs):
    result, stderr = runs("ddp", "raise")
    assert result["outcome"] == "GradientCheckError", stderr[-3000:]


def test_ddp_correct_model_trains_through(runs):
    result, _ = runs("ddp", "correct")
    assert result["outcome"] == "finished" and result["epoch"] == 4 and result["fail_fraction"] == 0.0


def test_ddp_overhead_budget_decided_by_rank_zero(runs):
    """Timings differ per process; rank zero's budget decision is broadcast, so no rank probes (and gathers) alone."""
    result, _ = runs("ddp", "budget")
    assert result["outcome"] == "finished" and result["epoch"] == 4
    assert result["probes"] >= 1 and result["probes"] + result["postponed"] == 4
