"""A bug caught: a hand-written fused activation whose backward is subtly wrong.

``FusedSwish`` computes ``x * sigmoid(x)`` and writes its own backward, as people do for speed. The
buggy version forgets the product rule's second term, ``x * s * (1 - s)``: the model still trains
(the gradient has the right sign most of the time), just worse, and nothing crashes.
``GradProbe(on_alert="stop")`` catches it at the first validation and stops training with the
evidence; ``--fixed`` trains through.

    python examples/bug_caught.py            # stops after the first epoch, says why
    python examples/bug_caught.py --fixed    # trains all epochs
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from digits_cnn import digits_loaders

from lightning_gradprobe import GradProbe, GradProbeStoppingReason


class FusedSwish(torch.autograd.Function):
    """``x * sigmoid(x)`` with a hand-written backward (classic style: no torch.func support)."""

    @staticmethod
    def forward(ctx, x, correct):
        s = torch.sigmoid(x)
        ctx.save_for_backward(x, s)
        ctx.correct = correct
        return x * s

    @staticmethod
    def backward(ctx, grad):
        x, s = ctx.saved_tensors
        derivative = s + x * s * (1 - s) if ctx.correct else s  # the bug: the second term is missing
        return grad * derivative, None


class Swish(nn.Module):
    def __init__(self, correct: bool) -> None:
        super().__init__()
        self.correct = correct

    def forward(self, x):
        return FusedSwish.apply(x, self.correct)


class SwishMLP(pl.LightningModule):
    def __init__(self, correct: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), Swish(correct), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/accuracy", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def main(argv: list[str] | None = None) -> tuple[pl.Trainer, GradProbe]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixed", action="store_true", help="use the correct backward")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*cannot run under torch.func.*")  # expected: a classic autograd.Function
    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders()
    probe = GradProbe(on_alert="stop")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        callbacks=[probe],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(SwishMLP(correct=args.fixed), train, val)
    if probe.stopping_reason is not GradProbeStoppingReason.NOT_STOPPED:
        print(f"\nStopped after epoch {trainer.current_epoch}: {probe.stopping_reason_message}")
        print(f"\nEvidence:\n{probe.last_report}")
    else:
        print(f"\nTrained all {trainer.current_epoch} epochs; gradients checked {probe.probes_done} times, no alert.")
    return trainer, probe


if __name__ == "__main__":
    main()
