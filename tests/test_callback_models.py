"""Every kind of model a Lightning user trains, with GradProbe() and no configuration: real Trainer runs."""

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lit_models import digits, trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from zoo import Act

from lightning_gradprobe import GradProbe, GradProbeSetupError, GradProbeStoppingReason, Verdict


class Rows(Dataset):
    """Dict rows, as Hugging Face datasets yield them."""

    def __init__(self, **columns):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


class Base(pl.LightningModule):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)

    def _loss(self, logits, labels):
        loss = nn.functional.cross_entropy(logits, labels)
        self.log("loss", loss)
        return loss


class PixelValuesModule(Base):
    """A Hugging Face-style image model: ``forward(pixel_values)``, batches ``{"pixel_values", "labels"}``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, pixel_values):
        return self.net(pixel_values)

    def training_step(self, batch, batch_idx):
        return self._loss(self(batch["pixel_values"]), batch["labels"])

    def validation_step(self, batch, batch_idx):
        self._loss(self(batch["pixel_values"]), batch["labels"])

    @staticmethod
    def loaders():
        x, y = digits(320)
        return (
            DataLoader(Rows(pixel_values=x[:256], labels=y[:256]), batch_size=32),
            DataLoader(Rows(pixel_values=x[256:], labels=y[256:]), batch_size=32),
        )


class ImageAndMetadataModule(Base):
    """``forward(image, metadata)``, batches ``(image, metadata, y)``; metadata in the thousands."""

    def __init__(self, bug: str = "ok"):
        super().__init__()
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh())
        self.meta = nn.Sequential(nn.Linear(2, 8), Act("scale" if bug == "scale" else "ok"))
        self.head = nn.Linear(24, 10)

    def forward(self, image, metadata):
        return self.head(torch.cat([self.image(image), self.meta(metadata / 1000)], 1))

    def training_step(self, batch, batch_idx):
        image, metadata, y = batch
        return self._loss(self(image, metadata), y)

    def validation_step(self, batch, batch_idx):
        image, metadata, y = batch
        self._loss(self(image, metadata), y)

    @staticmethod
    def loaders(nan_rows: bool = False):
        x, y = digits(320)
        metadata = torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], 1) * 1000
        if nan_rows:
            metadata = metadata.clone()
            metadata[256::3, 0] = float("nan")  # a third of the validation rows
        train = TensorDataset(x[:256], metadata[:256], y[:256])
        val = TensorDataset(x[256:], metadata[256:], y[256:])
        return DataLoader(train, batch_size=32), DataLoader(val, batch_size=32)


class TokenModule(Base):
    """Embedding -> hand-written activation -> GRU; batches ``{"input_ids", "attention_mask", "labels"}``."""

    def __init__(self, bug: str = "ok"):
        super().__init__()
        self.embed = nn.Embedding(40, 12)
        self.encoder = nn.Sequential(nn.Linear(12, 12), Act(bug))
        self.gru = nn.GRU(12, 16, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(self.embed(input_ids)) * attention_mask.unsqueeze(-1)
        out, _ = self.gru(hidden)
        return self.head(out[:, -1])

    def training_step(self, batch, batch_idx):
        return self._loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def validation_step(self, batch, batch_idx):
        self._loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    @staticmethod
    def loaders():
        """A synthetic task: is token 7 in the (padded) sentence?"""
        g = torch.Generator().manual_seed(0)
        n, length = 192, 10
        ids = torch.randint(8, 40, (n, length), generator=g)
        lengths = torch.randint(4, length + 1, (n,), generator=g)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        labels = torch.randint(0, 2, (n,), generator=g)
        ids[labels == 1, 1] = 7
        ids = ids * mask
        split = 160
        columns = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        train = Rows(**{k: v[:split] for k, v in columns.items()})
        val = Rows(**{k: v[split:] for k, v in columns.items()})
        return DataLoader(train, batch_size=32), DataLoader(val, batch_size=32)


def _fit(tmp_path, module, loaders, callback, **kwargs):
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="run")
    run = trainer(tmp_path, [callback], logger=logger, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(module, *loaders)
    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    return run, events


def _fail_fractions(events):
    return [e.value for e in events.Scalars("gradprobe/checks/fail_fraction")]


@pytest.mark.parametrize("module_type", [PixelValuesModule, ImageAndMetadataModule, TokenModule])
def test_each_kind_of_model_is_probed_at_least_five_times_in_a_ten_epoch_fit(tmp_path, module_type):
    torch.manual_seed(0)
    callback = GradProbe()  # no configuration, the default overhead budget
    run, events = _fit(tmp_path, module_type(), module_type.loaders(), callback, max_epochs=10)
    assert run.current_epoch == 10 and callback.schedule.paused is None
    fails = _fail_fractions(events)
    assert len(fails) >= 5 and fails == [0.0] * len(fails)
    assert callback.last_report is not None and callback.last_report.ok


def test_two_inputs_zero_config_catch_a_bug_in_the_small_scale_branch(tmp_path):
    torch.manual_seed(0)
    callback = GradProbe(max_overhead=None, on_alert="stop")
    run, _ = _fit(tmp_path, ImageAndMetadataModule("scale"), ImageAndMetadataModule.loaders(), callback, max_epochs=3)
    assert callback.stopping_reason is not GradProbeStoppingReason.NOT_STOPPED and run.current_epoch == 1
    saliency = callback.last_report.saliency
    assert isinstance(saliency, tuple) and saliency[0].shape == (8, 1, 8, 8) and saliency[1].shape == (8, 2)
    assert callback.last_report.culprits[0].module == "meta.1"


def test_token_model_zero_config_names_a_wrong_encoder_backward_and_draws_a_token_heat_map(tmp_path):
    torch.manual_seed(0)
    callback = GradProbe(max_overhead=None, on_alert="stop", tokens=lambda ids: [f"w{i}" for i in ids])
    run, events = _fit(tmp_path, TokenModule("scale"), TokenModule.loaders(), callback, max_epochs=3)
    report = callback.last_report
    assert report.layer == "embed" and report.verdicts == (Verdict.FAIL,) * 8
    assert callback.alerts[0].culprits[0].label == "encoder.1 (Act, input)" and run.current_epoch == 1
    (picture,) = events.Images("gradprobe/saliency")
    import io

    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(picture.encoded_image_string)).convert("RGB")).astype(float)
    grey = (np.abs(image - 217).max(-1) < 3).mean()  # pads are drawn grey (0.85 x 255)
    assert image.shape[1] > 400 and grey > 0.02


def test_token_model_probed_fresh_at_every_probe(tmp_path, monkeypatch):
    """The embedding's output is recomputed from the stored ids each time: it follows the training."""
    import lightning_gradprobe.callback as callback_module

    torch.manual_seed(0)
    callback = GradProbe(max_overhead=None)
    embeddings = []
    real_run_probe = callback_module.run_probe

    def run_probe_and_look(pl_module, x, options):  # the real probe, then a look at what it used
        report = real_run_probe(pl_module, x, options)
        with torch.no_grad():
            live = pl_module.embed(x["input_ids"]).double()
        # gradient x embedding was computed with the embedding of this very moment, not a stale copy
        torch.testing.assert_close(report.token_scores["grad_x_input"], (report.saliency.double() * live).sum(-1))
        embeddings.append(live)
        return report

    monkeypatch.setattr(callback_module, "run_probe", run_probe_and_look)
    _fit(tmp_path, TokenModule(), TokenModule.loaders(), callback, max_epochs=3)
    assert len(embeddings) == 3 and not torch.allclose(embeddings[0], embeddings[-1])  # training moved them


def test_nan_rows_are_left_out_counted_and_replaced(tmp_path):
    torch.manual_seed(0)
    callback = GradProbe(max_overhead=None)
    _, events = _fit(tmp_path, ImageAndMetadataModule(), ImageAndMetadataModule.loaders(nan_rows=True), callback)
    assert _fail_fractions(events) == [0.0, 0.0]  # probed every time, on finite rows only
    assert callback.samples.inputs[1].isfinite().all() and len(callback.last_report.verdicts) == 8
    nonfinite = [e.value for e in events.Scalars("gradprobe/health/nonfinite_inputs")]
    assert nonfinite[0] > 0


class Unreadable(Base):
    """Its validation batches are a dict with names the callback cannot map to ``forward(a, b)``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(64, 10)

    def forward(self, a, b):
        return self.net(a.flatten(1) + b.flatten(1))

    def training_step(self, batch, batch_idx):
        return self._loss(self(batch["first"], batch["second"]), batch["y"])

    def validation_step(self, batch, batch_idx):
        self._loss(self(batch["first"], batch["second"]), batch["y"])

    @staticmethod
    def loaders():
        x, y = digits(128)
        rows = Rows(first=x, second=x.flip(-1), y=y)
        return DataLoader(rows, batch_size=32), DataLoader(rows, batch_size=32)


def test_a_batch_it_cannot_read_warns_once_and_training_goes_on(tmp_path):
    callback = GradProbe(max_overhead=None)
    with pytest.warns(UserWarning, match="cannot read the validation batch.*input_key="):
        run = trainer(tmp_path, [callback], max_epochs=2, num_sanity_val_steps=2)
        run.fit(Unreadable(), *Unreadable.loaders())
    assert run.current_epoch == 2 and callback.probes_done == 0


def test_strict_fails_during_the_sanity_check(tmp_path):
    callback = GradProbe(strict=True)
    run = trainer(tmp_path, [callback], max_epochs=2, num_sanity_val_steps=2)
    with pytest.raises(GradProbeSetupError, match="cannot read the validation batch"):
        run.fit(Unreadable(), *Unreadable.loaders())
    assert run.global_step == 0  # before training spent anything


def test_input_key_tuple_reads_it(tmp_path):
    callback = GradProbe(max_overhead=None, input_key=("first", "second"))
    run = trainer(tmp_path, [callback], max_epochs=2)
    run.fit(Unreadable(), *Unreadable.loaders())
    assert callback.probes_done == 2 and callback.last_report.ok


def test_a_tight_budget_still_probes_first_last_and_spread_each_with_a_picture(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from lit_models import DigitsModule
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = GradProbe(max_overhead=0.01)  # a tight budget
    logger = TensorBoardLogger(tmp_path, name="tight")
    run = trainer(tmp_path, [callback], max_epochs=10, logger=logger)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(DigitsModule())
    assert callback.probes_done >= 5 and callback.schedule.last_probe_epoch == 9
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    probed_at = [event.step for event in events.Scalars("gradprobe/checks/fail_fraction")]
    pictured_at = [event.step for event in events.Images("gradprobe/saliency")]
    assert len(probed_at) == callback.probes_done and pictured_at == probed_at  # a picture at every probe


def test_target_out_of_range_pauses_training_goes_on_and_strict_raises(tmp_path):
    callback = GradProbe(max_overhead=None, target=99)
    run = trainer(tmp_path, [callback], max_epochs=2)
    with pytest.warns(UserWarning, match=r"`target`=99 is out of range"):
        run.fit(PixelValuesModule(), *PixelValuesModule.loaders())
    assert run.current_epoch == 2
    with pytest.raises(GradProbeSetupError, match="out of range"):
        trainer(tmp_path, [GradProbe(target=99, strict=True)], max_epochs=2).fit(
            PixelValuesModule(), *PixelValuesModule.loaders()
        )


class MaskedTokensModule(Base):
    """``forward(tokens, mask)`` with a float key-padding mask (0 kept, -inf padded); batches ``(tokens, mask, y)``."""

    def __init__(self, bug: str = "ok"):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.act, self.head = Act(bug), nn.Linear(8, 10)

    def forward(self, tokens, mask):
        attended, _ = self.attention(tokens, tokens, tokens, key_padding_mask=mask)
        kept = mask.isfinite().to(tokens.dtype).unsqueeze(-1)
        return self.head(self.act((attended * kept).sum(1) / kept.sum(1)))

    def training_step(self, batch, batch_idx):
        tokens, mask, y = batch
        return self._loss(self(tokens, mask), y)

    def validation_step(self, batch, batch_idx):
        tokens, mask, y = batch
        self._loss(self(tokens, mask), y)

    @staticmethod
    def loaders():
        x, y = digits(320)
        tokens = x.reshape(320, 8, 8)  # the rows of each image, as 8 tokens
        lengths = 3 + torch.arange(320) % 6  # every sample padded to its own length
        mask = torch.zeros(320, 8).masked_fill(torch.arange(8) >= lengths[:, None], float("-inf"))
        train = TensorDataset(tokens[:256], mask[:256], y[:256])
        val = TensorDataset(tokens[256:], mask[256:], y[256:])
        return DataLoader(train, batch_size=32), DataLoader(val, batch_size=32)


@pytest.mark.parametrize("bug", ["ok", "scale"])
def test_additive_masks_are_inputs_not_rows_to_leave_out(tmp_path, bug):
    """Every validation row holds -inf in its mask: all are probed (none left out as non-finite), with the mask
    passed through; a wrong backward stops the fit."""
    torch.manual_seed(0)
    callback = GradProbe(max_overhead=None, on_alert="stop")
    run, events = _fit(tmp_path, MaskedTokensModule(bug), MaskedTokensModule.loaders(), callback, max_epochs=2)
    report = callback.last_report
    assert callback.samples.nonfinite_inputs == 0 and len(report.verdicts) == 8
    assert any("additive mask" in note for note in report.notes)
    if bug == "ok":
        assert run.current_epoch == 2 and _fail_fractions(events) == [0.0, 0.0] and report.ok
    else:
        assert run.current_epoch == 1 and report.verdicts == (Verdict.FAIL,) * 8
