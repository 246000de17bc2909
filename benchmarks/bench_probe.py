"""Engine cost, as ratios against anchors measured side by side in the same process.

CNN (2 conv + BatchNorm + ReLU + max-pool, eval mode), batch 64, 1x28x28 inputs, 10 classes, CPU.
Each method and its anchor are timed alternately; the figure is the ratio of medians.

    (a) per-sample saliency, target "argmax"     vs one batch-sum backward (Captum's Saliency trick)
    (b) full 10-output per-sample Jacobians      vs one forward + ten batch-sum backwards
    (c) a whole probe() with defaults            vs its floor: one batch-sum backward for the saliency
                                                    + two float64 forwards per direction per checked sample
        (defaults compare all 10 outputs as one vector, so they also pay for the 10 backwards of (b);
         (c') with target="argmax" does the floor's own work: one output per sample)
    (d) probe() defaults (parameter gradients checked)   vs probe(check_parameters=False): the parameter check's
                                                            own cost; (d') the same on a small transformer encoder
                                                            (2 layers, d=16: per-call overhead dominates), (d'') on
                                                            one of working size (4 layers, d=128, 64 tokens); (e) on
                                                            randomly initialised Hugging Face models, batch 8 (with
                                                            ``transformers`` installed: BERT d=128 x 4 layers on 32
                                                            tokens, GPT-2 d=64 x 2 on 16, ViT d=64 x 2 on 3x32x32);
                                                            (e') with --released-sizes N, on models of released
                                                            sizes: BERT-mini, ViT-Tiny, DistilGPT-2 (seconds a probe)

Run:  python benchmarks/bench_probe.py [--repeats 15] [--threads 2] [--released-sizes 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import SmallCNN, _transformer

from lightning_gradprobe import jacobians, probe, saliency


def batch_sum_saliency(model, x):
    leaf = x.clone().requires_grad_()
    out = model(leaf)
    picked = out.gather(1, out.argmax(1, keepdim=True)).sum()
    return torch.autograd.grad(picked, leaf)[0]


def forward_plus_ten_backwards(model, x):
    leaf = x.clone().requires_grad_()
    out = model(leaf)
    return [torch.autograd.grad(out[:, m].sum(), leaf, retain_graph=True)[0] for m in range(out.shape[1])]


def probe_floor(model, model64, x, n_directions=4):
    batch_sum_saliency(model, x)
    x64 = x.double()
    with torch.no_grad():
        for _ in range(2 * n_directions):
            model64(x64)  # 2 k float64 forwards of each of the N samples, batched


def hugging_face_models() -> list[tuple[str, torch.nn.Module, object]]:
    """Randomly initialised Hugging Face models of small working configurations, batch 8 (none without the package)."""
    try:
        import transformers
    except ImportError:
        return []
    transformers.logging.set_verbosity_error()
    generator = torch.Generator().manual_seed(0)

    def tokens(length: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 100, (8, length), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    bert = transformers.BertConfig(
        vocab_size=100, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    gpt2 = transformers.GPT2Config(
        vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    vit = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=10,
    )  # fmt: skip
    return [
        ("BERT d=128", transformers.BertForSequenceClassification(bert).eval(), tokens(32)),
        ("GPT-2 d=64", transformers.GPT2LMHeadModel(gpt2).eval(), tokens(16)),
        (
            "ViT d=64",
            transformers.ViTForImageClassification(vit).eval(),
            torch.randn(8, 3, 32, 32, generator=generator),
        ),
    ]


def released_size_models() -> list[tuple[str, torch.nn.Module, object]]:
    """Randomly initialised Hugging Face models at the sizes of released checkpoints, batch 8 (slow: seconds a probe).

    BERT-mini (4 layers, d=256, the 30,522-token vocabulary, 11M parameters) on 64 tokens, ViT-Tiny (12 layers,
    d=192, 224x224, 5.7M) and DistilGPT-2 (6 layers, d=768, the 50,257-token vocabulary tied to its head, 82M) on
    32 tokens: big embedding tables, the lazily cast float64 reference.
    """
    try:
        import transformers
    except ImportError:
        return []
    transformers.logging.set_verbosity_error()
    generator = torch.Generator().manual_seed(0)

    def tokens(vocabulary: int, length: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, vocabulary, (8, length), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    bert = transformers.BertConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, num_labels=3
    )
    vit = transformers.ViTConfig(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, image_size=224,
        patch_size=16, num_labels=1000,
    )  # fmt: skip
    return [
        ("BERT-mini", transformers.BertForSequenceClassification(bert).eval(), tokens(bert.vocab_size, 64)),
        (
            "ViT-Tiny",
            transformers.ViTForImageClassification(vit).eval(),
            torch.randn(8, 3, 224, 224, generator=generator),
        ),
        ("DistilGPT-2", transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=6)).eval(), tokens(50257, 32)),
    ]


def timed(fn, repeats):
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def ratio(method, anchor, repeats):
    a, b = [], []
    for _ in range(repeats):  # alternate, so drift hits both alike
        a += timed(method, 1)
        b += timed(anchor, 1)
    return statistics.median(a) / statistics.median(b), statistics.median(a), statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--released-sizes", type=int, default=0, metavar="REPEATS",
        help="also (e') the parameter check's share on Hugging Face models of released sizes, this many repeats",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="gradprobe:")  # (its notes: token models probed at the embedding)
    torch.manual_seed(0)
    model = SmallCNN(n_classes=10, side=28).eval()
    model64 = SmallCNN(n_classes=10, side=28).double().eval()
    model64.load_state_dict(model.state_dict())
    x = torch.randn(args.batch, 1, 28, 28)
    encoder = _transformer().eval()  # 2 layers, d_model 16, 4 heads, on 16 sequences of 10 tokens
    tokens = torch.randn(16, 10, 16)
    layer = torch.nn.TransformerEncoderLayer(128, 4, 512, dropout=0.1, batch_first=True)
    stack = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
    # 4 layers, d_model 128, 4 heads, on 16 sequences of 64 tokens
    working = torch.nn.Sequential(stack, torch.nn.Flatten(), torch.nn.Linear(64 * 128, 10)).eval()
    sequences = torch.randn(16, 64, 128)

    rows = [
        ("(a) saliency, argmax", lambda: saliency(model, x), lambda: batch_sum_saliency(model, x), 1.2),
        ("(b) 10-output Jacobians", lambda: jacobians(model, x), lambda: forward_plus_ten_backwards(model, x), 1.5),
        ("(c) probe() defaults", lambda: probe(model, x), lambda: probe_floor(model, model64, x), 2.0),
        (
            "(c') probe(target='argmax')",
            lambda: probe(model, x, target="argmax"),
            lambda: probe_floor(model, model64, x),
            2.0,
        ),
        (
            "(d) parameter check's share",
            lambda: probe(model, x),
            lambda: probe(model, x, check_parameters=False),
            1.25,
        ),
        (
            "(d') same, transformer encoder",
            lambda: probe(encoder, tokens),
            lambda: probe(encoder, tokens, check_parameters=False),
            1.25,
        ),
        (
            "(d'') same, working-size encoder",
            lambda: probe(working, sequences),
            lambda: probe(working, sequences, check_parameters=False),
            1.25,
        ),
    ]
    for label, network, inputs in hugging_face_models():  # (names of their own: the rows above read model, x)
        rows.append(
            (
                f"(e) same, {label}",
                lambda m=network, b=inputs: probe(m, b),
                lambda m=network, b=inputs: probe(m, b, check_parameters=False),
                1.25,
            )
        )
    released = released_size_models() if args.released_sizes else []
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, medians of {args.repeats}")
    print(f"{'method':34s} {'ratio':>7s} {'target':>7s} {'method ms':>10s} {'anchor ms':>10s}")
    for name, method, anchor, target in rows:
        r, m, a = ratio(method, anchor, args.repeats)
        print(f"{name:34s} {r:7.2f} {'<=' + str(target):>7s} {m * 1e3:10.1f} {a * 1e3:10.1f}", flush=True)
    for label, network, inputs in released:  # medians of --released-sizes repeats
        r, m, a = ratio(
            lambda m=network, b=inputs: probe(m, b),
            lambda m=network, b=inputs: probe(m, b, check_parameters=False),
            args.released_sizes,
        )
        name = "(e') same, " + label
        print(f"{name:34s} {r:7.2f} {'<=1.25':>7s} {m * 1e3:10.1f} {a * 1e3:10.1f}", flush=True)


if __name__ == "__main__":
    main()
