"""Run GradProbe under a 2-process CPU strategy; rank 0 prints one JSON line. Used by test_distributed.py."""

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


def main() -> None:
    strategy, bug, on_alert, out = sys.argv[1:5]
    budget = None if len(sys.argv) < 6 else float(sys.argv[5])
    warnings.simplefilter("ignore")
    module = DigitsModule(bug=bug)
    callback = Record(on_alert=on_alert, num_samples=8, max_overhead=budget)
    run = trainer(out, [callback], max_epochs=4, strategy=strategy, devices=2)
    try:
        run.fit(module)
        outcome = "finished"
    except Exception as error:  # raised on every rank alike
        outcome = type(error).__name__
    if run.global_rank == 0 or strategy == "ddp_spawn":
        result = {
            "outcome": outcome,
            "epoch": run.current_epoch,
            "should_stop": run.should_stop,
            "fail_fraction": float(run.callback_metrics.get("gradprobe/checks/fail_fraction", -1)),
            "probes": callback.probes_done,
            "probed_here": getattr(module, "probed_here", None),
            "postponed": callback.schedule.postponed,
        }
        Path(out, f"result-{run.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
