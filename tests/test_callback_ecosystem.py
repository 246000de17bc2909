"""Mixed and reduced precision, and configuration through LightningCLI."""

import warnings

import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from lit_models import DigitsModule, trainer

from lightning_gradprobe import GradProbe, Verdict


@pytest.mark.parametrize(
    ("precision", "model_dtype"),
    [
        ("bf16-mixed", torch.float32),
        ("bf16-true", torch.bfloat16),
        ("16-mixed", torch.float32),
    ],
)
def test_precision_modes(tmp_path, precision, model_dtype):
    for bug, expected in (("ok", {Verdict.PASS, Verdict.PRECISION_LIMITED}), ("scale", {Verdict.FAIL})):
        __import__("lightning.pytorch").pytorch.seed_everything(0, verbose=False)
        callback = GradProbe(max_overhead=None, on_alert=lambda alert: None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(tmp_path, [callback], max_epochs=1, precision=precision).fit(DigitsModule(bug=bug))
        report = callback.last_report
        assert report.model_dtype == model_dtype and report.fd_dtype == torch.float64
        assert set(report.verdicts) <= expected, str(report)
        assert "finite differences in float64" in str(report)


def test_lightning_cli_yaml(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"""
trainer:
  max_epochs: 2
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning_gradprobe.GradProbe
      init_args:
        num_samples: 4
        every_n_epochs: 1
        fail_threshold: 0.25
        vanishing_threshold: null
        on_alert: stop
        target: label
        max_overhead: null
model:
  bug: scale
""")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(DigitsModule, args=["fit", "--config", str(config)], save_config_kwargs={"overwrite": True})
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, GradProbe)]
    assert callback.num_samples == 4 and callback.thresholds.fail_fraction == 0.25
    assert callback.thresholds.vanishing_fraction is None and callback.target == "label"
    assert cli.trainer.should_stop and cli.trainer.current_epoch == 1  # stopped by the alert
