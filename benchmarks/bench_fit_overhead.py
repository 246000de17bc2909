"""Fit wall time with GradProbe() defaults vs the same fit without it, on the digits example.

Both runs use the digits demo's model, data and TensorBoardLogger (so logging costs are shared);
they alternate in one process, ``--pairs`` times, and the figure is the ratio of median wall times.

Run:  python benchmarks/bench_fit_overhead.py [--pairs 5] [--epochs 15]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits_cnn import DigitsCNN, digits_loaders, make_trainer

from lightning_gradprobe import GradProbe


def fit_seconds(with_probe: bool, epochs: int, logdir: str) -> tuple[float, int]:
    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders()
    probe = GradProbe() if with_probe else None
    trainer = make_trainer(logdir, epochs, [probe] if probe else [])
    start = time.perf_counter()
    trainer.fit(DigitsCNN(), train, val)
    seconds = time.perf_counter() - start
    if probe is not None:
        print(
            f"  probes {probe.probes_done}, postponed {probe.schedule.postponed}, "
            f"measured in-hook {probe.schedule.probing_seconds:.3f}s"
        )
    return seconds, probe.probes_done if probe else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with_probe, without, probes = [], [], 0
    with tempfile.TemporaryDirectory() as logdir:
        fit_seconds(True, 1, logdir)  # warm-up: imports, allocator, fonts
        for _ in range(args.pairs):
            seconds, probes = fit_seconds(True, args.epochs, logdir)
            with_probe.append(seconds)
            without.append(fit_seconds(False, args.epochs, logdir)[0])
    a, b = statistics.median(with_probe), statistics.median(without)
    print(f"digits CNN, {args.epochs} epochs, {probes} probes of 8 samples, {args.pairs} alternating pairs")
    print(f"fit with GradProbe():    median {a:.3f} s  (runs: {', '.join(f'{s:.2f}' for s in with_probe)})")
    print(f"fit without:             median {b:.3f} s  (runs: {', '.join(f'{s:.2f}' for s in without)})")
    print(f"ratio {a / b:.3f}  (target <= 1.05); per probe {(a - b) / max(probes, 1) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
