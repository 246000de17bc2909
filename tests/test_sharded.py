"""Sharded training (FSDP2 through ModelParallelStrategy) on 2 CPU processes with gloo: probed, not skipped."""

import json
from pathlib import Path

import pytest
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from side_by_side import BACKGROUND

from lightning_gradprobe.callback import _unsupported_strategy

ROOT = Path(__file__).parents[1]
VERDICT_MODELS = ("ok", "bad", "weight", "attention", "tokens", "batchnorm")


def launch(root):
    """The module's three 2-process launches; each writes its processes' findings under its folder."""
    out = {name: root / name for name in ("wrong", "fixed", "verdicts")}
    for folder in out.values():
        folder.mkdir()
    example = ROOT / "examples/sharded_fsdp2.py"
    return {
        "wrong": [example, "--root", out["wrong"], "--json", out["wrong"] / "seen"],
        "fixed": [example, "--fixed", "--compare", "--root", out["fixed"], "--json", out["fixed"] / "seen"],
        "verdicts": [ROOT / "tests/fsdp_probe_script.py", out["verdicts"], *VERDICT_MODELS],
    }


@pytest.fixture(scope="module")
def launches():
    """Launch ``name``'s folder, once it has exited cleanly."""
    running = BACKGROUND.launches(__name__)

    def finished(name: str) -> Path:
        running.succeeded(name)
        return running.root / name

    return finished


def _seen(prefix):
    return [json.loads(Path(f"{prefix}-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.launched
def test_wrong_backward_stops_every_rank_with_the_culprit(launches):
    for seen in _seen(launches("wrong") / "seen"):
        assert seen["stopped"] and seen["epochs_run"] < 4
        assert seen["culprits"] == ["blocks.0.norm", "blocks.1.norm"]
        assert "blocks.0.norm" in seen["reason"]


@pytest.mark.slow
@pytest.mark.launched
def test_correct_model_trains_through_probed_and_unperturbed(launches):
    for seen in _seen(launches("fixed") / "seen"):
        assert not seen["stopped"] and seen["epochs_run"] == 4
        assert "gradprobe/checks/fail_fraction" in seen["metrics"]
        assert seen["weights"] == seen["weights_without_probe"]  # bit for bit


@pytest.mark.slow
@pytest.mark.launched
def test_sharded_verdicts_equal_unsharded_ones(launches):
    """Input check, localization, parameter check and second order of a 2-process FSDP2 model against the same
    weights unsharded: the same verdicts, margins and culprits. A correct model, a wrong activation backward, a
    wrong weight gradient, attention blocks (``nn.MultiheadAttention`` reads ``out_proj.weight`` without calling
    ``out_proj``), a token model probed at its embedding with a tied head, and BatchNorm whose running statistics
    differ per process (FSDP does not synchronise buffers: every process computes with rank zero's)."""
    models = VERDICT_MODELS
    out = launches("verdicts")
    found = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [f["parallelism"] for f in found] == [{"fsdp": False, "tensor_parallel": True}] * 2  # told apart
    results = [result for f in found for result in f["results"]]
    assert len(results) == 2 * len(models)
    expected_culprits = {"bad": ["0.1", "0", ""], "weight": ["0.0"]}
    # (no double backward through CPU's fused attention: a finding, the same sharded and not)
    mixed_term = {"ok": "pass", "bad": "fail", "weight": "fail", "attention": None, "tokens": None, "batchnorm": "pass"}
    for result in results:
        bug = result["bug"]
        assert result["same_verdicts"] and result["same_margins"] and result["same_culprits"], result
        assert result["same_parameter_verdict"] and result["same_second_order"], result
        sharded, unsharded = result["parameter_margins"]
        assert sharded == pytest.approx(unsharded, rel=1e-5)  # (gathered tensors sit elsewhere: sums may reorder)
        assert result["culprits"] == expected_culprits.get(bug, [])
        wrong = bug in ("bad", "weight")
        assert result["failed"] == wrong and (result["parameter_verdict"] == "fail") == wrong
        assert result["mixed_term"] == mixed_term[bug]
        assert result["fd_dtype"] == "torch.float64" and not any("weaker" in note for note in result["notes"])
        if bug == "weight":
            assert result["culprit_kinds"] == ["parameter"]


@pytest.mark.parametrize("strategy", [FSDPStrategy()])
def test_unsupported_sharding_names_the_alternative(strategy):
    message = _unsupported_strategy(strategy)
    assert message is not None and "ModelParallelStrategy" in message and type(strategy).__name__ in message


def test_data_parallel_fsdp2_is_supported():
    assert _unsupported_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)) is None
