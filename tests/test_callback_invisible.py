"""The probe is invisible to training, bit for bit."""

import random

import lightning.pytorch as pl
import numpy as np
import torch
from lit_models import DigitsModule, trainer

from lightning_gradprobe import GradProbe


def _run(tmp_path, callbacks):
    pl.seed_everything(123, verbose=False)
    module = DigitsModule(n_train=192, lr=0.01)
    run = trainer(
        tmp_path, callbacks, max_epochs=2, deterministic=True, accumulate_grad_batches=2, val_check_interval=0.5
    )
    run.fit(module)
    return {
        "params": {k: v.clone() for k, v in module.state_dict().items()},  # includes BatchNorm statistics
        "optimizer": run.optimizers[0].state_dict(),
        "losses": list(module.train_losses),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
    }


def test_training_is_bit_identical_with_the_probe(tmp_path):
    callback = GradProbe(
        max_overhead=None, every_n_train_steps=1, redraw=True
    )  # probe at every validation, new draw each time
    with_probe = _run(tmp_path, [callback])
    without = _run(tmp_path, [])
    assert callback.probes_done == 4  # val_check_interval=0.5 over 2 epochs
    assert with_probe["losses"] == without["losses"]
    for key, value in without["params"].items():
        assert torch.equal(value, with_probe["params"][key]), key
    for state_a, state_b in zip(
        with_probe["optimizer"]["state"].values(), without["optimizer"]["state"].values(), strict=True
    ):
        for key in state_a:
            assert torch.equal(torch.as_tensor(state_a[key]), torch.as_tensor(state_b[key])), key
    assert torch.equal(with_probe["torch_rng"], without["torch_rng"])
    assert np.array_equal(with_probe["numpy_rng"], without["numpy_rng"])
    assert with_probe["python_rng"] == without["python_rng"]
