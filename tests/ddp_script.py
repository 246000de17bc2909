"""Run GradProbe under a 2-process CPU strategy, one fit per scenario in the same processes (they start once).

Usage: ``ddp_script.py STRATEGY OUT SCENARIO [SCENARIO ...]`` with ``SCENARIO`` = ``bug:on_alert[:max_overhead]``;
each process that runs this script writes ``OUT/result-<n>-<rank>.json`` per scenario (``n``: its position):
both ranks under ``ddp``, the launching process (rank zero) under ``ddp_spawn``. Used by test_distributed.py.
"""

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from lit_models import DigitsModule, trainer

from lightning_gradprobe import GradProbe


class Record(GradProbe):
    def _finish(self, trainer_, pl_module):
        super()._finish(trainer_, pl_module)
        if self.last_report is not None:
            pl_module.probed_here = len(self.last_report.verdicts)


def fit(strategy: str, scenario: str, out: Path) -> dict:
    bug, on_alert, *rest = scenario.split(":")
    budget = float(rest[0]) if rest else None
    module = DigitsModule(bug=bug)
    callback = Record(on_alert=on_alert, num_samples=8, max_overhead=budget)
    run = trainer(out, [callback], max_epochs=4, strategy=strategy, devices=2)
    try:
        run.fit(module)
        outcome = "finished"
    except Exception as error:  # raised on every rank alike
        outcome = type(error).__name__
    return {
        "rank": run.global_rank,
        "outcome": outcome,
        "epoch": run.current_epoch,
        "should_stop": run.should_stop,
        "fail_fraction": float(run.callback_metrics.get("gradprobe/checks/fail_fraction", -1)),
        "probes": callback.probes_done,
        "probed_here": getattr(module, "probed_here", None),
        "postponed": callback.schedule.postponed,
    }


def main() -> None:
    strategy, out, *scenarios = sys.argv[1:]
    warnings.simplefilter("ignore")
    for n, scenario in enumerate(scenarios):
        result = fit(strategy, scenario, Path(out, str(n)))
        # (under ddp_spawn the launching process reads its trainer's state from rank zero's process only)
        Path(out, f"result-{n}-{result['rank']}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
