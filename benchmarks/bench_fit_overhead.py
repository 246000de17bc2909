"""Fit wall time with GradProbe() defaults vs the same fit without it, on the digits example.

Both runs use the digits demo's model, data and TensorBoardLogger (so logging costs are shared) and its
default 40 epochs; they alternate in one process, ``--pairs`` times, and the figure is the ratio of median wall
times. On a noisy machine that ratio moves by several percent from run to run, so the script also prints the
probing time the callback measured in its own hooks (what its ``max_overhead`` budget counts) as a fraction of
the fit without it, and the pictures written (one per probe is promised).

Run:  python benchmarks/bench_fit_overhead.py [--pairs 9] [--epochs 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits_cnn import DigitsCNN, digits_loaders, make_trainer

from lightning_gradprobe import GradProbe


def fit_seconds(with_probe: bool, epochs: int, logdir: str) -> tuple[float, float, int, float]:
    """The fit's wall time and process CPU time, the probes made, the probing seconds measured in its hooks."""
    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders()
    probe = GradProbe() if with_probe else None
    trainer = make_trainer(logdir, epochs, [probe] if probe else [])
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(DigitsCNN(), train, val)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if probe is None:
        return seconds, cpu, 0, 0.0
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0}).Reload()
    pictures = len(events.Images("gradprobe/saliency"))
    in_hook = probe.schedule.probing_seconds
    postponed = probe.schedule.postponed
    print(f"  probes {probe.probes_done}, pictures {pictures}, postponed {postponed}, in-hook {in_hook:.3f}s")
    return seconds, cpu, probe.probes_done, in_hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=9)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--null", action="store_true", help="both arms without the callback: the noise floor")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    in_hook, probes = [], 0
    with tempfile.TemporaryDirectory() as logdir:
        fit_seconds(True, 1, logdir)  # warm-up: imports, allocator, fonts
        for pair in range(args.pairs):
            for with_probe in (True, False) if pair % 2 == 0 else (False, True):  # ABBA: order effects cancel
                seconds, cpu, done, hooks = fit_seconds(with_probe and not args.null, args.epochs, logdir)
                runs[with_probe].append((seconds, cpu))
                if with_probe:
                    probes = done
                    in_hook.append(hooks)
    with_probe, without = [s for s, _ in runs[True]], [s for s, _ in runs[False]]
    a, b = statistics.median(with_probe), statistics.median(without)
    cpu_a, cpu_b = statistics.median(c for _, c in runs[True]), statistics.median(c for _, c in runs[False])
    print(f"digits CNN, {args.epochs} epochs, {probes} probes of 8 samples, {args.pairs} alternating pairs")
    print(f"fit with GradProbe():    median {a:.3f} s  (runs: {', '.join(f'{s:.2f}' for s in with_probe)})")
    print(f"fit without:             median {b:.3f} s  (runs: {', '.join(f'{s:.2f}' for s in without)})")
    print(f"ratio {a / b:.3f}  (target <= 1.05); per probe {(a - b) / max(probes, 1) * 1e3:.0f} ms")
    print(f"process CPU time: ratio {cpu_a / cpu_b:.3f} ({cpu_a:.2f} s vs {cpu_b:.2f} s, both threads)")
    hooks = statistics.median(in_hook)
    print(f"probing measured in the hooks: median {hooks:.3f} s = {hooks / b:.1%} of the fit without")


if __name__ == "__main__":
    main()
