"""Every example runs (reduced sizes) and shows what it claims."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each example is a whole fit

EXAMPLES = Path(__file__).parents[1] / "examples"


def _run(*args, timeout=300):
    done = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_digits_demo(tmp_path):
    out = _run(EXAMPLES / "digits_cnn.py", "--epochs", "2", "--samples", "400", "--logdir", tmp_path)
    assert "tensorboard --logdir" in out and "ProbeReport: OK" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and "%" in line]
    assert rows  # at least one probe (more when the overhead budget allows)
    assert all(row[1] == "0%" and row[-1] == "-" for row in rows)  # no failure, no alert


def test_tabular_example(tmp_path):
    out = _run(EXAMPLES / "tabular_diabetes.py", "--epochs", "5", "--logdir", tmp_path)
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 1 and rows[0][1] == "0%" and rows[0][-1] == "-"  # one probe, no failure, no alert
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_file,) = (p for p in tmp_path.rglob("events.out.tfevents.*") if "gradprobe_layout" not in str(p))
    events = EventAccumulator(str(events_file.parent), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["gradprobe/saliency"]  # the per-feature chart and heat map


def test_bug_caught_and_fixed():
    out = _run(EXAMPLES / "bug_caught.py", "--epochs", "3")
    assert "Stopped after epoch 1" in out and "fail the gradient check" in out
    out = _run(EXAMPLES / "bug_caught.py", "--epochs", "3", "--fixed")
    assert "Trained all 3 epochs" in out and "no alert" in out


def test_pinn_second_order_caught_and_fixed():
    out = _run(EXAMPLES / "pinn_second_order.py", "--epochs", "3")
    assert "Stopped after epoch 1" in out and "fail the second-order check" in out
    assert "culprit: net.1 (Tanh, second-order)" in out and "First-order check: pass 8" in out
    out = _run(EXAMPLES / "pinn_second_order.py", "--epochs", "3", "--fixed")
    assert "Trained all 3 epochs" in out and "no alert" in out


def test_text_transformer_zero_config(tmp_path):
    out = _run(EXAMPLES / "text_transformer.py", "--epochs", "2", "--samples", "64", "--logdir", tmp_path)
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and "%" in line]
    assert len(rows) == 2 and all(row[1] == "0%" and row[-1] == "-" for row in rows)  # first and last validation
    assert "probed at: bert.bert.embeddings.word_embeddings" in out


def test_classic_question():
    out = _run(EXAMPLES / "classic_question.py")
    assert "Verdict: pass" in out and "relative error 0." in out


def test_lightning_cli_example(tmp_path):
    out = _run(
        EXAMPLES / "cli.py",
        "fit",
        "--config",
        EXAMPLES / "cli_config.yaml",
        "--trainer.max_epochs",
        "1",
        "--trainer.logger.init_args.save_dir",
        tmp_path,
        "--trainer.default_root_dir",
        tmp_path,
    )
    assert list(tmp_path.rglob("events.out.tfevents.*"))
    assert f"tensorboard --logdir {tmp_path}" in out  # says where its logs went
