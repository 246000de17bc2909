"""Peak extra memory of a probe against a training step of the same model, as the model grows.

The models are MLPs of ``blocks`` blocks ``d -> 4d -> d`` with GELU (float32), batch 8, one thread. Each figure is
measured in a fresh process: the resident set after building the model, then the process's peak resident set
after one call (``VmHWM``); the difference is what that call needed beyond the model. The process has
imported ``torch._dynamo`` first, as every process that imports Lightning has (a standalone first ``probe()``
imports it, about 90 MiB once). A training step is a
forward, cross-entropy and a backward that fills ``.grad``; a probe is ``probe(model, x)`` at its defaults, and
again without the parameter check. Writes ``docs/memory.png`` (the growth as a curve) with ``--plot``.

With ``--sharded``, the same on 2 processes (gloo, CPU) with every block sharded by FSDP2's ``fully_shard``: the
peak extra memory *per process* of a sharded training step and of a sharded probe (every process probes the same
samples in lockstep), and their times. Against the whole model's size it says whether any process ever held the
whole model (or its float64 copy).

Run:  python benchmarks/bench_memory.py [--sizes 50 200 400] [--plot] [--sharded 50]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

SIZES = {50: (1024, 6), 200: (2048, 6), 400: (2048, 12)}  # millions of parameters: (width d, blocks)

CHILD = r"""
import json, sys, time
import torch
from torch import nn
torch.set_num_threads(1)
width, blocks, what = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
import lightning_gradprobe
import torch._dynamo  # as `import lightning` does (the probe's Python dispatch needs it): ~90 MiB once

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

def peak_resident():  # (VmHWM: this process image's own peak; ru_maxrss keeps the launching process's from before exec)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

torch.manual_seed(0)
layers = []
for _ in range(blocks):
    layers += [nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)]
model = nn.Sequential(*layers, nn.Linear(width, 10)).eval()
x, y = torch.randn(8, width), torch.randint(0, 10, (8,))
parameters = sum(p.numel() for p in model.parameters())
before, start = resident(), time.perf_counter()
if what == "training step":
    nn.functional.cross_entropy(model.train()(x), y).backward()
else:
    report = lightning_gradprobe.probe(model, x, check_parameters=what == "probe")
    assert report.ok, report
peak = peak_resident()
print(json.dumps({"parameters": parameters, "extra": peak - before, "seconds": time.perf_counter() - start}))
"""

KINDS = ("training step", "probe", "probe without the parameter check")

SHARDED_CHILD = r"""
import json, os, socket, sys, time
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
width, blocks, what, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

def peak_resident():  # (VmHWM: this process image's own peak; ru_maxrss keeps the launching process's from before exec)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

def run(rank):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import lightning_gradprobe
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = nn.Sequential(
        *[nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)) for _ in range(blocks)],
        nn.Linear(width, 10),
    )
    parameters = sum(p.numel() for p in model.parameters())
    for block in model[:-1]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, y = torch.randn(8, width), torch.randint(0, 10, (8,))
    dist.barrier()
    before, start = resident(), time.perf_counter()
    if what == "training step":
        nn.functional.cross_entropy(model(x), y).backward()
    else:
        report = lightning_gradprobe.probe(model.eval(), x)
        assert report.ok, report
    seconds = time.perf_counter() - start
    peak = peak_resident()
    extra = torch.tensor([float(peak - before)])
    gathered = [torch.zeros(1) for _ in range(2)]
    dist.all_gather(gathered, extra)
    if rank == 0:
        print(json.dumps({"parameters": parameters, "extra": max(float(t) for t in gathered), "seconds": seconds}))
    dist.destroy_process_group()

torch.multiprocessing.start_processes(run, nprocs=2, start_method="fork")
"""


def measure(width: int, blocks: int, kind: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(width), str(blocks), kind], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_sharded(width: int, blocks: int, kind: str) -> dict[str, float]:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-c", SHARDED_CHILD, str(width), str(blocks), kind, str(port)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def sharded(sizes: list[int]) -> None:
    """The sharded figures: per process, 2 processes, FSDP2."""
    print("\nFSDP2, 2 processes (gloo, CPU), peak extra memory of the larger process:")
    print(
        f"{'parameters':>11s} {'model MiB':>10s} {'shard MiB':>10s} "
        + " ".join(f"{k + ' MiB (s)':>26s}" for k in KINDS[:2])
    )
    for size in sizes:
        width, blocks = SIZES[size]
        figures = {kind: measure_sharded(width, blocks, kind) for kind in KINDS[:2]}
        parameters = figures["probe"]["parameters"]
        model = parameters * 4 / 2**20
        cells = " ".join(f"{f['extra'] / 2**20:>17.0f} ({f['seconds']:5.1f})" for f in figures.values())
        step, probed = figures["training step"], figures["probe"]
        print(
            f"{parameters / 1e6:>10.0f}M {model:>10.0f} {model / 2:>10.0f} {cells}   probe / step "
            f"{probed['extra'] / step['extra']:.2f} memory, {probed['seconds'] / step['seconds']:.1f} time"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--plot", action="store_true", help="write docs/memory.png")
    parser.add_argument("--sharded", type=int, nargs="*", choices=list(SIZES), help="also on 2 FSDP2 processes")
    args = parser.parse_args()
    rows = []
    print(f"{'parameters':>11s} {'model MiB':>10s} " + " ".join(f"{k + ' MiB (s)':>34s}" for k in KINDS))
    for size in args.sizes:
        width, blocks = SIZES[size]
        figures = {kind: measure(width, blocks, kind) for kind in KINDS}
        parameters = figures["probe"]["parameters"]
        model = parameters * 4 / 2**20
        cells = " ".join(f"{f['extra'] / 2**20:>25.0f} ({f['seconds']:5.1f})" for f in figures.values())
        step = figures["training step"]["extra"]
        print(
            f"{parameters / 1e6:>10.0f}M {model:>10.0f} {cells}   probe / step {figures['probe']['extra'] / step:.2f}"
        )
        rows.append((parameters, model, figures))
    if args.plot:
        _plot(rows)
    if args.sharded:
        sharded(args.sharded)


def _plot(rows: list) -> None:
    import matplotlib  # a benchmark's own figure: not a dependency of the package

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(6, 4))
    millions = [parameters / 1e6 for parameters, _, _ in rows]
    for kind in KINDS:
        axis.plot(millions, [f[kind]["extra"] / 2**30 for _, _, f in rows], marker="o", label=kind)
    axis.plot(millions, [model / 1024 for _, model, _ in rows], linestyle="--", color="grey", label="the model itself")
    axis.set_xlabel("parameters (millions), float32 MLP, batch 8")
    axis.set_ylabel("peak memory beyond the model (GiB)")
    axis.legend()
    axis.grid(alpha=0.3)
    path = Path(__file__).resolve().parents[1] / "docs" / "memory.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
