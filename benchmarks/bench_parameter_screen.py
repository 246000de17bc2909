"""The parameter check's screen against the check without it, on weight bugs and models the zoo does not have.

Each model is probed at its defaults twice: as shipped (one direction screened first at step sqrt(eps), a clean
pass ending the check) and with the screen off (both directions at the default step, what decides anything else).
Bugs (``tests/zoo.py``'s ``LINEAR_WEIGHT_BUGS`` beyond the zoo's own two): a hand-written linear layer whose
weight gradient is x1.01 or x1.001, has one entry x2 or a row's sign flipped, or is missing (detached), whose bias
gradient is x1.1 or missing, in two MLPs; a learnable temperature whose gradient is x1.1. The screen can only pass
a probe, so the figure to read is whether it passed a bug the two-direction check fails.

Run:  python benchmarks/bench_parameter_screen.py [--seeds 30]
"""

import argparse
import collections
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import LINEAR_WEIGHT_BUGS, FusedLinear

import lightning_gradprobe.core._parameters as P
from lightning_gradprobe import probe


class TempFn(torch.autograd.Function):
    @staticmethod
    def forward(x, t, bug):
        return x / t

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.bug = inputs[2]

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved_tensors
        gt = -(g * x).sum() / t**2
        return g / t, gt * (1.1 if ctx.bug else 1.0), None


class Temp(nn.Module):
    def __init__(self, bug):
        super().__init__()
        self.t = nn.Parameter(torch.tensor(1.5))
        self.bug = bug

    def forward(self, x):
        return TempFn.apply(x, self.t, self.bug)


def model(mode, seed, kind):
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(10, 16), nn.Tanh(), FusedLinear(16, 16, mode), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4)
        ).eval()
    if kind == "wide":
        return nn.Sequential(
            nn.Linear(32, 64),
            nn.ReLU(),
            FusedLinear(64, 64, mode),
            nn.SiLU(),
            nn.Linear(64, 64),
            nn.Tanh(),
            nn.Linear(64, 5),
        ).eval()
    if kind == "temp":
        return nn.Sequential(
            nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 6), Temp(mode == "temp*1.1"), nn.Softmax(-1)
        ).eval()


modes = [None] + [bug for bug in LINEAR_WEIGHT_BUGS if bug not in ("scale", "transpose")]  # (those: the zoo's)
warnings.simplefilter("ignore")
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--seeds", type=int, default=30)
seeds = parser.parse_args().seeds
orig = P.ParameterSpace.judge
results = {}
verdicts: dict[bool, dict[tuple[str, str, int], str]] = {True: {}, False: {}}
for screen in (True, False):
    P.ParameterSpace.judge = lambda self, f, *, rtol, floor, screen=False, _s=screen: orig(
        self, f, rtol=rtol, floor=floor, screen=_s and screen
    )
    tallies = collections.defaultdict(collections.Counter)
    for kind in ("mlp", "wide", "temp"):
        for mode in modes if kind != "temp" else [None, "temp*1.1"]:
            for seed in range(seeds):
                m = model(mode, seed, kind)
                x = torch.randn(8, 32 if kind == "wide" else 10, generator=torch.Generator().manual_seed(seed))
                r = probe(m, x, seed=seed)
                tallies[(kind, mode)][str(r.parameter_check.verdict)] += 1
                verdicts[screen][(kind, mode, seed)] = str(r.parameter_check.verdict)
    results[screen] = tallies
print(f"{seeds} seeds per model, parameter-check verdicts: with the screen | without")
for key in results[True]:
    print(f"  {key[0]:5s} {key[1] or 'correct'!s:16s} {dict(results[True][key])!s:45s} | {dict(results[False][key])}")
differ = [k for k in verdicts[True] if verdicts[True][k] != verdicts[False][k]]
print(f"probes whose verdict the screen changed: {len(differ)} of {len(verdicts[True])}", differ[:10])
