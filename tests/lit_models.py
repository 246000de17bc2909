"""Small real LightningModules and data for callback tests (scikit-learn's bundled digits)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from zoo import FusedLinear, TanhFunction


class NetModule(pl.LightningModule):
    """Any classifier ``net`` trained with cross-entropy and plain SGD: batches are ``(x, y)``."""

    def __init__(self, net: nn.Module, lr: float = 0.1) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def digits(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return (x[:n], y[:n]) if n else (x, y)


class DictDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


class Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        yield from zip(self.x, self.y, strict=True)


class DigitsModule(pl.LightningModule):
    """A small CNN with BatchNorm and Dropout; ``bug`` plants a wrong backward in its activation, ``weight_bug`` a
    wrong weight gradient in its first linear layer."""

    def __init__(
        self,
        bug: str = "ok",
        batch: str = "tuple",
        n_train: int = 256,
        n_val: int = 100,
        val_loaders: int = 1,
        batch_size: int = 32,
        lr: float = 0.05,
        leak: bool | str = False,
        weight_bug: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.drop = nn.Dropout(0.2)
        # ``weight_bug`` ("scale", "transpose"): a hand-written linear whose weight gradient alone is wrong.
        self.fc1 = FusedLinear(8 * 16, 32, weight_bug) if weight_bug else nn.Linear(8 * 16, 32)
        self.fc2 = nn.Linear(32, 10)
        self.train_losses: list[float] = []

    def forward(self, x):
        h = self.drop(self.conv(x).flatten(1))
        h = TanhFunction.apply(self.fc1(h), self.hparams.bug)
        if self.hparams.leak:  # mixes neighbouring samples: a batch-dimension bug ("blind": its backward drops it)
            rolled = h.roll(1, dims=0)
            h = h + 0.1 * (rolled.detach() if self.hparams.leak == "blind" else rolled)
        return self.fc2(h)

    def _xy(self, batch):
        if isinstance(batch, dict):
            return batch["image"], batch["label"]
        return batch[0], batch[1]

    def training_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        loss = nn.functional.cross_entropy(self(x), y)
        self.train_losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = self._xy(batch)
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    test_step = validation_step

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def _loader(self, x, y, shuffle):
        kind = self.hparams.batch
        size = self.hparams.batch_size
        if kind == "dict":
            return DataLoader(DictDataset(x, y), batch_size=size, shuffle=shuffle)
        if kind == "iterable":
            return DataLoader(Stream(x, y), batch_size=size)
        if kind == "tensor":
            return DataLoader(
                TensorDataset(x), batch_size=size, shuffle=shuffle, collate_fn=lambda b: torch.stack([r[0] for r in b])
            )
        return DataLoader(TensorDataset(x, y), batch_size=size, shuffle=shuffle)

    def train_dataloader(self):
        x, y = digits(self.hparams.n_train + self.hparams.n_val)
        n = self.hparams.n_train
        if self.hparams.batch == "tensor":
            return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=self.hparams.batch_size, shuffle=True)
        return self._loader(x[:n], y[:n], shuffle=True)

    def val_dataloader(self):
        x, y = digits(self.hparams.n_train + self.hparams.n_val)
        x, y = x[self.hparams.n_train :], y[self.hparams.n_train :]
        loaders = [self._loader(x, y, shuffle=False) for _ in range(self.hparams.val_loaders)]
        return loaders[0] if len(loaders) == 1 else loaders

    test_dataloader = val_dataloader


class TensorBatchModule(DigitsModule):
    """Validation batches are bare tensors (no labels)."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val_mean", self(batch).mean())


def trainer(tmp_path, callbacks=(), **kwargs) -> pl.Trainer:
    options = dict(
        default_root_dir=tmp_path,
        max_epochs=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)
