"""Second-order verdict rates over the zoo, and the check's cost as a ratio to the first-order probe.

Verdicts: every model of ``tests/zoo.py``'s ``second_order_models`` over ``--seeds`` seeds, 8 samples each
(the double backward per sample, and the mixed term once per probe).

Cost, for each model: ``probe(model, x, second_order=True)`` and ``probe(model, x)`` are timed alternately in
the same process (medians). The second-order check's own cost is the difference; its ratio to the first-order
probe is what the README reports.

Run:  python benchmarks/bench_second_order.py [--seeds 10] [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import collections

from bench_probe import ratio
from zoo import SmallCNN, _pinn, second_order_models

from lightning_gradprobe import probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    verdict_rates(args.seeds)
    torch.manual_seed(0)
    cases = {
        "PINN MLP 1-32-32-1 (softplus Function), 64 points": (_pinn("ok"), torch.rand(64, 1) * 2 - 1),
        "tanh MLP 10-64-64-3, batch 64": (
            nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3)),
            torch.randn(64, 10),
        ),
        "CNN 1x28x28 -> 10 (ReLU, max-pool), batch 64": (SmallCNN(10, 28).eval(), torch.randn(64, 1, 28, 28)),
    }
    print(f"torch {torch.__version__}, {args.threads} threads, medians of {args.repeats} alternating repeats")
    print(f"{'model':52s} {'both/first':>10s} {'second/first':>12s} {'first ms':>9s} {'both ms':>9s}")
    for name, (model, x) in cases.items():
        r, both, first = ratio(
            lambda m=model, x=x: probe(m, x, second_order=True), lambda m=model, x=x: probe(m, x), args.repeats
        )
        print(f"{name:52s} {r:10.2f} {r - 1:12.2f} {first * 1e3:9.1f} {both * 1e3:9.1f}")


def verdict_rates(seeds: int) -> None:
    tallies: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for seed in range(seeds):
        for kind, models in zip(("correct", "wrong"), second_order_models(seed), strict=True):
            for name, (model, x) in models.items():
                report = probe(model, x, seed=seed, second_order=True)
                tally = tallies[(kind, name)]
                tally.update(str(v) for v in report.second_order.verdicts)
                tally.update(f"first {v}" for v in report.verdicts)
                tally[f"mixed {report.second_order.mixed_term}"] += 1
    print(f"second-order verdicts, {seeds} seeds x 8 samples (first order beside them)")
    print(f"{'':8s} {'model':60s} {'fail':>6s} {'pass':>6s} {'incon.':>6s} {'mixed':>12s} {'1st pass':>8s}")
    for (kind, name), c in sorted(tallies.items()):
        total = c["fail"] + c["pass"] + c["inconclusive"] + c["precision-limited"]
        mixed = ",".join(f"{k.split()[1]} {v}" for k, v in c.items() if k.startswith("mixed"))
        print(
            f"{kind:8s} {name:60s} {c['fail'] / total:6.1%} {c['pass'] / total:6.1%} "
            f"{c['inconclusive'] / total:6.1%} {mixed:>12s} {c['first pass'] / total:8.1%}"
        )
    print()


if __name__ == "__main__":
    main()
