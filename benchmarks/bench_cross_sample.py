"""Cross-sample verdicts over many seeds: backwards that mix samples fail, forwards that mix them are found.

For each model of ``tests/cross_sample_cases.py`` and each seed (a fresh model and batch of 8): the verdicts,
and whether the report claims a forward leak. A backward-only mixing must fail every sample with no invented
forward leak; a real forward leak must be found every time, whether the backward claims it ("forward") or is
blind to it ("blind": batch statistics treated as constants, a detached batch mean).

Run:  python benchmarks/bench_cross_sample.py [--seeds 300]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch
from cross_sample_cases import blind_backwards, mixing_backwards, mixing_forwards

from lightning_gradprobe import probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=300)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    start = time.perf_counter()
    print(f"{args.seeds} seeds x 8 samples per model")
    print(f"{'':9s} {'model':32s} {'fail':>7s} {'incon.':>7s} {'other':>7s} {'probes with a forward leak':>27s}")
    kinds = (("backward", mixing_backwards()), ("forward", mixing_forwards()), ("blind", blind_backwards()))
    for kind, models in kinds:
        for name, make in models.items():
            verdicts: collections.Counter[str] = collections.Counter()
            leaks = 0
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                report = probe(make().eval(), torch.randn(8, 10), seed=seed)
                verdicts.update(str(v) for v in report.verdicts)
                leaks += bool(report.leaking_pairs)
            total = sum(verdicts.values())
            other = total - verdicts["fail"] - verdicts["inconclusive"]
            print(
                f"{kind:9s} {name:32s} {verdicts['fail'] / total:7.1%} {verdicts['inconclusive'] / total:7.1%} "
                f"{other / total:7.1%} {leaks:>14d} of {args.seeds}"
            )
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
