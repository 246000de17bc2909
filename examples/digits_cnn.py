"""Digits CNN: the main demo.

Trains a small CNN on scikit-learn's bundled 8x8 digits (no download) with ``GradProbe()`` at its
defaults and a TensorBoardLogger. Every epoch, 8 validation digits are probed: their input gradients
checked against float64 finite differences, their saliency drawn. At the end it prints the terminal
summary and the line that opens the panels.

    python examples/digits_cnn.py              # well under a minute on 2 CPU cores
    tensorboard --logdir runs/digits
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradprobe import GradProbe
from lightning_gradprobe.render.summary import summarize


class DigitsCNN(pl.LightningModule):
    def __init__(self, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(32 * 16, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.log("val/accuracy", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def digits_loaders(n: int | None = None, batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """The bundled digits, scaled to [0, 1], split 80/20 in a fixed order."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order][:n], y[order][:n]
    split = int(0.8 * len(x))
    train = DataLoader(TensorDataset(x[:split], y[:split]), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x[split:], y[split:]), batch_size=256)
    return train, val


def make_trainer(logdir: str, epochs: int, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(logdir, name="", version=None),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


def main(argv: list[str] | None = None) -> GradProbe:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--samples", type=int, default=None, help="use only this many digits (smoke tests)")
    parser.add_argument("--logdir", default="runs/digits")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders(args.samples)
    probe = GradProbe()  # defaults: 8 validation digits, every epoch, target = predicted class, warn on alerts
    trainer = make_trainer(args.logdir, args.epochs, [probe])
    trainer.fit(DigitsCNN(), train, val)
    print(summarize(trainer.logger.log_dir))
    print(f"\nlast probe:\n{probe.last_report}")
    print(f"\nOpen the panels:  tensorboard --logdir {args.logdir}")
    return probe


if __name__ == "__main__":
    main()
