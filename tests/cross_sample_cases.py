"""Batch-mixing kernels: backwards that reduce over the batch axis while their forwards keep samples apart,
beside forwards that really mix samples, with backwards that see it or are blind to it. Shared by the tests and
``benchmarks/bench_cross_sample.py``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class RmsBatchMean(torch.autograd.Function):
    """Per-sample RMS scaling; the backward averages over the whole batch (the issue's reproducer)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        r = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return g / r - x * (g * x).mean() / r**3  # bug: .mean() over everything, batch included


class SoftmaxBatchSum(torch.autograd.Function):
    """Softmax whose backward sums ``g . y`` over the batch axis too."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.softmax(x, -1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return y * (g - (g * y).sum(0, keepdim=True).sum(-1, keepdim=True) / y.shape[0])


class LayerNormBatchStats(torch.autograd.Function):
    """Layer norm whose backward takes one of its means over the batch as well."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True, unbiased=False) + 1e-5)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = x.std(-1, keepdim=True, unbiased=False) + 1e-5
        xh = (x - x.mean(-1, keepdim=True)) / s
        return (g - g.mean(-1, keepdim=True) - xh * (g * xh).mean((0, -1), keepdim=True)) / s


class Apply(nn.Module):
    def __init__(self, function: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function.apply(x)


class BatchCentering(nn.Module):
    """A forward that really mixes samples: each sample minus the batch mean."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


class ConstantStatistics(torch.autograd.Function):
    """Normalisation by the batch's own statistics whose backward treats them as constants (no cross terms)."""

    @staticmethod
    def forward(ctx, x):
        spread = x.std(0, keepdim=True) + 1e-5
        ctx.save_for_backward(spread)
        return (x - x.mean(0, keepdim=True)) / spread

    @staticmethod
    def backward(ctx, g):
        (spread,) = ctx.saved_tensors
        return g / spread  # bug: the mean and the spread depend on every sample


class DetachedCentering(nn.Module):
    """Each sample minus the batch mean, the mean detached: a stray ``.detach()`` on a batch statistic."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True).detach()


def mixing_backwards() -> dict[str, Callable[[], nn.Module]]:
    """Models whose forward keeps samples apart and whose backward mixes them: every sample must fail."""
    return {
        "rms-backward-batch-mean": lambda: nn.Sequential(nn.Linear(10, 12), Apply(RmsBatchMean), nn.Linear(12, 3)),
        "softmax-backward-batch-sum": lambda: nn.Sequential(
            nn.Linear(10, 12), Apply(SoftmaxBatchSum), nn.Linear(12, 3)
        ),
        "layernorm-backward-batch-mean": lambda: nn.Sequential(
            nn.Linear(10, 12), Apply(LayerNormBatchStats), nn.Linear(12, 3)
        ),
    }


def mixing_forwards() -> dict[str, Callable[[], nn.Module]]:
    """Models whose forward really mixes samples: leaking pairs, every sample inconclusive."""
    return {"batch-centering": lambda: nn.Sequential(nn.Linear(10, 12), BatchCentering(), nn.Tanh(), nn.Linear(12, 3))}


def blind_backwards() -> dict[str, Callable[[], nn.Module]]:
    """Models whose forward really mixes samples and whose backward claims no cross-sample gradient at all."""
    return {
        "batch-statistics-as-constants": lambda: nn.Sequential(
            nn.Linear(10, 12), Apply(ConstantStatistics), nn.Tanh(), nn.Linear(12, 3)
        ),
        "detached-batch-mean": lambda: nn.Sequential(
            nn.Linear(10, 12), DetachedCentering(), nn.Tanh(), nn.Linear(12, 3)
        ),
    }
