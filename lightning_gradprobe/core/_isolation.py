"""Guards that make a probe invisible to the model and the run it watches."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["isolated"]


@contextmanager
def isolated(model: Any, device: torch.device) -> Iterator[None]:
    """Run a block with every submodule in eval mode, grad enabled, no autocast, no TF32, RNGs forked.

    Each submodule's own ``training`` flag is recorded and restored (never a whole-model
    ``.train()``), and the torch (CPU and ``device``), ``random`` and NumPy generator states are
    put back afterwards, so code that draws random numbers inside the model leaves no trace.

    Args:
        model: The module (or any callable) about to be probed.
        device: The device of the inputs; its RNG is forked too when it is a CUDA device.

    """
    modes = [(module, module.training) for module in model.modules()] if isinstance(model, nn.Module) else []
    python_state = random.getstate()
    numpy_state = _numpy_state()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        with ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            if device.type in ("cpu", "cuda"):
                stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            for module, _ in modes:
                module.training = False
            yield
    finally:
        for module, training in modes:
            module.training = training
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        random.setstate(python_state)
        if numpy_state is not None:
            import numpy

            numpy.random.set_state(numpy_state)


def _numpy_state() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        return None
    return numpy.random.get_state()
