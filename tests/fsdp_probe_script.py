"""Models probed sharded with FSDP2 (2 gloo processes) and unsharded: each rank's comparisons, as JSON files.

Run:  python tests/fsdp_probe_script.py OUT_DIR ok bad weight attention tokens batchnorm
"""

import copy
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lightning_gradprobe import probe
from lightning_gradprobe.core._sharding import tensor_parallel


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


class ScaledWeightGradLinear(torch.autograd.Function):
    """``x W^T + b`` whose weight gradient is scaled by 1.1 (its input gradient is right)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return x @ weight.t() + bias

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        return g @ weight, 1.1 * g.t() @ x, g.sum(0)


class WeightBugLinear(nn.Linear):
    def forward(self, x):
        return ScaledWeightGradLinear.apply(x, self.weight, self.bias)


class AttentionBlock(nn.Module):
    """``nn.MultiheadAttention`` reads ``out_proj.weight`` without calling ``out_proj``."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + self.attn(x, x, x, need_weights=False)[0])


def build(bug):
    """The model (its units to shard, then the root) and a batch."""
    torch.manual_seed(0)
    if bug == "tokens":  # token ids: probed at the embedding's output; the head tied to the embedding
        embed, head = nn.Embedding(12, 16), nn.Linear(16, 12, bias=False)  # 5 tokens x 12: 60 outputs
        head.weight = embed.weight
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        model = nn.Sequential(embed, layer, head)
        return model, [layer], torch.randint(0, 12, (6, 5), generator=torch.Generator().manual_seed(1))
    if bug == "batchnorm":  # running statistics that differ per process (FSDP does not synchronise buffers)
        model = nn.Sequential(nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh()), nn.Linear(16, 3))
        return model, [model[0]], torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    if bug == "attention":
        model = nn.Sequential(nn.Linear(8, 16), AttentionBlock(), AttentionBlock(), nn.Flatten(), nn.Linear(80, 3))
        return model, [model[1], model[2]], torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(1))
    first = WeightBugLinear(6, 16) if bug == "weight" else nn.Linear(6, 16)
    model = nn.Sequential(
        nn.Sequential(first, Act(bug == "bad")),
        nn.Sequential(nn.Linear(16, 16), nn.GELU()),
        nn.LayerNorm(16),
        nn.Linear(16, 3),
    )
    return model, [model[0], model[1]], torch.randn(6, 6, generator=torch.Generator().manual_seed(1))


def compare(rank, bug, mesh):
    """Probe one model sharded and unsharded; what each probe found, and whether they agree."""
    model, units, x = build(bug)
    ref = copy.deepcopy(model)
    model.eval(), ref.eval()
    if bug == "batchnorm":  # this process's own statistics; the probe computes with rank zero's everywhere
        with torch.no_grad():
            model[0][1].running_mean.add_(0.5 * rank)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    r = probe(model, x, localize=True, seed=3)
    u = probe(ref, x, localize=True, seed=3)
    second = probe(model, x, second_order=True, seed=3, check_samples=2, check_parameters=False).second_order
    second_unsharded = probe(ref, x, second_order=True, seed=3, check_samples=2, check_parameters=False).second_order
    return {
        "bug": bug,
        "rank": rank,
        "same_second_order": second.verdicts == second_unsharded.verdicts
        and second.mixed_term == second_unsharded.mixed_term,
        "mixed_term": None if second.mixed_term is None else second.mixed_term.value,
        "second": str(second),
        "failed": not r.ok,
        "culprits": [c.module for c in r.culprits],
        "same_verdicts": r.verdicts == u.verdicts,
        "same_margins": torch.equal(r.margin, u.margin) and torch.equal(r.relative_error, u.relative_error),
        "same_culprits": r.culprits == u.culprits,
        "parameter_verdict": r.parameter_check.verdict.value,
        "same_parameter_verdict": r.parameter_check.verdict == u.parameter_check.verdict,
        # (FSDP's gathered tensors sit at other addresses: vectorised sums may round in another order)
        "parameter_margins": [r.parameter_check.margin, u.parameter_check.margin],
        "culprit_kinds": [c.kind.value for c in r.culprits],
        "notes": list(r.notes),
        "fd_dtype": str(r.fd_dtype),
    }


def parallelism(mesh):
    """``tensor_parallel()`` of an FSDP2 model and of a tensor-parallel one (``parallelize_module``)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    fsdp, _, _ = build("ok")
    fully_shard(fsdp[0], mesh=mesh)
    fully_shard(fsdp, mesh=mesh)
    tp = parallelize_module(nn.Sequential(nn.Linear(4, 8)), mesh, {"0": ColwiseParallel()})
    return {"fsdp": tensor_parallel(fsdp), "tensor_parallel": tensor_parallel(tp)}


def run(rank, out, bugs, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    found = {"parallelism": parallelism(mesh), "results": [compare(rank, bug, mesh) for bug in bugs]}
    Path(out, f"rank-{rank}.json").write_text(json.dumps(found))
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    torch.multiprocessing.spawn(run, args=(sys.argv[1], sys.argv[2:], port), nprocs=2)
