"""Rendering cost per probe, by input kind, and resident memory over many rendered probes.

Each kind's pictures are written with ``log_probe`` to a real ``SummaryWriter`` (PNG encoding and the event file
included), 8 samples per probe: digits-sized images, diabetes-sized tables, sequences, tokens, and a 5-D input.
The figure is the median time of one rendered probe; the memory line is the resident-set change over the image
kind's repeated probes after a warm-up (a picture that leaks grows it with every probe).

Run:  python benchmarks/bench_render.py [--probes 200]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lightning_gradprobe import probe
from lightning_gradprobe.render import log_probe


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        return self.head((self.embedding(input_ids) * attention_mask[..., None]).mean(1))


def cases() -> dict[str, tuple[nn.Module, object]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (8, 16), generator=generator)
    mask = torch.ones_like(ids)
    mask[:, 12:] = 0
    return {
        "image 1x8x8": (nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), torch.rand(8, 1, 8, 8, generator=generator)),
        "image 3x32x32": (
            nn.Sequential(nn.Flatten(), nn.Linear(3072, 10)),
            torch.rand(8, 3, 32, 32, generator=generator),
        ),
        "tabular 10": (
            nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1)),
            torch.randn(8, 10, generator=generator),
        ),
        "sequence 20x5": (nn.Sequential(nn.Flatten(), nn.Linear(100, 3)), torch.randn(8, 20, 5, generator=generator)),
        "tokens 16": (TokenModel(), {"input_ids": ids, "attention_mask": mask}),
        "other 2x3x4x5": (
            nn.Sequential(nn.Flatten(), nn.Linear(120, 3)),
            torch.randn(8, 2, 3, 4, 5, generator=generator),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as logdir:
        writer = SummaryWriter(logdir)
        for name, (model, x) in cases().items():
            report = probe(model, x, check_parameters=False)
            for step in range(10):  # warm-up: imports, fonts, colour tables
                log_probe(writer, report, x, [], step)
            gc.collect()
            start, times = rss(), []
            for step in range(args.probes):
                begin = time.perf_counter()
                log_probe(writer, report, x, [], 10 + step)
                times.append(time.perf_counter() - begin)
            gc.collect()
            grown = (rss() - start) / 2**20
            print(
                f"{name:15s} {statistics.median(times) * 1e3:6.1f} ms per rendered probe   "
                f"resident memory {grown:+.1f} MiB over {args.probes} probes"
            )
        writer.close()


if __name__ == "__main__":
    main()
