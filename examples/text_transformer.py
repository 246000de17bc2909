"""A token model: a small, randomly initialised Hugging Face BERT on a synthetic text task, no download.

The task: does the sentence contain the word "seven"? Batches are Hugging Face-style dicts
(``input_ids``, ``attention_mask``, ``labels``); ``GradProbe()`` needs no configuration: it passes the entries the
module's ``forward`` takes, finds the word embedding that consumes the ids, probes at its output, checks the
``.logits``, and draws a token heat map in TensorBoard (pads greyed, words named by ``tokens=``).

    python examples/text_transformer.py            # then: tensorboard --logdir runs/text
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import BertConfig, BertForSequenceClassification

from lightning_gradprobe import GradProbe
from lightning_gradprobe.render.summary import summarize

WORDS = ["[PAD]", "seven", *[f"word{i}" for i in range(2, 60)]]


class Sentences(Dataset):
    """Random sentences of 4-12 words; label 1 when "seven" occurs."""

    def __init__(self, n: int, seed: int, length: int = 12) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, len(WORDS), (n, length), generator=g)
        lengths = torch.randint(4, length + 1, (n,), generator=g)
        self.mask = (torch.arange(length)[None] < lengths[:, None]).long()
        self.labels = torch.randint(0, 2, (n,), generator=g)
        where = (torch.rand(n, generator=g) * (lengths - 1)).long()
        self.ids[self.labels == 1, where[self.labels == 1]] = 1
        self.ids *= self.mask

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class TextClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = BertConfig(
            vocab_size=len(WORDS),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=16,
            num_labels=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.bert = BertForSequenceClassification(config)

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask)  # a ModelOutput with .logits

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(
            self(batch["input_ids"], batch["attention_mask"]).logits, batch["labels"]
        )
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        self.log("val/accuracy", (logits.argmax(1) == batch["labels"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main(argv: list[str] | None = None) -> tuple[pl.Trainer, GradProbe]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--samples", type=int, default=512, help="training sentences")
    parser.add_argument("--logdir", default="runs/text")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*token model: probed at the output.*")  # said once: expected here
    pl.seed_everything(0, verbose=False)
    probe = GradProbe(tokens=lambda ids: [WORDS[i] for i in ids])
    logger = pl.loggers.TensorBoardLogger(args.logdir, name="")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=[probe],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    train = DataLoader(Sentences(args.samples, seed=0), batch_size=32, shuffle=True)
    val = DataLoader(Sentences(128, seed=1), batch_size=32)
    trainer.fit(TextClassifier(), train, val)
    print(f"\n{summarize(logger.log_dir)}")
    print(f"\nprobed at: {probe.last_report.layer}\nOpen the panels:  tensorboard --logdir {args.logdir}")
    return trainer, probe


if __name__ == "__main__":
    main()
