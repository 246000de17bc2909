"""Lazy float64 casts (``LazyCast``): the same values as a float64 copy, without one, and the user's tensors never
written."""

import pytest
import torch
from torch import nn

import lightning_gradprobe.core._cast as cast_module
import lightning_gradprobe.core._parameters as parameters_module
from lightning_gradprobe import probe
from lightning_gradprobe.core._cast import LazyCast
from lightning_gradprobe.core._functions import build_parameter_function
from lightning_gradprobe.core._parameters import ParameterSpace


class _Scaled(nn.Module):
    """A layer scale applied in place (timm's ``LayerScale(inplace=True)``): ``x.mul_(gamma)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return x.mul_(self.gamma)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), _Scaled(12), nn.Tanh(), nn.LayerNorm(12), nn.Linear(12, 3)).eval()


def test_lazy_casts_give_the_float64_copy_s_report_bit_for_bit(monkeypatch):
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    eager = probe(_model(), x, localize=True, second_order=True)
    monkeypatch.setattr(cast_module, "LAZY_CAST_BYTES", -1)  # every model casts op by op
    lazy = probe(_model(), x, localize=True, second_order=True)
    assert eager.ok and lazy.ok
    assert lazy.verdicts == eager.verdicts and torch.equal(lazy.margin, eager.margin)
    assert lazy.parameter_check == eager.parameter_check
    assert lazy.second_order is not None and eager.second_order is not None
    assert lazy.second_order.verdicts == eager.second_order.verdicts
    assert lazy.second_order.mixed_margin == eager.second_order.mixed_margin


def test_reading_a_cast_in_place_leaves_it_movable():
    gamma = torch.randn(4)
    lazy = LazyCast(gamma, torch.float64)
    torch.ones(4, dtype=torch.float64).mul_(lazy)  # read by an in-place op on another tensor
    lazy.shift = lambda value: value.add_(1.0)
    assert torch.equal(lazy + 0, gamma.double() + 1)  # the move applies: the cast was not frozen


def test_a_write_never_reaches_the_parameter():
    parameter = torch.randn(3, dtype=torch.float64)
    before = parameter.clone()
    lazy = LazyCast(parameter, torch.float64)  # the same dtype: the cast would alias the parameter
    lazy.add_(1.0)
    assert torch.equal(parameter, before) and torch.equal(lazy + 0, before + 1)


def test_channels_last_weights_keep_their_layout():
    weight = torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last)
    lazy = LazyCast(weight, torch.float64)
    assert lazy.stride() == weight.stride()
    assert torch.equal(lazy.reshape(8, -1) + 0, weight.double().reshape(8, -1))


@pytest.mark.parametrize("lazy", [False, True])
def test_parameter_moves_of_channels_last_weights(monkeypatch, lazy):
    """A big model's moves (directions drawn a chunk at a time) on non-contiguous weights, lazy or copied."""
    monkeypatch.setattr(parameters_module, "_KEPT_DIRECTION_BYTES", 0)
    monkeypatch.setattr(cast_module, "LAZY_CAST_BYTES", -1 if lazy else 1 << 30)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model = model.to(memory_format=torch.channels_last)
    function = build_parameter_function(model, forward=None, output=None)
    space = ParameterSpace(function, torch.float64, torch.Generator().manual_seed(0), 2)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    verdict = space.judge(lambda values: function.call(values, x).pow(2).sum(), rtol=1e-10, floor=1e-6)[0]
    assert verdict.value == "pass"
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


class _PaddedTokens(nn.Module):
    """Token ids through an embedding with a padding row, then a small head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 6, padding_idx=0)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)).mean(1))


@pytest.mark.parametrize("kept", [True, False])
@pytest.mark.parametrize("name", ["padded", "tied", "wrong embedding backward"])
def test_an_embedding_lookup_casts_and_moves_the_rows_it_reads(monkeypatch, kept, name):
    """A lookup in a lazily cast table casts (and moves) the rows it reads alone: the report is the whole cast's,
    bit for bit, with directions kept whole or drawn a chunk at a time, padding rows at rest, tied tables."""
    from zoo import TiedTokenModel, TokenNet

    if not kept:
        monkeypatch.setattr(parameters_module, "_KEPT_DIRECTION_BYTES", 0)
    torch.manual_seed(0)
    model = {"padded": _PaddedTokens, "tied": TiedTokenModel, "wrong embedding backward": lambda: TokenNet(1.1)}[name]()
    vocabulary = model.embed.weight.shape[0]
    ids = torch.randint(0, vocabulary, (6, 5), generator=torch.Generator().manual_seed(2))
    ids[:, -1] = 0  # (the padding row, read by every sample)
    eager = probe(model.eval(), ids, localize=True)
    monkeypatch.setattr(cast_module, "LAZY_CAST_BYTES", -1)  # every model casts op by op
    lookups = []
    whole_rows = LazyCast.rows

    def counted(self, index):
        rows = whole_rows(self, index)
        lookups.append(rows is not None)
        return rows

    monkeypatch.setattr(LazyCast, "rows", counted)
    lazy = probe(model.eval(), ids, localize=True)
    assert any(lookups)  # the rows alone were cast: not the whole table
    assert lazy.verdicts == eager.verdicts and torch.equal(lazy.margin, eager.margin)
    assert lazy.parameter_check == eager.parameter_check
    assert [c.module for c in lazy.culprits] == [c.module for c in eager.culprits]
    expected = "fail" if name == "wrong embedding backward" else "pass"
    assert lazy.parameter_check is not None and lazy.parameter_check.verdict.value == expected
