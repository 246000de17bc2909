"""Verdict rates over the bug zoo: false alarms on correct models, detection of wrong backwards.

Every model of ``tests/zoo.py`` is probed with default settings on 8 samples per seed: the correct and wrong
models, the kernel bug classes (each wrong kernel beside its correct twin) and the exact-zero Jacobians.

Run:  python benchmarks/bench_verdicts.py [--seeds 100]
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
from zoo import buggy_models, correct_models, exact_zero_models, kernel_bug_classes

from lightning_gradprobe import probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=100)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    tallies: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    start = time.perf_counter()
    for seed in range(args.seeds):
        twins = kernel_bug_classes(seed)
        correct = {**correct_models(seed), **{f"{k} (twin)": pair[0] for k, pair in twins.items()}}
        correct.update({f"{k} (exact zero)": v for k, v in exact_zero_models(seed).items()})
        wrong = {**buggy_models(seed), **{k: pair[1] for k, pair in twins.items()}}
        for kind, models in (("correct", correct), ("wrong", wrong)):
            for name, (model, x) in models.items():
                tallies[(kind, name)].update(str(v) for v in probe(model, x, seed=seed).verdicts)
    print(f"{args.seeds} seeds x 8 samples per model, defaults, {time.perf_counter() - start:.0f} s\n")
    print(f"{'':8s} {'model':45s} {'samples':>7s} {'fail':>6s} {'pass':>6s} {'prec.':>6s} {'incon.':>6s}")
    for (kind, name), counts in sorted(tallies.items()):
        total = sum(counts.values())
        print(
            f"{kind:8s} {name:45s} {total:7d} {counts['fail'] / total:6.1%} {counts['pass'] / total:6.1%} "
            f"{counts['precision-limited'] / total:6.1%} {counts['inconclusive'] / total:6.1%}"
        )
    # The anchor people know: torch.autograd.gradcheck at its defaults on the same correct float32 models.
    gradcheck_alarms = gradcheck_total = 0
    for seed in range(min(args.seeds, 20)):
        for name, (model, x) in correct_models(seed).items():
            if x.dtype != torch.float32 or name in ("classic-function",):
                continue
            for sample in x[:2]:
                leaf = sample.unsqueeze(0).clone().requires_grad_()
                gradcheck_total += 1
                gradcheck_alarms += not torch.autograd.gradcheck(model, (leaf,), raise_exception=False)
    print(
        f"\ntorch.autograd.gradcheck (defaults) on the same correct float32 models: {gradcheck_alarms} of "
        f"{gradcheck_total} samples judged wrong ({gradcheck_alarms / max(gradcheck_total, 1):.0%})"
    )
    for kind in ("correct", "wrong"):
        fails = sum(c["fail"] for (k, _), c in tallies.items() if k == kind)
        total = sum(sum(c.values()) for (k, _), c in tallies.items() if k == kind)
        label = "false alarms" if kind == "correct" else "detected"
        print(f"\n{kind} models: {fails} of {total} samples judged fail ({label}: {fails / total:.2%})")
        if kind == "correct":
            shrugs = sum(c["inconclusive"] for (k, _), c in tallies.items() if k == kind)
            print(f"correct models: {shrugs} of {total} samples inconclusive ({shrugs / total:.2%})")


if __name__ == "__main__":
    main()
