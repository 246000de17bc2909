"""Saliency pictures by input kind, as matplotlib figures (pure: tensors in, a figure out).

Normalisation follows Captum's visualiser: the scale is the attribution value below which
``100 - outlier_percent`` percent of the total attribution mass lies, so a few extreme pixels cannot
wash out the picture; values are then clipped to [-1, 1]. Signed maps use a diverging colormap
centred on zero; magnitudes a sequential one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["input_kind", "robust_scale", "saliency_figure", "saliency_grid", "token_figure"]

SIGNED_CMAP = "RdBu_r"
MAGNITUDE_CMAP = "inferno"


def input_kind(shape: Sequence[int]) -> str:
    """Classify a batch shape for display.

    ``"image"`` for ``(N, C, H, W)`` with 1, 3 or 4 channels; ``"sequence"`` for ``(N, T, D)``;
    ``"tabular"`` for ``(N, F)``; ``"other"`` for anything else.

    Example:
        >>> input_kind((8, 3, 32, 24)), input_kind((8, 20, 5)), input_kind((8, 10)), input_kind((8, 2, 3, 4, 5))
        ('image', 'sequence', 'tabular', 'other')

    """
    if len(shape) == 4 and shape[1] in (1, 3, 4):
        return "image"
    if len(shape) == 3:
        return "sequence"
    if len(shape) == 2:
        return "tabular"
    return "other"


def robust_scale(values: Tensor, outlier_percent: float = 2.0) -> float:
    """The |value| below which ``100 - outlier_percent`` % of the total |value| mass lies (Captum's rule).

    Example:
        >>> robust_scale(torch.tensor([1.0] * 200 + [3.0]))  # the top 2% of the mass is clipped
        1.0

    """
    flat = values.detach().double().abs().flatten()
    flat = flat[flat.isfinite()]
    if not flat.numel() or float(flat.sum()) == 0:
        return 1.0
    ordered = flat.sort().values
    cumulative = ordered.cumsum(0)
    position = int(torch.searchsorted(cumulative, cumulative[-1] * (100 - outlier_percent) / 100))
    return float(ordered[min(position, len(ordered) - 1)]) or float(ordered[-1])


@functools.cache
def _colormap(name: str) -> Any:
    """A matplotlib colormap, looked up once (the registry hands out fresh copies that rebuild their tables)."""
    from matplotlib import colormaps

    return colormaps[name]


def _to_display(image: Tensor) -> np.ndarray:
    """(C, H, W) -> (H, W) or (H, W, 3) in [0, 1], min-max per image."""
    array = image.detach().float().cpu()
    low, high = float(array.min()), float(array.max())
    array = (array - low) / (high - low) if high > low else torch.zeros_like(array)
    if array.shape[0] == 1:
        return array[0].numpy()
    return array[:3].permute(1, 2, 0).numpy()


def _grayscale(display: np.ndarray) -> np.ndarray:
    return display if display.ndim == 2 else display @ np.array([0.299, 0.587, 0.114])


def saliency_figure(
    inputs: Tensor,
    saliency: Tensor,
    *,
    labels: Sequence[str] | None = None,
    feature_names: Sequence[str] | None = None,
    scale: float | None = None,
    title: str = "",
):
    """Draw the saliency of a batch as one figure, by input kind (see :func:`input_kind`).

    Args:
        inputs: The probed inputs ``(N, ...)``.
        saliency: Their signed input gradients, same shape.
        labels: One caption per sample (e.g. ``"y=3 pred=3"``).
        feature_names: Tabular feature names.
        scale: The colour scale (``None``: :func:`robust_scale` of this batch).
        title: Figure title.

    Returns:
        A ``matplotlib.figure.Figure`` (the caller closes it; ``SummaryWriter.add_figure`` does).

    """
    from matplotlib.figure import Figure

    saliency = saliency.detach().float().cpu().nan_to_num(0.0, 0.0, 0.0)
    scale = scale or robust_scale(saliency)
    kind = input_kind(tuple(inputs.shape))
    n = inputs.shape[0]
    labels = list(labels) if labels is not None else [f"sample {i}" for i in range(n)]
    if kind == "image":
        figure = Figure(figsize=(6.6, 2.1 * n + 0.4))
        axes = figure.subplots(n, 3, squeeze=False)
        for i in range(n):
            display = _to_display(inputs[i])
            signed = saliency[i].sum(0).numpy() / scale
            magnitude = saliency[i].abs().sum(0).numpy() / scale
            axes[i, 0].imshow(display, cmap="gray" if display.ndim == 2 else None, vmin=0, vmax=1)
            axes[i, 0].set_ylabel(labels[i], fontsize=8)
            shown = axes[i, 1].imshow(np.clip(signed, -1, 1), cmap=SIGNED_CMAP, vmin=-1, vmax=1)
            axes[i, 2].imshow(_grayscale(display), cmap="gray", vmin=0, vmax=1)
            axes[i, 2].imshow(np.clip(magnitude, 0, 1), cmap=MAGNITUDE_CMAP, vmin=0, vmax=1, alpha=0.5)
            for axis in axes[i]:
                axis.set_xticks([])
                axis.set_yticks([])
        for axis, name in zip(axes[0], ("input", "saliency (signed)", "|saliency| overlay"), strict=True):
            axis.set_title(name, fontsize=9)
        figure.colorbar(shown, ax=axes, shrink=0.5, label=f"signed gradient / {scale:.2g}")
    elif kind == "tabular":
        names = [f"f{j}" for j in range(inputs.shape[1])]
        if feature_names is not None and len(feature_names) == len(names):  # (a wrong count: index names)
            names = list(feature_names)
        figure = Figure(figsize=(max(6.0, 0.35 * len(names) + 2), 6.5))
        bars, heat = figure.subplots(2, 1, height_ratios=[1, 1.4])
        mean = saliency.mean(0).numpy()
        spread = saliency.abs().mean(0).numpy()
        positions = np.arange(len(names))
        bars.bar(positions, mean, color=np.where(mean >= 0, "#c44e52", "#4c72b0"))
        bars.errorbar(positions, mean, yerr=spread, fmt="none", ecolor="gray", capsize=2)
        bars.axhline(0, color="black", linewidth=0.6)
        bars.set_xticks(positions, names, rotation=60, ha="right", fontsize=8)
        bars.set_ylabel("input gradient\nmean (whisker: mean |.|)", fontsize=8)
        shown = heat.imshow(np.clip(saliency.numpy() / scale, -1, 1), cmap=SIGNED_CMAP, vmin=-1, vmax=1, aspect="auto")
        heat.set_xticks(positions, names, rotation=60, ha="right", fontsize=8)
        heat.set_yticks(range(n), labels, fontsize=8)
        figure.colorbar(shown, ax=heat, label=f"gradient / {scale:.2g}")
        figure.subplots_adjust(left=0.16, hspace=0.45)
    else:
        maps = saliency if kind == "sequence" else saliency.reshape(n, 1, -1)
        figure = Figure(figsize=(6.5, 1.6 * n + 0.5))
        axes = figure.subplots(n, 1, squeeze=False)[:, 0]
        for i in range(n):
            shown = axes[i].imshow(
                np.clip(maps[i].numpy().T / scale, -1, 1), cmap=SIGNED_CMAP, vmin=-1, vmax=1, aspect="auto"
            )
            axes[i].set_ylabel(labels[i], fontsize=8)
        axes[-1].set_xlabel("time step" if kind == "sequence" else "input element (flattened)")
        if kind == "sequence":
            axes[0].set_title("feature x time", fontsize=9)
        figure.colorbar(shown, ax=list(axes), shrink=0.6, label=f"gradient / {scale:.2g}")
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def saliency_grid(
    inputs: Tensor,
    saliency: Tensor,
    *,
    labels: Sequence[str] | None = None,
    scale: float | None = None,
    cell: int = 64,
) -> np.ndarray:
    """Image inputs as one RGB grid: a row per sample with input, signed saliency and overlay.

    Composed directly from colormap lookups (no figure layout), so it costs milliseconds: this is
    what the callback logs at every probe. Labels are drawn in a strip on the left.

    Args:
        inputs: ``(N, C, H, W)`` with 1, 3 or 4 channels.
        saliency: Signed input gradients, same shape.
        labels: One caption per sample.
        scale: Colour scale (``None``: :func:`robust_scale` of this batch).
        cell: Target size in pixels of the longer image side (nearest-neighbour upscaling).

    Returns:
        ``(H, W, 3)`` uint8.

    Example:
        >>> grid = saliency_grid(torch.rand(2, 3, 10, 16), torch.randn(2, 3, 10, 16), labels=["a", "b"])
        >>> grid.shape, grid.dtype
        ((118, 300, 3), dtype('uint8'))

    """
    from PIL import Image, ImageDraw

    n, _, height, width = inputs.shape
    saliency = saliency.detach().float().cpu().nan_to_num(0.0, 0.0, 0.0)
    scale = scale or robust_scale(saliency)
    zoom = max(1, cell // max(height, width))
    labels = list(labels) if labels is not None else [f"sample {i}" for i in range(n)]
    gap, strip, header = 4, 96, 30
    tile_h, tile_w = height * zoom, width * zoom
    canvas = np.full((header + n * (tile_h + gap), strip + 3 * (tile_w + gap), 3), 255, dtype=np.uint8)

    def place(row: int, column: int, rgb: np.ndarray) -> None:
        top, left = header + row * (tile_h + gap), strip + column * (tile_w + gap)
        tile = np.repeat(np.repeat(rgb, zoom, axis=0), zoom, axis=1)
        canvas[top : top + tile_h, left : left + tile_w] = (np.clip(tile, 0, 1) * 255).astype(np.uint8)

    for i in range(n):
        display = _to_display(inputs[i])
        gray = _grayscale(display)
        colour = np.repeat(display[..., None], 3, axis=2) if display.ndim == 2 else display
        signed = np.clip(saliency[i].sum(0).numpy() / scale, -1, 1)
        magnitude = np.clip(saliency[i].abs().sum(0).numpy() / scale, 0, 1)
        place(i, 0, colour)
        place(i, 1, _colormap(SIGNED_CMAP)((signed + 1) / 2)[..., :3])
        place(i, 2, 0.5 * gray[..., None] + 0.5 * _colormap(MAGNITUDE_CMAP)(magnitude)[..., :3])
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    # Two short lines per column, so that the header fits a tile as narrow as 64 pixels.
    for column, lines in enumerate((("input", ""), ("signed", f"/ {scale:.2g}"), ("|grad|", "overlay"))):
        for line, text in enumerate(lines):
            draw.text((strip + column * (tile_w + gap) + 2, 3 + 12 * line), text, fill=(0, 0, 0))
    for i, label in enumerate(labels):
        draw.text((4, header + i * (tile_h + gap) + tile_h // 2 - 6), label[:18], fill=(0, 0, 0))
    return np.asarray(picture)


def token_figure(
    ids: Tensor,
    scores: Tensor,
    *,
    mask: Tensor | None = None,
    tokens: Callable[[list[int]], list[str]] | None = None,
    labels: Sequence[str] | None = None,
    scale: float | None = None,
    title: str = "",
):
    """A token heat map: one row per sample, each token a cell coloured by its attribution, pads greyed.

    Args:
        ids: ``(N, L)`` token ids.
        scores: ``(N, L)`` signed per-token attribution (e.g. gradient x embedding summed over the embedding).
        mask: ``(N, L)`` attention mask; cells where it is 0 are drawn grey and left unlabelled.
        tokens: ``ids -> list[str]`` for one row (a tokenizer's ``convert_ids_to_tokens``); ids otherwise.
        labels: One caption per sample.
        scale: The colour scale (``None``: :func:`robust_scale` of the real tokens' scores).
        title: Figure title.

    Returns:
        A ``matplotlib.figure.Figure``.

    Example:
        >>> import torch
        >>> figure = token_figure(torch.tensor([[5, 7, 0]]), torch.tensor([[0.5, -1.0, 0.0]]),
        ...                       mask=torch.tensor([[1, 1, 0]]), tokens=lambda row: [f"w{i}" for i in row])
        >>> [t.get_text() for t in figure.axes[0].texts]
        ['w5', 'w7']

    """
    from matplotlib.figure import Figure

    scores = scores.detach().double().cpu().nan_to_num(0.0)
    n, length = scores.shape
    real = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.detach().cpu().bool()
    scale = scale or robust_scale(scores[real] if real.any() else scores)
    colours = _colormap(SIGNED_CMAP)(np.clip(scores.numpy() / scale, -1, 1) * 0.5 + 0.5)
    colours[~real.numpy()] = (0.85, 0.85, 0.85, 1.0)
    figure = Figure(figsize=(min(2.0 + 0.75 * length, 24.0), 0.5 * n + 1.2))
    axis = figure.subplots()
    axis.imshow(colours, aspect="auto", interpolation="nearest")
    for i in range(n):
        row = ids[i].tolist()
        words = tokens(row) if tokens is not None else [str(t) for t in row]
        for j in range(length):
            if real[i, j]:
                axis.text(j, i, str(words[j])[:12], ha="center", va="center", fontsize=7)
    axis.set_yticks(range(n), list(labels) if labels is not None else [f"sample {i}" for i in range(n)], fontsize=8)
    axis.set_xticks(range(length), [str(j) for j in range(length)], fontsize=7)
    axis.set_xlabel(f"token position (colour: attribution / {scale:.2g}, red +, blue -, grey: padding)", fontsize=8)
    if title:
        axis.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure
