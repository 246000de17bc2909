"""Record the engine's verdicts sample by sample on fixed seeds, or compare two records.

A refactoring of the engine must leave every verdict where it was. This script probes the models of
``bench_verdicts.py`` (the zoo: correct, wrong, kernel bug classes, exact zeros), of ``bench_second_order.py``
and a slice of ``bench_opdb.py`` on fixed seeds, and writes one JSON record per (model, seed): the verdicts,
the margins and relative errors (exact float text), the culprits a localization names, and the second-order
verdicts and mixed term.

Run:
    python benchmarks/verdict_fingerprint.py record before.json [--seeds 6]
    python benchmarks/verdict_fingerprint.py record after.json [--seeds 6]
    python benchmarks/verdict_fingerprint.py compare before.json after.json

``compare`` exits 1 when any verdict or culprit differs, and reports figures that moved (those may move by
round-off when operations are reordered; verdicts may not).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch
from zoo import buggy_models, correct_models, exact_zero_models, kernel_bug_classes, second_order_models

from lightning_gradprobe import probe

OPDB_SLICE = ("abs", "amax", "atan2", "clamp", "cumprod", "linalg.norm", "log_softmax", "max.reduction_with_dim")
OPDB_SLICE += ("nn.functional.conv2d", "nn.functional.layer_norm", "nn.functional.max_pool2d", "prod", "pow")
OPDB_SLICE += ("round.decimals_3", "sort", "special.i1e", "topk", "where")


def _floats(values: torch.Tensor) -> list[str]:
    return [repr(float(v)) for v in values.flatten().tolist()]


def _record(report: Any) -> dict[str, Any]:
    record = {
        "verdicts": [str(v) for v in report.verdicts],
        "margin": _floats(report.margin),
        "relative_error": _floats(report.relative_error),
        "culprits": [str(c) for c in report.culprits],
        "mixing_pairs": [list(p) for p in report.mixing_pairs],
        "leaking_pairs": [list(p) for p in report.leaking_pairs],
    }
    second = report.second_order
    if second is not None:
        record["second_order"] = [str(v) for v in second.verdicts]
        record["second_order_margin"] = _floats(second.margin)
        record["mixed_term"] = str(second.mixed_term)
        record["second_order_culprits"] = [str(c) for c in second.culprits]
    return record


def _guarded(run: Any) -> dict[str, Any]:
    try:
        return _record(run())
    except Exception as error:  # an exception is part of the behaviour too
        return {"exception": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}


def record(path: Path, seeds: int) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    start = time.perf_counter()
    out: dict[str, Any] = {}
    for seed in range(seeds):
        twins = kernel_bug_classes(seed)
        correct = {**correct_models(seed), **{f"{k} (twin)": pair[0] for k, pair in twins.items()}}
        correct.update({f"{k} (exact zero)": v for k, v in exact_zero_models(seed).items()})
        wrong = {**buggy_models(seed), **{k: pair[1] for k, pair in twins.items()}}
        for kind, models in (("correct", correct), ("wrong", wrong)):
            for name, (model, x) in models.items():
                localize = kind == "wrong" and seed < 2 and isinstance(model, torch.nn.Module)
                out[f"zoo/{kind}/{name}/{seed}"] = _guarded(
                    lambda m=model, x=x, s=seed, loc=localize: probe(m, x, seed=s, localize=loc)
                )
        for kind, models in zip(("correct", "wrong"), second_order_models(seed), strict=True):
            for name, (model, x) in models.items():
                localize = kind == "wrong" and seed < 2
                out[f"second/{kind}/{name}/{seed}"] = _guarded(
                    lambda m=model, x=x, s=seed, loc=localize: probe(m, x, seed=s, second_order=True, localize=loc)
                )
        print(f"seed {seed}: {len(out)} records, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    import collections

    from opdb_cases import build_cases, find_ops

    skips: collections.Counter[str] = collections.Counter()
    for op in find_ops(names=OPDB_SLICE):
        for case in build_cases(op, 3, skips):
            x = case.inputs.float()
            for seed in range(2):
                for kind, function in (("correct", case.function), ("wrong", case.wrong)):
                    out[f"opdb/{kind}/{case.op}/{case.sample}/{seed}"] = _guarded(
                        lambda f=function, x=x, s=seed: probe(f, x, seed=s)
                    )
    print(f"{len(out)} records in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    path.write_text(json.dumps(out, indent=0, sort_keys=True))


def compare(before_path: Path, after_path: Path) -> int:
    before, after = json.loads(before_path.read_text()), json.loads(after_path.read_text())
    differences, moved = [], []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a is None or b is None:
            differences.append(f"{key}: only in {'after' if a is None else 'before'}")
            continue
        for field in sorted(set(a) | set(b)):
            if a.get(field) == b.get(field):
                continue
            target = moved if field in ("margin", "relative_error", "second_order_margin") else differences
            target.append(f"{key} [{field}]: {a.get(field)} -> {b.get(field)}")
    samples = sum(len(r.get("verdicts", [])) + len(r.get("second_order", [])) for r in before.values())
    print(f"{len(before)} records ({samples} sample verdicts) compared")
    print(f"verdict/culprit/exception differences: {len(differences)}")
    for line in differences[:40]:
        print("  " + line)
    print(f"figures that moved (margins, relative errors): {len(moved)}")
    for line in moved[:10]:
        print("  " + line[:300])
    return 1 if differences else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("path", type=Path)
    rec.add_argument("--seeds", type=int, default=6)
    cmp = sub.add_parser("compare")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "record":
        record(args.path, args.seeds)
    else:
        sys.exit(compare(args.before, args.after))


if __name__ == "__main__":
    main()
