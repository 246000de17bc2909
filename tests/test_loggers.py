"""Saliency pictures reach every logger that takes images: W&B (offline) and MLflow (local SQLite store),
read back with their own files and client; and a resumed run writes the TensorBoard layout once."""

from __future__ import annotations

import warnings

import pytest
from lit_models import DigitsModule, trainer
from PIL import Image

from lightning_gradprobe import GradProbe

pytestmark = pytest.mark.slow  # real logger packages, real fits


def _fit(tmp_path, logger, epochs=2):
    callback = GradProbe(max_overhead=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [callback], max_epochs=epochs, logger=logger).fit(DigitsModule())
    return callback


def test_wandb_offline_run_gets_the_saliency_pictures(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), project="gradprobe-test", offline=True)
    callback = _fit(tmp_path, logger)
    logger.experiment.finish()
    pictures = sorted((tmp_path / "wandb").rglob("files/media/images/gradprobe/saliency*.png"))
    assert callback.probes_done == 2 and len(pictures) == 2
    with Image.open(pictures[0]) as image:
        assert image.size[0] > 50 and image.size[1] > 50 and len(set(image.convert("L").getdata())) > 10


def test_mlflow_local_run_gets_the_saliency_pictures_as_artifacts(tmp_path):
    pytest.importorskip("mlflow")
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(
        experiment_name="gradprobe",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_location=str(tmp_path / "artifacts"),
    )
    callback = _fit(tmp_path, logger)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    listed = [a.path for a in client.list_artifacts(logger.run_id, "gradprobe_saliency")]
    assert callback.probes_done == 2 and len(listed) == 2 and all(p.endswith(".png") for p in listed)
    local = client.download_artifacts(logger.run_id, listed[-1], str(tmp_path / "down"))
    with Image.open(local) as image:
        assert len(set(image.convert("L").getdata())) > 10
    history = client.get_metric_history(logger.run_id, "gradprobe/checks/fail_fraction")
    assert [m.value for m in history] == [0.0, 0.0]


def test_a_resumed_run_writes_the_layout_once(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    for _ in range(2):  # the same log directory twice, as a resumed run has
        _fit(tmp_path, TensorBoardLogger(tmp_path, name="tb", version=0), epochs=1)
    layouts = list((tmp_path / "tb" / "version_0" / "gradprobe_layout").glob("events.out.tfevents.*"))
    assert len(layouts) == 1
