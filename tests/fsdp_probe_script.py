"""A model probed sharded with FSDP2 (2 gloo processes) and unsharded: prints each rank's comparison as JSON."""

import copy
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lightning_gradprobe import probe


class BadTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y)  # wrong: should be 1 - y**2


class Act(nn.Module):
    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def forward(self, x):
        return BadTanh.apply(x) if self.bad else torch.tanh(x)


def run(rank, bad, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(6, 16), Act(bad)),
        nn.Sequential(nn.Linear(16, 16), nn.GELU()),
        nn.LayerNorm(16),
        nn.Linear(16, 3),
    )
    ref = copy.deepcopy(model)
    for m in model[:2]:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    r = probe(model, x, localize=True, seed=3)
    u = probe(ref, x, localize=True, seed=3, check_parameters=False)
    result = {
        "rank": rank,
        "failed": not r.ok,
        "culprits": [c.module for c in r.culprits],
        "same_verdicts": r.verdicts == u.verdicts,
        "same_margins": torch.equal(r.margin, u.margin) and torch.equal(r.relative_error, u.relative_error),
        "same_culprits": r.culprits == u.culprits,
    }
    print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    torch.multiprocessing.spawn(run, args=(sys.argv[1] == "bad", port), nprocs=2)
