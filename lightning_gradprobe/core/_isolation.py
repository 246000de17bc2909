"""Guards that make a probe invisible to the model and the run it watches."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

__all__ = ["ieee_float32", "is_compiled", "isolated"]

# The float32 precision settings of the current API (torch >= 2.9), parents before children: setting a
# parent also sets its children, so they are restored in this order.
_PRECISION_KEYS = (
    ("generic", "all"),
    ("cuda", "all"),
    ("cuda", "matmul"),
    ("cuda", "conv"),
    ("cuda", "rnn"),
    ("mkldnn", "all"),
    ("mkldnn", "matmul"),
    ("mkldnn", "conv"),
    ("mkldnn", "rnn"),
)


@contextmanager
def isolated(model: Any, device: torch.device) -> Iterator[None]:
    """Run a block in eval mode, grad enabled, no autocast, no TF32, RNGs forked, no nested-tensor fast path.

    Every ``nn.TransformerEncoder``'s nested-tensor fast path is off: it runs only where nothing requires grad (the
    finite differences, not the graph training differentiates), and it returns zeros at padded positions where the
    graph's forward does not: two functions in one model, which would fail every padded sample of a correct one.
    Each encoder's own setting is restored.

    ``torch.compile``'d backwards inside it may be retained (see ``_retainable_compiled_backwards``).

    Each submodule's own ``training`` flag is recorded and restored (never a whole-model
    ``.train()``), and the torch (CPU and ``device``), ``random`` and NumPy generator states are
    put back afterwards, so code that draws random numbers inside the model leaves no trace.

    Args:
        model: The module (or any callable) about to be probed.
        device: The device of the inputs; its RNG is forked too when it is a CUDA device.

    """
    modes = [(module, module.training) for module in model.modules()] if isinstance(model, nn.Module) else []
    nested = [module for module, _ in modes if isinstance(module, nn.TransformerEncoder) and module.use_nested_tensor]
    python_state = random.getstate()
    numpy_state = _numpy_state()
    try:
        with ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            if device.type in ("cpu", "cuda"):
                stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
            stack.enter_context(ieee_float32())
            stack.enter_context(_retainable_compiled_backwards())
            stack.enter_context(_eager_compiled_code())
            for module, _ in modes:
                module.training = False
            for encoder in nested:
                encoder.use_nested_tensor = False
            yield
    finally:
        for module, training in modes:
            module.training = training
        for encoder in nested:
            encoder.use_nested_tensor = True
        random.setstate(python_state)
        if numpy_state is not None:
            import numpy

            numpy.random.set_state(numpy_state)


def _retainable_compiled_backwards() -> Any:
    """``torch.compile``'d graphs whose backward may run more than once (the probe's rows share one graph).

    Compiled backwards donate their buffers by default, which forbids ``retain_graph``; the probe's graphs are
    compiled without, through functorch's own ``config.patch`` (the user's setting comes back as it was).
    """
    try:
        from torch._functorch import config
    except ImportError:  # an older torch without functorch's config: no donated buffers either
        return nullcontext()
    if not hasattr(config, "donated_buffer"):
        return nullcontext()
    return config.patch(donated_buffer=False)


def _eager_compiled_code() -> Any:
    """``torch.compile``'d code runs its eager Python inside the block, compiling nothing.

    The probe's graphs (float64, other batch sizes, grad on the input) would otherwise be compiled and cached
    beside training's, using up dynamo's recompile limit, past which training's own model silently runs eagerly.
    """
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else nullcontext()


def is_compiled(model: Any) -> bool:
    """Whether ``model`` is, holds, or runs through ``torch.compile``'d code (Lightning's compiled modules too)."""
    if getattr(model, "_compiler_ctx", None) is not None or hasattr(model, "_orig_mod"):
        return True
    return isinstance(model, nn.Module) and any(hasattr(m, "_orig_mod") for m in model.modules())


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Full float32 precision for matmuls and convolutions (no TF32/bf16 shortcuts) inside the block.

    Uses the float32-precision API of torch >= 2.9 when it exists (every backend and op set to
    ``"ieee"``, each restored to exactly what it was), else cuDNN's ``flags()`` context manager and
    cuBLAS's TF32 switch. Never assigns through the guarded module attributes, so it works under
    ``torch.backends.disable_global_flags()`` (PyTorch's test harness) and after the user chose TF32
    with either API; a setting that cannot be read or changed is left as it is.

    Example:
        >>> import torch
        >>> before = torch.backends.fp32_precision
        >>> with ieee_float32():
        ...     inside = torch.backends.fp32_precision
        >>> inside, torch.backends.fp32_precision == before
        ('ieee', True)

    """
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    setter = getattr(torch._C, "_set_fp32_precision_setter", None)
    if getter is None or setter is None:  # torch < 2.9: the legacy switches only
        with _legacy_no_tf32():
            yield
        return
    saved: list[tuple[tuple[str, str], str]] = []
    for key in _PRECISION_KEYS:
        try:
            saved.append((key, getter(*key)))
        except Exception:  # a backend this build does not know
            continue
    try:
        for key, _ in saved:
            setter(*key, "ieee")
        yield
    finally:
        for key, value in saved:
            setter(*key, value)


@contextmanager
def _legacy_no_tf32() -> Iterator[None]:
    cudnn = torch.backends.cudnn
    matmul = torch._C._get_cublas_allow_tf32()
    try:
        torch._C._set_cublas_allow_tf32(False)
        with cudnn.flags(
            enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
        ):
            yield
    finally:
        torch._C._set_cublas_allow_tf32(matmul)


def _numpy_state() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        return None
    return numpy.random.get_state()
