"""Sharded training (FSDP2) on 2 CPU processes, probed: a wrong fused RMSNorm backward stops every process.

The model is a small residual MLP whose blocks are sharded with ``fully_shard`` in ``configure_model``, as
Lightning's ``ModelParallelStrategy`` expects. Each block normalises with ``FusedRMSNorm``, a hand-written
``autograd.Function`` as fused kernels are; the buggy one forgets the normalisation's own term in its backward
(``- x * mean(g * x) / rms^3``). ``GradProbe(on_alert="stop")`` probes the sharded model layer by layer (each
process holds only what FSDP's own gather holds), every process on the same samples, and stops them all with the
culprit named; ``--fixed`` trains through.

    python examples/sharded_fsdp2.py            # stops at the first validation, names the culprit
    python examples/sharded_fsdp2.py --fixed    # trains all epochs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradprobe import GradProbe


class FusedRMSNorm(torch.autograd.Function):
    """``x / rms(x)`` over the last dimension, with a hand-written backward."""

    @staticmethod
    def forward(ctx, x, correct):
        rms = x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        ctx.save_for_backward(x, rms)
        ctx.correct = correct
        return x / rms

    @staticmethod
    def backward(ctx, grad):
        x, rms = ctx.saved_tensors
        grad_x = grad / rms
        if ctx.correct:
            grad_x = grad_x - x * (grad * x).mean(-1, keepdim=True) / rms**3
        return grad_x, None


class RMSNorm(nn.Module):
    def __init__(self, width: int, correct: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.correct = correct

    def forward(self, x):
        return FusedRMSNorm.apply(x, self.correct) * self.weight


class Block(nn.Module):
    def __init__(self, width: int, correct: bool) -> None:
        super().__init__()
        self.norm = RMSNorm(width, correct)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class ShardedClassifier(pl.LightningModule):
    def __init__(self, correct: bool, width: int = 32, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(16, width)
        self.blocks = nn.ModuleList(Block(width, correct) for _ in range(blocks))
        self.head = nn.Linear(width, 4)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def loaders(n: int = 512, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Four classes in 16 features, made by a fixed random teacher."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=generator)
    y = (x @ torch.randn(16, 4, generator=generator)).argmax(1)
    train, val = TensorDataset(x[: n // 2], y[: n // 2]), TensorDataset(x[n // 2 :], y[n // 2 :])
    return DataLoader(train, batch_size=32), DataLoader(val, batch_size=64)


def fit(correct: bool, probe: bool, epochs: int, root: Path) -> dict:
    """One fit on 2 CPU processes; what each process saw."""
    pl.seed_everything(0, verbose=False)
    model = ShardedClassifier(correct)
    callbacks = [GradProbe(on_alert="stop", num_samples=8)] if probe else []
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=epochs,
        callbacks=callbacks,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    train, val = loaders()
    trainer.fit(model, train, val)
    whole = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for p in model.parameters()]
    callback = callbacks[0] if callbacks else None
    return {
        "rank": trainer.global_rank,
        "epochs_run": trainer.current_epoch,
        "stopped": trainer.should_stop,
        "reason": callback.stopping_reason_message if callback else None,
        "culprits": sorted({c.module for a in callback.alerts for c in a.culprits}) if callback else [],
        "metrics": sorted(k for k in trainer.callback_metrics if k.startswith("gradprobe/")),
        "weights": hashlib.sha256(b"".join(w.cpu().numpy().tobytes() for w in whole)).hexdigest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixed", action="store_true", help="the correct backward: trains through")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--root", type=Path, default=Path("lightning_logs_fsdp2"))
    parser.add_argument(
        "--compare", action="store_true", help="also fit without GradProbe and say whether the weights are equal"
    )
    parser.add_argument("--json", type=Path, help="write what each process saw to JSON-<rank>.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(1)
    seen = fit(args.fixed, True, args.epochs, args.root)
    if args.compare:
        seen["weights_without_probe"] = fit(args.fixed, False, args.epochs, args.root)["weights"]
    if args.json is not None:
        Path(f"{args.json}-{seen['rank']}.json").write_text(json.dumps(seen))
    if seen["rank"] == 0:
        if seen["stopped"]:
            print(f"stopped after epoch {seen['epochs_run']}: {seen['reason']}")
        else:
            print(f"trained {seen['epochs_run']} epochs; logged {', '.join(seen['metrics'][:4])}, ...")
        if args.compare:
            same = seen["weights"] == seen["weights_without_probe"]
            print("weights equal, bit for bit, to a fit without GradProbe:", same)


if __name__ == "__main__":
    main()
