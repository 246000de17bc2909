"""Verdicts over PyTorch's own operator database, with ``torch.autograd.gradcheck`` as the referee.

Every differentiable op of ``op_db`` that runs in float32 and float64 on CPU is probed on its sample inputs
(batch: the sample and a 1%-noisy copy), once as is (any "fail" is a false alarm) and once with its output
passed through an identity whose backward scales the gradient by 1.1 (a "fail" is a detection). Only samples
that float64 gradcheck accepts count. The method is described in ``tests/opdb_cases.py``.

Run:  python benchmarks/bench_opdb.py [--ops conv] [--max-samples-per-op 4] [--seeds 1] [--engine torch.func]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch
from opdb_cases import Tally, find_ops, sweep


def _print_table(tally: Tally, wall: float, max_samples: int, seeds: int) -> None:
    print(f"op_db sweep: up to {max_samples} samples per op, {seeds} seed(s), engine={tally.engine}, {wall:.0f} s wall")
    print(f"probe calls by engine used: {dict(tally.engines)}\n")
    skipped = sum(tally.op_skips.values())
    print(f"ops tried                 {tally.ops_tried} ({tally.ops_with_cases} with at least one case)")
    print(f"ops skipped               {skipped}")
    for reason, count in tally.op_skips.most_common():
        print(f"  {reason:36s} {count}")
    print(f"samples skipped           {sum(tally.sample_skips.values())}")
    for reason, count in tally.sample_skips.most_common():
        print(f"  {reason:36s} {count}")
    print(f"cases (op, sample)        {tally.cases} ({tally.single_element} without the noisy copy)")
    print(f"correct samples probed    {tally.correct}")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(tally.verdicts.items()))
    print(f"  verdicts                {counts}")
    print(f"  false alarms            {len(tally.false_alarms)} ({tally.false_alarm_rate:.2%})")
    print(f"  inconclusive            {tally.inconclusive_rate:.2%}")
    print(f"  precision-limited       {tally.precision_limited_rate:.2%}")
    print(f"exceptions from probe     {len(tally.exceptions)}")
    print(f"detection cases           {tally.detection_cases}")
    print(f"  detected                {tally.detected} ({tally.detection_rate:.2%})")
    print(f"  misses                  {len(tally.misses)}")
    if tally.false_alarms:
        print("\nfalse alarms (op, sample, batch element, seed, worst relative error):")
        for op, sample, element, seed, error in tally.false_alarms:
            print(f"  {op:40s} sample {sample} element {element} seed {seed}  {error:.3g}")
    if tally.unsure:
        print("\ninconclusive / precision-limited correct samples, by op (sample:element):")
        by_op: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
        for op, sample, element, seed, verdict in tally.unsure:
            by_op[(verdict, op)].append(f"{sample}:{element}" + (f"@{seed}" if seed else ""))
        for (verdict, op), where in sorted(by_op.items()):
            print(f"  {verdict:18s} {op:40s} {' '.join(where)}")
    if tally.exceptions:
        print("\nexceptions (op, sample, which run, seed, message):")
        for op, sample, kind, seed, message in tally.exceptions:
            print(f"  {op:40s} sample {sample} {kind:7s} seed {seed}  {message}")
    if tally.misses:
        print("\nmisses (op, sample, batch element, seed, verdict on the wrong backward):")
        for op, sample, element, seed, verdict in tally.misses:
            print(f"  {op:40s} sample {sample} element {element} seed {seed}  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=None, help="only ops whose full name contains this substring")
    parser.add_argument("--max-samples-per-op", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=1, help="probe seeds 0..SEEDS-1 per case")
    parser.add_argument("--engine", default="auto", choices=("auto", "autograd", "torch.func"))
    parser.add_argument("--verbose", action="store_true", help="print each op as it is swept")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the box is shared
    start = time.perf_counter()

    def progress(name: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {name}", file=sys.stderr, flush=True)

    tally = sweep(
        find_ops(contains=args.ops),
        max_samples=args.max_samples_per_op,
        seeds=range(args.seeds),
        engine=args.engine,
        progress=progress if args.verbose else None,
    )
    _print_table(tally, time.perf_counter() - start, args.max_samples_per_op, args.seeds)


if __name__ == "__main__":
    main()
