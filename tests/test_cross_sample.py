"""Finite differences across samples tell a backward that mixes samples from a forward that does."""

from __future__ import annotations

import warnings

import pytest
import torch
from cross_sample_cases import Apply, RmsBatchMean, mixing_backwards, mixing_forwards
from torch import nn

from lightning_gradprobe import Verdict, probe


def test_the_reported_reproducer_fails_every_sample_without_an_invented_forward_leak():
    torch.manual_seed(1151)
    model = nn.Sequential(nn.Linear(10, 12), Apply(RmsBatchMean), nn.Linear(12, 3)).eval()
    x = torch.randn(8, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = probe(model, x, seed=151)
    assert report.verdicts == (Verdict.FAIL,) * 8
    assert report.leaking_pairs == () and report.batch_independent is True and report.mixing_pairs
    # The forward really keeps samples apart: moving sample 6 moves only output 6, by exactly 0.0 elsewhere.
    with torch.no_grad():
        base = model.double()(x.double())
        moved = x.double().clone()
        moved[6] += 1e-3
        change = (model(moved) - base).abs().sum(1)
    assert change[6] > 0 and bool((change[torch.arange(8) != 6] == 0).all())


@pytest.mark.parametrize("name", sorted(mixing_backwards()))
def test_mixing_backwards_fail_on_every_sample(name):
    for seed in range(5):
        torch.manual_seed(seed)
        report = probe(mixing_backwards()[name]().eval(), torch.randn(8, 10), seed=seed)
        assert report.verdicts == (Verdict.FAIL,) * 8 and report.leaking_pairs == (), (seed, str(report))


def test_a_forward_that_mixes_samples_is_still_found():
    for seed in range(5):
        torch.manual_seed(seed)
        report = probe(mixing_forwards()["batch-centering"]().eval(), torch.randn(8, 10), seed=seed)
        assert report.batch_independent is False and len(report.leaking_pairs) == 8 * 7
        assert report.verdicts == (Verdict.INCONCLUSIVE,) * 8
