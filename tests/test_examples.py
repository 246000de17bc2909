"""Every example runs (reduced sizes) and shows what it claims.

The examples are whole fits, each mostly one busy core. Importing Lightning is most of a small one's time, so
they run one after another in two processes (``one_process.py``: each as ``__main__`` with its own arguments and
output), the two processes side by side and alongside the other tests (``side_by_side``).
"""

from pathlib import Path

import pytest
from side_by_side import BACKGROUND

pytestmark = [pytest.mark.slow, pytest.mark.launched]  # each example is a whole fit

EXAMPLES = Path(__file__).parents[1] / "examples"
ONE_PROCESS = Path(__file__).parent / "one_process.py"
GROUPS = (("digits", "tabular", "bug", "bug fixed", "classic"), ("text", "pinn", "pinn fixed", "cli"))


def _commands(root: Path) -> dict[str, list]:
    logs = {name: root / name for name in ("digits", "tabular", "text", "cli")}
    return {
        "digits": ["digits_cnn.py", "--epochs", "2", "--samples", "400", "--logdir", logs["digits"]],
        "tabular": ["tabular_diabetes.py", "--epochs", "5", "--logdir", logs["tabular"]],
        "bug": ["bug_caught.py", "--epochs", "3"],
        "bug fixed": ["bug_caught.py", "--epochs", "3", "--fixed"],
        "pinn": ["pinn_second_order.py", "--epochs", "3"],
        "pinn fixed": ["pinn_second_order.py", "--epochs", "3", "--fixed"],
        "text": ["text_transformer.py", "--epochs", "2", "--samples", "64", "--logdir", logs["text"]],
        "classic": ["classic_question.py"],
        "cli": [
            "cli.py", "fit", "--config", EXAMPLES / "cli_config.yaml", "--trainer.max_epochs", "1",
            "--trainer.logger.init_args.save_dir", logs["cli"], "--trainer.default_root_dir", logs["cli"],
        ],
    }  # fmt: skip


class _Examples:
    """Each example's standard output (it must exit 0), by name, and the root of their log directories."""

    def __init__(self, launches, root: Path, out: Path) -> None:
        self.launches, self.root, self.out = launches, root, out

    def __getitem__(self, name: str) -> str:
        (group,) = (i for i, names in enumerate(GROUPS) if name in names)
        self.launches.succeeded(group)
        status, out, err = ((self.out / f"{name}.{kind}").read_text() for kind in ("status", "out", "err"))
        assert status == "0", f"{name} exited {status}:\n{out[-2000:]}\n{err[-4000:]}"
        return out


def launch(root):
    """Each group's examples one after another in one process, writing under ``root``."""
    out = root / "runs"
    commands = _commands(root)
    assert sorted(commands) == sorted(name for names in GROUPS for name in names)
    launches = {}
    for i, names in enumerate(GROUPS):
        scripts = [[name, EXAMPLES / commands[name][0], *commands[name][1:]] for name in names]
        launches[i] = [ONE_PROCESS, out, *[part for script in scripts for part in [*script, "--"]][:-1]]
    return launches


@pytest.fixture(scope="module")
def examples():
    launches = BACKGROUND.launches(__name__)
    return _Examples(launches, launches.root, launches.root / "runs")


def test_digits_demo(examples):
    out = examples["digits"]
    assert "tensorboard --logdir" in out and "ProbeReport: OK" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and "%" in line]
    assert rows  # at least one probe (more when the overhead budget allows)
    assert all(row[1] == "0%" and row[-1] == "-" for row in rows)  # no failure, no alert


def test_tabular_example(examples):
    out, logs = examples["tabular"], examples.root / "tabular"
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 1 and rows[0][1] == "0%" and rows[0][-1] == "-"  # one probe, no failure, no alert
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_file,) = (p for p in logs.rglob("events.out.tfevents.*") if "gradprobe_layout" not in str(p))
    events = EventAccumulator(str(events_file.parent), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["gradprobe/saliency"]  # the per-feature chart and heat map


def test_bug_caught_and_fixed(examples):
    out = examples["bug"]
    assert "Stopped after epoch 1" in out and "fail the gradient check" in out
    out = examples["bug fixed"]
    assert "Trained all 3 epochs" in out and "no alert" in out


def test_pinn_second_order_caught_and_fixed(examples):
    out = examples["pinn"]
    assert "Stopped after epoch 1" in out and "fail the second-order check" in out
    assert "culprit: net.1 (Tanh, second-order)" in out and "First-order check: pass 8" in out
    out = examples["pinn fixed"]
    assert "Trained all 3 epochs" in out and "no alert" in out


def test_text_transformer_zero_config(examples):
    out = examples["text"]
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and "%" in line]
    assert len(rows) == 2 and all(row[1] == "0%" and row[-1] == "-" for row in rows)  # first and last validation
    assert "probed at: bert.bert.embeddings.word_embeddings" in out


def test_classic_question(examples):
    out = examples["classic"]
    assert "Verdict: pass" in out and "relative error 0." in out


def test_lightning_cli_example(examples):
    out, logs = examples["cli"], examples.root / "cli"
    assert list(logs.rglob("events.out.tfevents.*"))
    assert f"tensorboard --logdir {logs}" in out  # says where its logs went
