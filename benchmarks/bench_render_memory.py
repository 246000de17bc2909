"""Resident memory over 1000 rendered probes (figures must be closed): prints growth per probe.

Run:  python benchmarks/bench_render_memory.py [--probes 1000]
"""

import argparse
import gc
import tempfile
import time

import torch
from torch.utils.tensorboard import SummaryWriter

from lightning_gradprobe import probe
from lightning_gradprobe.render import log_probe


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", type=int, default=1000)
    args = parser.parse_args()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x = torch.randn(8, 1, 8, 8)
    report = probe(model, x)
    with tempfile.TemporaryDirectory() as logdir:
        writer = SummaryWriter(logdir)
        for step in range(50):
            log_probe(writer, report, x, [], step)
        gc.collect()
        start, begin = rss(), time.perf_counter()
        marks = []
        for step in range(args.probes):
            log_probe(writer, report, x, [], 50 + step)
            if (step + 1) % (args.probes // 4) == 0:
                gc.collect()
                marks.append((step + 1, (rss() - start) / 2**20))
        writer.close()
    for probes, grown in marks:
        print(f"after {probes:5d} probes: resident memory {grown:+.1f} MiB")
    print(f"{(time.perf_counter() - begin) / args.probes * 1e3:.1f} ms per rendered probe (8 samples, 8x8 images)")


if __name__ == "__main__":
    main()
