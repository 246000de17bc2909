"""Panels read back from real event files with TensorBoard's own EventAccumulator."""

import gc
import io
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lit_models import DigitsModule, trainer
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_gradprobe import GradProbe, probe
from lightning_gradprobe.render import input_kind, log_probe, saliency_picture, token_picture


def _events(path):
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def _image(event):
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"), dtype=np.float64)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tb")
    logger = TensorBoardLogger(tmp_path, name="digits", version=0)
    callback = GradProbe(max_overhead=None, on_alert="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [callback], max_epochs=3, logger=logger).fit(DigitsModule(bug="scale"))
    return tmp_path / "digits" / "version_0"


def test_scalar_tags_are_grouped_under_one_prefix(run_dir):
    tags = _events(run_dir).Tags()["scalars"]
    ours = {t for t in tags if t.startswith("gradprobe/")}
    assert {
        "gradprobe/checks/fail_fraction",
        "gradprobe/checks/relative_error_max",
        "gradprobe/checks/margin_max",
        "gradprobe/checks/margin_limit",
        "gradprobe/health/grad_norm_p50",
        "gradprobe/health/nonfinite_samples",
    } <= ours
    assert {t.split("/")[1] for t in ours} == {"checks", "health"}
    fail = [e.value for e in _events(run_dir).Scalars("gradprobe/checks/fail_fraction")]
    assert fail == [1.0, 1.0, 1.0]
    # The figure charted next to the verdict is the one it was decided on: every sample fails, so margin > 1.
    margins = [e.value for e in _events(run_dir).Scalars("gradprobe/checks/margin_max")]
    assert len(margins) == 3 and min(margins) > 1


def test_histograms_and_saliency_images_change_between_steps(run_dir):
    events = _events(run_dir)
    assert {"gradprobe/histograms/log10_relative_error", "gradprobe/histograms/abs_input_gradient"} <= set(
        events.Tags()["histograms"]
    )
    images = events.Images("gradprobe/saliency")
    scalar_steps = [e.step for e in events.Scalars("gradprobe/checks/fail_fraction")]
    assert [e.step for e in images] == scalar_steps == [7, 15, 23]  # on the slider with the scalars
    first, last = _image(images[0]), _image(images[-1])
    assert images[0].width >= 3 * 64 and images[0].height > 8 * 64  # 8 samples x (input, saliency, overlay)
    assert first.std() > 10  # not a blank or constant picture
    assert first.shape == last.shape and np.abs(first - last).mean() > 0.1  # saliency evolves with training


def test_alert_log_is_markdown_per_alert(run_dir):
    texts = _events(run_dir).Tensors("gradprobe/alerts/text_summary")
    assert len(texts) == 3
    body = texts[0].tensor_proto.string_val[0].decode()
    assert "| step | condition |" in body and "failed_checks" in body and "8 of 8" in body
    # the alert's step is the step its scalars and pictures are logged at
    assert [t.step for t in texts] == [7, 15, 23] and "| 7 | failed_checks |" in body
    assert "`<model> (DigitsModule, input)`" in body  # the culprit: the bug sits in the module's own forward


def test_custom_scalars_layout_in_its_own_run(run_dir):
    events = _events(run_dir / "gradprobe_layout")
    (event,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    (category,) = layout.category
    titles = {chart.title: chart for chart in category.chart}
    assert "fail fraction vs threshold" in titles
    assert list(titles["fail fraction vs threshold"].multiline.tag) == [
        "gradprobe/checks/fail_fraction",
        "gradprobe/checks/fail_threshold",
    ]
    assert len(titles["input-gradient norm (p50, band p10-p90)"].margin.series) == 1
    assert list(titles["margin (error / allowed) vs 1"].multiline.tag) == [
        "gradprobe/checks/margin_max",
        "gradprobe/checks/parameter_margin_max",
        "gradprobe/second_order/margin_max",
        "gradprobe/checks/margin_limit",
    ]
    assert "custom_scalars__config__" not in _events(run_dir).Tags()["tensors"]  # the user's run keeps its own


@pytest.mark.parametrize(
    ("shape", "kind"),
    [
        ((3, 3, 12, 20), "image"),
        ((4, 1, 8, 8), "image"),
        ((5, 12), "tabular"),
        ((4, 3), "tabular"),
        ((3, 16, 4), "sequence"),
        ((2, 2, 3, 4, 5), "other"),
        ((2, 1, 1, 1, 2), "other"),
        ((2, 1, 1, 500), "image"),
    ],
)
def test_every_input_kind_renders(shape, kind):
    x = torch.randn(shape)
    names = [f"a_rather_long_feature_name_{i}" for i in range(shape[1])]
    labels = [f"y={i} pred={i} precision-limited" for i in range(shape[0])]
    picture = saliency_picture(x, torch.randn(shape), labels=labels, feature_names=names, title="step 9: 3 pass")
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert picture.std() > 10
    # Nothing is cut off at the edges: the outermost two pixels are white all round (captions and names fit).
    for edge in (picture[:2], picture[-2:], picture[:, :2], picture[:, -2:]):
        assert (edge == 255).all()
    assert input_kind(shape) == kind


def test_long_captions_widen_the_picture_instead_of_being_clipped():
    x, gradient = torch.randn(3, 4), torch.randn(3, 4)
    short = saliency_picture(x, gradient, labels=["a", "b", "c"], feature_names=list("wxyz"))
    long = saliency_picture(x, gradient, labels=["a" * 40, "b", "c"], feature_names=["n" * 60, "x", "y", "z"])
    assert long.shape[1] > short.shape[1] + 150 and long.shape[0] > short.shape[0] + 250


def test_pictures_survive_extreme_gradients_foreign_text_and_long_inputs():
    huge = saliency_picture(torch.randn(4, 3), torch.full((4, 3), 1.7e38))  # float32 sums would overflow
    assert huge.std() > 10
    names = ["Größe", "x²", "\u2581word", "\u0120the", "体重"]
    foreign = saliency_picture(torch.randn(2, 5), torch.randn(2, 5), feature_names=names, labels=["naïve", "µm"])
    assert foreign.std() > 10
    wide = saliency_picture(torch.randn(2, 300), torch.randn(2, 300))  # the 64 features that matter most
    assert wide.shape[1] < 1600
    ids = torch.randint(1, 50, (2, 512))
    mask = torch.zeros_like(ids)
    mask[:, :170] = 1
    tokens = token_picture(ids, torch.randn(2, 512), mask=mask, tokens=lambda row: ["Ġtoken"] * 3)
    assert tokens.shape[1] < 64 * 90 + 400  # at most 64 token cells, trailing padding dropped


def test_token_picture_greys_padding_and_drops_trailing_padding():
    scores = torch.tensor([[2.0, 0.0, -2.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 0, 1, 0, 0], [1, 0, 0, 0, 0]])
    picture = token_picture(torch.tensor([[3, 0, 4, 0, 0], [5, 0, 0, 0, 0]]), scores, mask=mask, scale=1.0)
    short = token_picture(torch.tensor([[3, 0, 4]]), scores[:1, :3], mask=mask[:1, :3], scale=1.0)
    assert picture.shape[1] == short.shape[1]  # the last two columns are padding in every row: not drawn
    colours = {tuple(int(c) for c in pixel) for pixel in picture.reshape(-1, 3)}
    assert (217, 217, 217) in colours  # the pad between real tokens
    assert (103, 0, 31) in colours and (5, 48, 97) in colours  # +2 saturates red, -2 blue (scale 1)


def _rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc")
def test_memory_stays_flat_over_many_probes(tmp_path):
    """Resident memory does not trend upward over many rendered probes (1000 probes: benchmarks/)."""
    from torch.utils.tensorboard import SummaryWriter

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.randn(4, 16)
    report = probe(model, x)
    writer = SummaryWriter(tmp_path)
    marks = []
    for window in range(4):
        for step in range(15):
            log_probe(writer, report, x, [], window * 15 + step)
        gc.collect()
        marks.append(_rss_bytes())
    writer.close()
    # A leak grows with every probe; allocator noise does not: the last windows must not keep growing.
    assert marks[3] - marks[1] < 20_000_000, f"resident memory by window: {marks}"


def test_terminal_summary_command(run_dir, capsys):
    from lightning_gradprobe.cli import main

    assert main(["summary", str(run_dir)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [line.split()[0] for line in lines] == ["7", "15", "23"]
    assert all("100%" in line and "failed_checks" in line for line in lines)
    with pytest.raises(SystemExit):
        main(["summary", str(run_dir / "missing")])


def test_other_loggers_get_scalars_and_one_note(tmp_path, caplog):
    import logging

    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="csv")
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [GradProbe(max_overhead=None)], max_epochs=3, logger=logger).fit(DigitsModule())
    notes = [r.getMessage() for r in caplog.records if "loggers that take images" in r.getMessage()]
    assert len(notes) == 1 and "CSVLogger receives the gradprobe/ scalars" in notes[0]
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert sum(1 for row in rows[1:] if row.split(",")[rows[0].split(",").index("gradprobe/checks/fail_fraction")]) == 3


def test_rgb_inputs_keep_their_colours_and_signs_map_to_the_diverging_colormap():
    from lightning_gradprobe.render.images import saliency_grid

    image = torch.zeros(1, 3, 4, 6)
    image[0, 0] = 1.0  # pure red, non-square
    gradient = torch.zeros(1, 3, 4, 6)
    gradient[0, :, :, :3] = 1.0  # positive on the left half
    gradient[0, :, :, 3:] = -1.0  # negative on the right half
    grid = saliency_grid(image, gradient, labels=["red"], cell=12)
    rows, columns = np.nonzero((grid == (255, 0, 0)).all(axis=2))  # the input tile: pure red, 4x2 by 6x2 pixels
    assert rows.max() - rows.min() + 1 == 8 and columns.max() - columns.min() + 1 == 12
    row = grid[rows.min() + 1, columns.max() + 1 :].astype(int)
    inked = np.nonzero((row != 255).any(axis=1))[0]  # the signed tile is the next block to the right
    signed_left, signed_right = row[inked[0] + 1], row[inked[0] + 10]
    assert signed_left[0] > signed_left[2] and signed_right[2] > signed_right[0]  # red for +, blue for -


def test_shared_scale_keeps_the_first_probes_colour_scale(tmp_path):
    from lightning.pytorch.callbacks import Callback

    from lightning_gradprobe.render import robust_scale

    class Watch(Callback):
        def __init__(self, probe_callback):
            self.probe_callback, self.seen = probe_callback, []

        def on_validation_epoch_end(self, trainer, pl_module):
            report = self.probe_callback.last_report
            self.seen.append((self.probe_callback.saliency_scale, robust_scale(report.saliency)))

    shared = GradProbe(max_overhead=None, shared_scale=True)
    watch = Watch(shared)
    logger = TensorBoardLogger(tmp_path, name="shared")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [shared, watch], max_epochs=3, logger=logger).fit(DigitsModule())
    first_scale = watch.seen[0][1]
    assert [kept for kept, _ in watch.seen] == [first_scale] * 3  # kept from the first probe
    assert len({own for _, own in watch.seen}) > 1  # while each probe's own scale moved


class _Tabular(__import__("lightning").pytorch.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self(batch[0]).squeeze(1), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.mse_loss(self(batch[0]).squeeze(1), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_wrong_feature_names_warn_once_and_the_pictures_are_still_written(tmp_path):
    from sklearn.datasets import load_diabetes
    from torch.utils.data import DataLoader, TensorDataset

    data = load_diabetes()
    x, y = torch.tensor(data.data, dtype=torch.float32) * 10, torch.tensor(data.target, dtype=torch.float32) / 100
    loader = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)
    callback = GradProbe(max_overhead=None, feature_names=["age", "sex", "bmi"])  # 3 names, 10 features
    logger = TensorBoardLogger(tmp_path, name="tabular", version=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [callback], max_epochs=2, logger=logger).fit(_Tabular(), loader, loader)
    said = [str(w.message) for w in caught if "feature_names" in str(w.message)]
    assert len(said) == 1 and "3 names for 10 features" in said[0]
    images = _events(tmp_path / "tabular" / "version_0").Tags()["images"]
    assert len(_events(tmp_path / "tabular" / "version_0").Images(next(t for t in images if "saliency" in t))) == 2


def test_output_selector_errors_name_output():
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"`output`=3 picks one tensor out of a tuple"):
        probe(model, torch.randn(5, 4), output=3)

    def pair(x):
        return model(x), model(x).sum(1, keepdim=True)

    with pytest.raises(ValueError, match=r"`output`=2 is not in the model's tuple output"):
        probe(pair, torch.randn(5, 4), output=2)
    assert probe(pair, torch.randn(5, 4), output=1).ok


def test_summary_of_a_run_without_gradprobe_scalars_is_an_error(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    from lightning_gradprobe.cli import main

    with SummaryWriter(tmp_path / "plain") as writer:
        writer.add_scalar("loss", 1.0, 0)
    assert main(["summary", str(tmp_path)]) == 1
    assert "no gradprobe scalars" in capsys.readouterr().err
