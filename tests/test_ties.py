"""A float32/float64 difference from a discrete choice flipping at a near-tie is a tie, not precision."""

from __future__ import annotations

import collections

import torch
from torch import nn

from lightning_gradprobe import Verdict, probe


class TopKTokens(nn.Module):
    """Mean of the k tokens with the largest score: a choice that a near-tie can flip."""

    def __init__(self, k: int = 2, scale: float = 1.0) -> None:
        super().__init__()
        self.k, self.scale = k, scale

    def forward(self, x):
        chosen = x.sum(-1).topk(self.k, dim=1).indices[..., None].expand(-1, -1, x.shape[-1])
        return _ScaledGather.apply(x, chosen, self.scale).mean(1)


class _ScaledGather(torch.autograd.Function):
    @staticmethod
    def forward(x, index, scale):
        return torch.gather(x, 1, index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, index, scale = inputs
        ctx.save_for_backward(index)
        ctx.shape, ctx.scale = x.shape, scale

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        out = torch.zeros(ctx.shape, dtype=grad.dtype, device=grad.device).scatter_add(1, index, grad)
        return out * ctx.scale, None, None


def _model(scale: float = 1.0) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), TopKTokens(scale=scale), nn.Linear(8, 3)).eval()


def _repeated_tokens(seed: int) -> torch.Tensor:
    base = torch.randn(8, 3, 6, generator=torch.Generator().manual_seed(seed))
    return torch.cat([base, base[:, :1], base[:, 1:2]], 1)  # tokens 0 and 1 appear twice: near-ties


def test_top_k_over_repeated_tokens_is_a_tie_not_precision():
    verdicts: collections.Counter[Verdict] = collections.Counter()
    for seed in range(12):
        torch.manual_seed(seed)
        report = probe(_model(), _repeated_tokens(seed), seed=seed)
        verdicts.update(report.verdicts)
        named = any(note.startswith("a tie, not precision") for note in report.notes)
        assert named == (Verdict.INCONCLUSIVE in report.verdicts), str(report)  # every tie is named, and only ties
    assert verdicts[Verdict.PRECISION_LIMITED] == 0 and verdicts[Verdict.FAIL] == 0
    assert verdicts[Verdict.INCONCLUSIVE] > 0  # the near-ties are there (about one sample in ten)
    assert verdicts[Verdict.PASS] >= 0.75 * sum(verdicts.values())


def test_a_wrong_backward_through_the_same_choice_still_fails():
    for seed in range(4):
        torch.manual_seed(seed)
        report = probe(_model(scale=1.1), _repeated_tokens(seed), seed=seed)
        assert report.counts["fail"] >= 6, str(report)
