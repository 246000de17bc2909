"""Every kind of input a model takes: several inputs, dicts, masks, token ids, layers, Hugging Face models."""

import warnings

import pytest
import torch
from torch import nn
from zoo import Act, ReLUAct

from lightning_gradprobe import Verdict, probe


class ImageAndMetadata(nn.Module):
    """``forward(image, metadata)``; ``bug`` plants a x1.1 backward in the metadata branch only."""

    def __init__(self, bug: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.meta = nn.Linear(3, 8)
        self.act = Act("scale" if bug else "ok")
        self.head = nn.Linear(4 * 6 * 6 + 8, 2)

    def forward(self, image, metadata):
        features = torch.tanh(self.conv(image)).flatten(1)
        return self.head(torch.cat([features, self.act(self.meta(metadata / 1000))], 1))


def _image_and_metadata(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 1, 8, 8, generator=g), 1000 * torch.randn(6, 3, generator=g)  # scales 1000x apart


@pytest.mark.parametrize("as_dict", [False, True])
def test_two_inputs_each_sized_to_its_own_scale(as_dict):
    torch.manual_seed(0)
    good, bad = ImageAndMetadata(), ImageAndMetadata(bug=True)
    bad.load_state_dict(good.state_dict())
    image, metadata = _image_and_metadata(0)
    inputs = {"image": image, "metadata": metadata} if as_dict else (image, metadata)
    report = probe(good, inputs)
    assert report.verdicts == (Verdict.PASS,) * 6, str(report)
    saliency = report.saliency
    image_grad, meta_grad = (saliency["image"], saliency["metadata"]) if as_dict else saliency
    assert image_grad.shape == image.shape and meta_grad.shape == metadata.shape
    # The metadata gradient is the true one, in the input's own units (compare with plain autograd).
    leaf = metadata.clone().requires_grad_()
    out = good(image, leaf)
    (expected,) = torch.autograd.grad(out.gather(1, out.argmax(1, keepdim=True)).sum(), leaf)
    torch.testing.assert_close(meta_grad, expected, rtol=1e-4, atol=1e-9)
    assert probe(bad, inputs).verdicts == (Verdict.FAIL,) * 6  # a bug in the small-scale branch is not drowned


class MaskedGRU(nn.Module):
    """Token ids, an attention mask that zeroes pads, a GRU; ``kind`` plants a backward bug after the embedding."""

    def __init__(self, kind: str = "ok") -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.encoder = nn.Sequential(nn.Linear(8, 8), Act(kind))
        self.gru = nn.GRU(8, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(self.embed(input_ids)) * attention_mask.unsqueeze(-1)
        out, _ = self.gru(hidden)
        return self.head(out[:, -1])


def _tokens(seed: int, n: int = 6, length: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        mask[i, length - 1 - i % 4 :] = 0  # different pad lengths, so a misaligned mask would show
    return {"input_ids": ids * mask, "attention_mask": mask}


def test_token_model_is_probed_at_its_embedding_without_being_asked():
    torch.manual_seed(0)
    batch = _tokens(0)
    with pytest.warns(RuntimeWarning, match="embedding `embed`"):
        report = probe(MaskedGRU(), batch)
    assert report.layer == "embed" and report.ok, str(report)
    assert report.saliency.shape == (6, 9, 8)
    norm, attribution = report.token_scores["norm"], report.token_scores["grad_x_input"]
    assert norm.shape == attribution.shape == (6, 9)
    pads = batch["attention_mask"] == 0
    assert (norm[pads] == 0).all() and (norm[~pads] > 0).all()  # masked tokens get no gradient, real ones do


@pytest.mark.parametrize("seed", range(5))
def test_wrong_backward_inside_a_token_models_encoder_is_caught_and_named(seed):
    torch.manual_seed(seed)
    good, bad = MaskedGRU(), MaskedGRU("scale")
    bad.load_state_dict(good.state_dict())
    batch = _tokens(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert probe(good, batch, seed=seed).ok
        report = probe(bad, batch, seed=seed, localize=True)
    assert report.verdicts == (Verdict.FAIL,) * 6
    assert report.culprits[0].module == "encoder.1"


def test_layer_by_name_or_module_on_an_image_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(ReLUAct(1.1)), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(5, 1, 8, 8)
    at_output = probe(model, x, layer="0")  # the wrong ReLU backward comes after the layer: seen
    assert at_output.layer == "0" and at_output.verdicts == (Verdict.FAIL,) * 5
    after = probe(model, x, layer=model[1])  # after it: the rest of the model is right
    assert after.layer == "1" and set(after.verdicts) == {Verdict.PASS} and after.saliency.shape == (5, 4, 6, 6)
    # ... but the convolution's weights before it get the wrong ReLU backward's gradient: training sees it
    assert after.parameter_check.verdict is Verdict.FAIL and not after.ok
    with pytest.raises(ValueError, match="not a submodule"):
        probe(model, x, layer="5.weight")


def test_hugging_face_model_zero_config():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    batch = _tokens(0, n=4, length=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = probe(model, batch)  # model(**batch) returns a ModelOutput: its .logits are checked
    assert report.ok and report.layer == "bert.embeddings.word_embeddings", str(report)
    assert report.saliency.shape == (4, 10, 32)


@pytest.mark.parametrize("fill", ["-inf", "lowest"])
def test_hugging_face_token_model_with_a_float_attention_mask_is_probed_at_its_embedding(fill):
    """Token ids beside a 4-D additive mask (the form Hugging Face builds itself): the mask is no input to
    differentiate, the embedding's output is; each sample's padded tokens get exactly no saliency."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(1, 100, (4, 10), generator=torch.Generator().manual_seed(0))
    padded = torch.arange(10) >= torch.tensor([10, 6, 8, 4])[:, None]
    low = float("-inf") if fill == "-inf" else torch.finfo(torch.float32).min
    mask = torch.zeros(4, 1, 1, 10).masked_fill(padded[:, None, None], low)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = probe(model, {"input_ids": ids, "attention_mask": mask})
    assert report.ok and report.layer == "bert.embeddings.word_embeddings", str(report)
    assert (report.saliency[padded] == 0).all() and (report.saliency[~padded] != 0).any(-1).all()


def test_negative_target_counts_from_the_end():
    model = nn.Linear(3, 4)
    x = torch.randn(2, 3)
    torch.testing.assert_close(probe(model, x, target=-1).saliency, probe(model, x, target=3).saliency)
    with pytest.raises(ValueError, match="`target`=-9 is out of range"):
        probe(model, x, target=-9)


def test_integer_inputs_without_an_embedding_get_a_clear_error():
    with pytest.raises(TypeError, match="layer="):
        probe(nn.Linear(3, 2), (torch.arange(6).reshape(2, 3),))


class _ScaledByTimestamp(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, stamp):
        return torch.tanh(self.lin(x)) * (stamp % 7 + 1).unsqueeze(1)


def test_frozen_entries_survive_every_dtype():
    """Integers past float32's exact range, boolean masks, half-precision inputs to a plain callable."""
    torch.manual_seed(0)
    big = probe(_ScaledByTimestamp(), (torch.randn(5, 3), torch.randint(2**30, 2**31, (5,))))
    assert big.ok and big.fd_dtype == torch.float64, str(big)  # judged in float64, stamps exact
    mask = torch.tensor([True, False, True, True])
    masked = probe(lambda x, m: torch.tanh(x) * m.unsqueeze(1), (torch.randn(4, 3, dtype=torch.float64), mask))
    assert masked.ok and masked.saliency[1] is None and (masked.saliency[0][1] == 0).all()
    weights = torch.randn(4, 3)
    half = probe(
        lambda a, b: torch.tanh(a @ weights.to(a.dtype)) * b,
        (torch.randn(6, 4).bfloat16(), torch.rand(6, 3).bfloat16()),
    )
    assert half.model_dtype == torch.bfloat16 and Verdict.FAIL not in half.verdicts, str(half)


def test_frozen_floating_inputs_are_not_differentiated():
    """Probing at a layer, the other floating inputs are held fixed: they neither move nor widen tolerances."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(10, 4), nn.Linear(4, 2)

        def forward(self, ids, image):
            return self.head(self.embed(ids).mean(1)) + 100 * image.mean((1, 2)).unsqueeze(1)

    torch.manual_seed(0)
    report = probe(Mixed(), (torch.randint(0, 10, (3, 6)), torch.randn(3, 5, 5)), layer="embed")
    assert report.ok and report.saliency.shape == (3, 6, 4)
    assert float(report.margin.max()) < 0.1


class MaskedAttention(nn.Module):
    """Self-attention over the tokens a float key-padding mask keeps (0 attended, -inf padded), mean-pooled where
    kept; ``bug`` plants a x1.1 backward after the attention."""

    def __init__(self, bug: bool = False, as_attn_mask: bool = False) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.act, self.head, self.as_attn_mask = Act("scale" if bug else "ok"), nn.Linear(8, 3), as_attn_mask

    def forward(self, x, mask):
        if self.as_attn_mask:  # (N, T) -> (N * heads, T, T), as scaled_dot_product_attention takes it
            square = mask[:, None, :].expand(-1, x.shape[1], -1).repeat_interleave(2, 0)
            attended, _ = self.attention(x, x, x, attn_mask=square)
        else:
            attended, _ = self.attention(x, x, x, key_padding_mask=mask)
        kept = mask.isfinite().to(x.dtype).unsqueeze(-1)
        return self.head(self.act((attended * kept).sum(1) / kept.sum(1)))


def _padded(seed: int, n: int = 6, length: int = 7, fill: float = float("-inf")):
    """Tokens and an additive mask padding each sample to its own length (every sample a different one)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, 8, generator=g)
    lengths = torch.randperm(length - 1, generator=g)[:n] + 2
    mask = torch.zeros(n, length).masked_fill(torch.arange(length) >= lengths[:, None], fill)
    return x, mask


@pytest.mark.parametrize(("as_attn_mask", "fill"), [(False, "-inf"), (True, "-inf"), (False, "lowest")])
def test_additive_masks_travel_with_their_samples_and_are_not_differentiated(as_attn_mask, fill):
    """A float mask of 0 and -inf (or the dtype's lowest value, as Hugging Face fills them) is an input, not data to
    differentiate: each sample gets its own mask back, in every subset and repetition of rows the checks evaluate; a
    wrong backward beside it is still caught (a lowest-value mask differentiated at its scale, 1e38, hid it)."""
    torch.manual_seed(0)
    good, bad = MaskedAttention(as_attn_mask=as_attn_mask).eval(), MaskedAttention(True, as_attn_mask).eval()
    bad.load_state_dict(good.state_dict())
    x, mask = _padded(0, fill=float("-inf") if fill == "-inf" else torch.finfo(torch.float32).min)
    report = probe(good, (x, mask), target="argmax")
    assert report.ok and all(v is Verdict.PASS for v in report.verdicts), str(report)
    assert any("is an additive mask" in note for note in report.notes)
    assert report.saliency[1] is None  # no gradient for the mask
    for i in range(len(x)):  # each sample's saliency is the gradient of its own outputs under its own mask
        leaf = x[i : i + 1].clone().requires_grad_()
        out = good(leaf, mask[i : i + 1])
        (expected,) = torch.autograd.grad(out[0, out[0].argmax()], leaf)
        torch.testing.assert_close(report.saliency[0][i], expected[0])
    caught = probe(bad, (x, mask))
    assert all(v is Verdict.FAIL for v in caught.verdicts), str(caught)


def test_infinite_inputs_get_clear_errors():
    """Masks as the only floating inputs, NaN anywhere, or +inf: nothing to differentiate there, said."""
    x, mask = _padded(1)
    with pytest.raises(ValueError, match="every floating input is an additive mask"):
        probe(lambda m, n: m.nan_to_num().sum(1) + n.sum(1), (mask, mask.clone()))
    with pytest.raises(ValueError, match="NaN/Inf"):
        probe(MaskedAttention(), (x, mask.masked_fill(mask.isinf(), float("nan"))))
    stray = x.flatten(1).clone()
    stray[2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):  # a stray +inf in data is no mask
        probe(lambda a, b: a.sum(1) + b.nan_to_num().sum(1), (x.flatten(1), stray))


class PaddedEncoder(nn.Module):
    """A stock ``nn.TransformerEncoder`` (nested tensors on, as by default) over padded tokens, mean-pooled."""

    def __init__(self, bug: bool = False) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.act, self.encoder, self.head = (
            Act("scale" if bug else "ok"),
            nn.TransformerEncoder(layer, 2),
            nn.Linear(8, 3),
        )

    def forward(self, x, src_key_padding_mask):
        return self.head(self.encoder(self.act(x), src_key_padding_mask=src_key_padding_mask).mean(1))


@pytest.mark.parametrize("as_float", [False, True])
def test_transformer_encoder_nested_tensor_fast_path_is_not_a_second_function(as_float):
    """Without grad, the encoder's nested-tensor path zeroes padded positions that training's graph computes: the
    probe checks the function training differentiates (a correct encoder failed every padded sample), and gives the
    encoder its setting back."""
    torch.manual_seed(1)
    good, bad = PaddedEncoder().eval(), PaddedEncoder(bug=True).eval()
    bad.load_state_dict(good.state_dict())
    x, mask = _padded(2)
    mask = mask if as_float else mask.isinf()
    report = probe(good, (x, mask))
    assert report.ok and all(v is Verdict.PASS for v in report.verdicts), str(report)
    assert good.encoder.use_nested_tensor
    assert all(v is Verdict.FAIL for v in probe(bad, (x, mask)).verdicts)


def test_a_floating_input_shared_by_every_sample_follows_the_reference_into_float64():
    """A causal mask without the batch dimension, beside per-sample tokens: cast with them (it made the float64 copy
    fail, and the check fall back to float32 finite differences)."""

    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

        def forward(self, x, causal):
            return self.head(self.attention(x, x, x, attn_mask=causal)[0].mean(1))

    torch.manual_seed(0)
    x = torch.randn(6, 5, 8)
    causal = torch.full((5, 5), float("-inf")).triu(1)
    report = probe(Causal().eval(), (x, causal))
    assert report.ok and report.fd_dtype == torch.float64 and not any("weaker" in note for note in report.notes)
