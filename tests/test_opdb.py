"""A fast slice of the op_db sweep (``benchmarks/bench_opdb.py``): PyTorch's operators, gradcheck as referee.

See ``tests/opdb_cases.py`` for the method. The slice is a fixed list of diverse, stable operators, swept in a
fresh process alongside the other tests (``side_by_side``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from side_by_side import BACKGROUND

pytestmark = [pytest.mark.slow, pytest.mark.launched]  # builds PyTorch's operator database

SLICE = (
    "abs",
    "add",
    "amax",
    "atan2",
    "bmm",
    "clamp",
    "cumprod",
    "cumsum",
    "div.no_rounding_mode",
    "exp",
    "gather",
    "index_select",
    "linalg.norm",
    "linalg.solve",
    "log",
    "log_softmax",
    "logsumexp",
    "matmul",
    "max.reduction_with_dim",
    "mm",
    "mul",
    "nn.functional.conv1d",
    "nn.functional.conv2d",
    "nn.functional.cross_entropy",
    "nn.functional.gelu",
    "nn.functional.interpolate.bilinear",
    "nn.functional.layer_norm",
    "nn.functional.max_pool2d",
    "nn.functional.mse_loss",
    "nn.functional.normalize",
    "nn.functional.relu",
    "nn.functional.silu",
    "pow",
    "sigmoid",
    "sin",
    "softmax",
    "sort",
    "sqrt",
    "std",
    "tanh",
    "topk",
    "var",
    "where",
)

FORMER_FALSE_ALARMS = ("prod", "round.decimals_3", "special.i1e")
"""Ops the full sweep once caught the engine out on: float32 underflow of a product of 125 factors, a staircase
whose slope is 1 above its treads and 0 below, and ``x |x|``-like behaviour at an exact 0 that the second
difference cannot see."""


SWEEP = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from opdb_cases import find_ops, sweep

torch.set_num_threads(1)  # (tiny ops: intra-op threads only add contention)
torch.backends.disable_global_flags()  # the way custom-op authors test: inside PyTorch's harness, flags locked
found = {}
for name, names, seeds in json.loads(sys.argv[2]):
    tally = sweep(find_ops(names), max_samples=4, seeds=seeds)
    found[name] = {
        "ops_tried": tally.ops_tried, "op_skips": tally.op_skips, "cases": tally.cases, "correct": tally.correct,
        "false_alarms": tally.false_alarms, "exceptions": tally.exceptions, "unsure": tally.unsure,
        "inconclusive_rate": tally.inconclusive_rate, "detection_cases": tally.detection_cases,
        "detection_rate": tally.detection_rate, "misses": tally.misses,
    }
print(json.dumps(found))
"""


def launch(root):
    """One fresh process sweeps the slice (one seed: the benchmark sweeps every op over more), then each former false
    alarm over two seeds."""
    sweeps = [("slice", SLICE, [0]), *[(name, [name], [0, 1]) for name in FORMER_FALSE_ALARMS]]
    return {"sweeps": ["-c", SWEEP, Path(__file__).parent, json.dumps(sweeps)]}


@pytest.fixture(scope="module")
def tallies() -> dict[str, dict]:
    """Each sweep's figures, by name."""
    return json.loads(BACKGROUND.launches(__name__).succeeded("sweeps").stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tally(tallies) -> dict:
    return tallies["slice"]


def test_every_slice_op_is_swept(tally) -> None:
    assert tally["ops_tried"] == len(SLICE), tally["op_skips"]
    assert tally["cases"] >= len(SLICE)


def test_no_false_alarm(tally) -> None:
    assert not tally["false_alarms"]


def test_no_exception_escapes_probe(tally) -> None:
    assert not tally["exceptions"]


def test_wrong_backward_detected(tally) -> None:
    assert tally["detection_cases"] >= len(SLICE)
    assert tally["detection_rate"] >= 0.95, tally["misses"]


def test_few_inconclusive(tally) -> None:
    assert tally["inconclusive_rate"] <= 0.10, tally["unsure"]


@pytest.mark.parametrize("name", FORMER_FALSE_ALARMS)
def test_former_false_alarms(tallies, name: str) -> None:
    found = tallies[name]
    assert found["correct"] and not found["false_alarms"] and not found["exceptions"]
