"""Tabular regression: scikit-learn's bundled diabetes data, an MLP, named features, explicit thresholds.

Shows the per-feature attribution chart (feature names on the axis) and a samples x features heat
map in TensorBoard, with thresholds set explicitly: alert only if more than a quarter of the probed
patients fail the check, and never on vanishing saliency.

    python examples/tabular_diabetes.py
    tensorboard --logdir runs/diabetes
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_diabetes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradprobe import GradProbe
from lightning_gradprobe.render.summary import summarize


class DiabetesMLP(pl.LightningModule):
    def __init__(self, n_features: int = 10, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(n_features, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).squeeze(1), y)
        self.log("train/mse", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/mse", nn.functional.mse_loss(self(x).squeeze(1), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> GradProbe:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--logdir", default="runs/diabetes")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    pl.seed_everything(0, verbose=False)
    data = load_diabetes(scaled=True)
    x = torch.tensor(data.data, dtype=torch.float32) * 20  # unit-scale features
    y = torch.tensor(data.target, dtype=torch.float32)
    y = (y - y.mean()) / y.std()
    train = DataLoader(TensorDataset(x[:350], y[:350]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[350:], y[350:]), batch_size=128)
    probe = GradProbe(
        num_samples=12,
        target=None,  # a single regression output: compare it whole
        feature_names=list(data.feature_names),
        fail_threshold=0.25,  # alert when more than 3 of the 12 patients fail
        vanishing_threshold=None,
        on_alert="warn",
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=TensorBoardLogger(args.logdir, name=""),
        callbacks=[probe],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
        check_val_every_n_epoch=5,
    )
    trainer.fit(DiabetesMLP(), train, val)
    print(summarize(trainer.logger.log_dir))
    print(f"\nOpen the panels:  tensorboard --logdir {args.logdir}")
    return probe


if __name__ == "__main__":
    main()
