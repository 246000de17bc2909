"""Verdict rates over the bug zoo: false alarms on correct models, detection of wrong backwards.

Every model of ``tests/zoo.py`` is probed with default settings on 8 samples per seed: the correct and wrong
models, the kernel bug classes (each wrong kernel beside its correct twin) and the exact-zero Jacobians. The
parameter-gradient check (on by default) is tallied per probe: on every correct model (false alarms) and on the
weight-only bug classes (input gradients right, weight gradients wrong; with ``localize=True``, whether the
culprit named is the right module).

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
from zoo import buggy_models, correct_models, exact_zero_models, kernel_bug_classes, weight_bug_classes

from lightning_gradprobe import probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=100)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    tallies: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    parameters: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    start = time.perf_counter()
    for seed in range(args.seeds):
        twins = kernel_bug_classes(seed)
        correct = {**correct_models(seed), **{f"{k} (twin)": pair[0] for k, pair in twins.items()}}
        correct.update({f"{k} (exact zero)": v for k, v in exact_zero_models(seed).items()})
        wrong = {**buggy_models(seed), **{k: pair[1] for k, pair in twins.items()}}
        weights = weight_bug_classes(seed)
        correct.update({f"{k} (twin)": twin for k, (twin, _, _) in weights.items()})
        for kind, models in (("correct", correct), ("wrong", wrong)):
            for name, (model, x) in models.items():
                report = probe(model, x, seed=seed)
                tallies[(kind, name)].update(str(v) for v in report.verdicts)
                if report.parameter_check is not None and kind == "correct":
                    parameters[("correct", name)][str(report.parameter_check.verdict)] += 1
        for name, (_, (model, x), culprit) in weights.items():
            report = probe(model, x, seed=seed, localize=True)
            tally = parameters[("weight bug", name)]
            tally[str(report.parameter_check.verdict) if report.parameter_check else "none"] += 1
            named = [c.module for c in report.culprits if c.kind == "parameter"]
            tally["named"] += named == [culprit]
            tally["input fail"] += report.counts["fail"] > 0
    print(f"{args.seeds} seeds x 8 samples per model, defaults, {time.perf_counter() - start:.0f} s\n")
    print(f"{'':8s} {'model':45s} {'samples':>7s} {'fail':>6s} {'pass':>6s} {'prec.':>6s} {'incon.':>6s}")
    for (kind, name), counts in sorted(tallies.items()):
        total = sum(counts.values())
        print(
            f"{kind:8s} {name:45s} {total:7d} {counts['fail'] / total:6.1%} {counts['pass'] / total:6.1%} "
            f"{counts['precision-limited'] / total:6.1%} {counts['inconclusive'] / total:6.1%}"
        )
    print("\nparameter gradients (whole-model check at the defaults), per probe")
    print(f"{'':10s} {'model':45s} {'probes':>6s} {'fail':>6s} {'pass':>6s} {'incon.':>6s} {'named':>6s}")
    for (kind, name), counts in sorted(parameters.items()):
        total = counts["fail"] + counts["pass"] + counts["inconclusive"] + counts["none"]
        named = f"{counts['named'] / total:6.1%}" if kind == "weight bug" else ""
        print(
            f"{kind:10s} {name:45s} {total:6d} {counts['fail'] / total:6.1%} {counts['pass'] / total:6.1%} "
            f"{counts['inconclusive'] / total:6.1%} {named:>6s}"
        )
    for kind, label in (("correct", "false alarms"), ("weight bug", "detected")):
        fails = sum(c["fail"] for (k, _), c in parameters.items() if k == kind)
        total = sum(
            c["fail"] + c["pass"] + c["inconclusive"] + c["none"] for (k, _), c in parameters.items() if k == kind
        )
        print(f"parameter check, {kind} models: {fails} of {total} probes fail ({label}: {fails / max(total, 1):.2%})")
    named = sum(c["named"] for (k, _), c in parameters.items() if k == "weight bug")
    total = sum(
        c["fail"] + c["pass"] + c["inconclusive"] + c["none"] for (k, _), c in parameters.items() if k == "weight bug"
    )
    inputs = sum(c["input fail"] for (k, _), c in parameters.items() if k == "weight bug")
    print(f"weight bugs: the right culprit named in {named} of {total} probes; input check failed in {inputs}")
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
