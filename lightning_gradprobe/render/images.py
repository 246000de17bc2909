"""Saliency pictures by input kind, composed as RGB arrays (pure: tensors in, an ``(H, W, 3)`` uint8 array out).

No plotting library: cells are coloured by lookup in a 256-entry colour table and placed with array slicing, and
text is drawn with Pillow's default font (ASCII: other characters are shown as their closest ASCII, or ``?``); the
canvas grows to fit its text, so that no caption or feature name is clipped. A picture is cheap enough for the
callback to log one at every probe.

Normalisation follows Captum's visualiser: the scale is the attribution value below which
``100 - outlier_percent`` percent of the total attribution mass lies, so a few extreme pixels cannot wash out the
picture; values are then clipped to [-1, 1]. Signed maps use a diverging table centred on zero (blue -, red +,
matplotlib's ``RdBu_r``); magnitudes a sequential one (``inferno``).
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "colour_table",
    "input_kind",
    "robust_scale",
    "saliency_grid",
    "saliency_picture",
    "token_picture",
]

# Anchors of the two colour tables, evenly spaced and interpolated linearly to 256 entries: ColorBrewer's RdBu
# reversed (what matplotlib calls RdBu_r, exact) and 33 samples of matplotlib's inferno (within 5/255 of it).
_ANCHORS = {
    "signed": "053061 2065ab 4393c3 90c4dd d1e5f0 f7f6f6 fddbc7 f3a481 d6604d b1182b 67001f",
    "magnitude": (
        "000004 040312 0b0724 150b37 210c4a 2f0a5b 3d0965 4a0c6b 57106e 64156e 71196e 7d1e6d 8a226a 972766 a32c61 "
        "b0315b bc3754 c73e4c d24644 db503b e45a31 eb6628 f1731d f68013 f98e09 fb9d07 fcac11 fbbc21 f9cb35 f5db4c "
        "f2ea69 f3f68a fcffa4"
    ),
}
_INK, _PAD_GREY, _MARGIN = (0, 0, 0), (217, 217, 217), 6
_MAX_COLUMNS = 64  # features of a table, tokens of a sequence: more are summarised, not drawn


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
def colour_table(name: str) -> np.ndarray:
    """A ``(256, 3)`` uint8 colour table: ``"signed"`` (blue, white, red) or ``"magnitude"`` (black to yellow).

    Example:
        >>> table = colour_table("signed")
        >>> table.shape, table[0].tolist(), table[-1].tolist()
        ((256, 3), [5, 48, 97], [103, 0, 31])

    """
    anchors = np.array([[int(code[i : i + 2], 16) for i in (0, 2, 4)] for code in _ANCHORS[name].split()], float)
    positions, grid = np.linspace(0, 1, len(anchors)), np.linspace(0, 1, 256)
    table = np.stack([np.interp(grid, positions, anchors[:, channel]) for channel in range(3)], axis=1)
    return table.round().astype(np.uint8)


def _colours(values: np.ndarray, name: str) -> np.ndarray:
    """Values in [0, 1] (NaN: 0.5) -> uint8 RGB by table lookup."""
    index = np.nan_to_num(values, nan=0.5).clip(0, 1) * 255
    return colour_table(name)[index.round().astype(np.intp)]


def _signed(values: np.ndarray, scale: float) -> np.ndarray:
    return _colours(np.clip(values / scale, -1, 1) * 0.5 + 0.5, "signed")


@functools.cache
def _font() -> Any:
    from PIL import ImageFont

    return ImageFont.load_default()


def _text_width(text: str) -> int:
    return int(np.ceil(_font().getlength(_printable(text))))


_MARKERS = str.maketrans({"\u0120": "_", "\u2581": "_", "\u010a": "\\n"})  # tokenizers' space and newline marks


def _printable(text: str) -> str:
    """``text`` in the ASCII that Pillow's default font draws: accents dropped, other characters shown as ``?``.

    Example:
        >>> _printable("Größe x² \u2581word \u0120the")
        'Gro?e x2 _word _the'

    """
    decomposed = unicodedata.normalize("NFKD", str(text).translate(_MARKERS))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).encode("ascii", "replace").decode()


_LINE = 14  # pixels per line of text


class _Sheet:
    """A white canvas: coloured blocks are placed by slicing, text is drawn once at the end (Pillow)."""

    def __init__(self, height: int, width: int, title: str = "") -> None:
        width = max(width, _text_width(title) + 2 * _MARGIN)  # a title line (reserved by the caller) never clipped
        self.pixels = np.full((height, width, 3), 255, dtype=np.uint8)
        self._texts: list[tuple[int, int, str, tuple[int, int, int], bool]] = []
        if title:
            self.text(2, _MARGIN, title)

    def place(self, top: int, left: int, block: np.ndarray, zoom: tuple[int, int] = (1, 1)) -> None:
        """Put an ``(h, w, 3)`` uint8 block at (top, left), each pixel repeated ``zoom`` (rows, columns) times."""
        block = np.repeat(np.repeat(block, zoom[0], axis=0), zoom[1], axis=1)
        self.pixels[top : top + block.shape[0], left : left + block.shape[1]] = block

    def text(self, top: int, left: int, text: str, fill: tuple[int, int, int] = _INK, upright: bool = False) -> None:
        """Queue a line of text; ``upright`` turns it to read bottom to top, its top-left corner at (top, left)."""
        self._texts.append((top, left, text, fill, upright))

    def finish(self) -> np.ndarray:
        """The picture, with its text drawn; the canvas grows (white) so that no text is cut at an edge."""
        from PIL import Image, ImageDraw

        bottom, right = self.pixels.shape[:2]
        for top, left, text, _, upright in self._texts:
            extent = (_text_width(text) + 2, _LINE) if not upright else (_LINE, _text_width(text) + 2)
            right, bottom = max(right, left + extent[0] + 2), max(bottom, top + extent[1] + 2)
        picture = Image.new("RGB", (right, bottom), (255, 255, 255))
        picture.paste(Image.fromarray(self.pixels), (0, 0))
        draw = ImageDraw.Draw(picture)
        for top, left, text, fill, upright in self._texts:
            text = _printable(text)
            if not upright:
                draw.text((left, top), text, fill=fill, font=_font())
                continue
            stamp = Image.new("L", (_text_width(text) + 2, _LINE))
            ImageDraw.Draw(stamp).text((1, 0), text, fill=255, font=_font())
            stamp = stamp.rotate(90, expand=True)
            picture.paste(Image.new("RGB", stamp.size, fill), (left, top), stamp)
        return np.array(picture)


def _caption_width(labels: Sequence[str]) -> int:
    return max((_text_width(label) for label in labels), default=0) + 2 * _MARGIN


def _colour_bar(sheet: _Sheet, top: int, left: int, height: int, scale: float, unit: str) -> None:
    """A vertical signed colour bar (+scale at the top, -scale at the bottom) with its ticks and unit."""
    height = max(height, 3 * _LINE)
    ramp = np.linspace(1, -1, height)[:, None]
    sheet.place(top, left, _signed(ramp, 1.0), zoom=(1, 12))
    for row, text in ((0, f"+{scale:.2g}"), (height // 2 - _LINE // 2, "0"), (height - _LINE, f"-{scale:.2g}")):
        sheet.text(top + row, left + 16, text)
    if _text_width(unit) + 2 <= height:  # the unit along the bar, where it fits
        sheet.text(top, left + 16 + _text_width(f"-{scale:.2g}") + _MARGIN, unit, upright=True)


def _colour_bar_width(scale: float) -> int:
    """The width :func:`_colour_bar` takes."""
    return 16 + _text_width(f"-{scale:.2g}") + 2 * _MARGIN + _LINE


def _prepare(saliency: Tensor, scale: float | None) -> tuple[Tensor, float]:
    saliency = saliency.detach().float().cpu().nan_to_num(0.0, 0.0, 0.0)
    return saliency, scale or robust_scale(saliency)


def saliency_picture(
    inputs: Tensor,
    saliency: Tensor,
    *,
    labels: Sequence[str] | None = None,
    feature_names: Sequence[str] | None = None,
    scale: float | None = None,
    title: str = "",
) -> np.ndarray:
    """Draw the saliency of a batch as one picture, by input kind (see :func:`input_kind`).

    Images get :func:`saliency_grid`; tables a bar chart of the mean gradient per feature over a samples x
    features heat map; sequences a feature x time heat map per sample; anything else its flattened elements.

    Args:
        inputs: The probed inputs ``(N, ...)``.
        saliency: Their signed input gradients, same shape.
        labels: One caption per sample (e.g. ``"y=3 pred=3"``).
        feature_names: Tabular feature names (index names ``f0, f1, ...`` when missing or of the wrong length).
        scale: The colour scale (``None``: :func:`robust_scale` of this batch).
        title: A line above the picture.

    Returns:
        ``(H, W, 3)`` uint8.

    Example:
        >>> picture = saliency_picture(torch.randn(4, 5), torch.randn(4, 5), feature_names=list("abcde"))
        >>> picture.ndim, picture.dtype, int(picture.std()) > 10
        (3, dtype('uint8'), True)

    """
    n = inputs.shape[0]
    labels = list(labels) if labels is not None else [f"sample {i}" for i in range(n)]
    kind = input_kind(tuple(inputs.shape))
    if kind == "image":
        return saliency_grid(inputs, saliency, labels=labels, scale=scale, title=title)
    saliency, scale = _prepare(saliency, scale)
    if kind == "tabular":
        names = [f"f{j}" for j in range(inputs.shape[1])]
        if feature_names is not None and len(feature_names) == len(names):
            names = [str(name) for name in feature_names]
        values = saliency.numpy()
        if len(names) > _MAX_COLUMNS:  # a readable width: the features that matter most, in their order
            keep = np.sort(np.argsort(-np.abs(values.astype(np.float64)).mean(0), kind="stable")[:_MAX_COLUMNS])
            note = f"{_MAX_COLUMNS} of {len(names)} features shown: the largest mean |gradient|"
            values, names, title = values[:, keep], [names[j] for j in keep], f"{title}  ({note})".strip()
        return _tabular(values, names, labels, scale, title)
    maps = saliency.transpose(1, 2) if kind == "sequence" else saliency.reshape(n, 1, -1)
    axis = "time step" if kind == "sequence" else "input element (flattened)"
    return _heat_rows(maps.numpy(), labels, scale, title, axis, "feature x time" if kind == "sequence" else "")


def _tabular(saliency: np.ndarray, names: list[str], labels: list[str], scale: float, title: str) -> np.ndarray:
    """Mean gradient per feature (bars, whiskers: mean |.|) over a samples x features heat map."""
    n, features = saliency.shape
    cell_w, cell_h, bars_h = int(np.clip(640 // features, _LINE, 40)), 18, 72
    strip, bar = _caption_width(labels), _colour_bar_width(scale)
    names_h = max(_text_width(name) for name in names) + _MARGIN
    heat_top = _LINE * (2 if title else 1) + bars_h + _MARGIN
    width = strip + features * cell_w + _MARGIN + bar
    sheet = _Sheet(heat_top + n * cell_h + names_h + _MARGIN + _LINE, width, title)
    mean, spread = saliency.astype(np.float64).mean(0), np.abs(saliency.astype(np.float64)).mean(0)
    reach = float(np.max(np.abs(mean) + spread))
    reach = reach if np.isfinite(reach) and reach > 0 else 1.0
    zero = heat_top - _MARGIN - bars_h // 2  # the bars' zero line
    caption = f"per feature: mean gradient (colour), mean |gradient| (grey); top edge {reach:.2g}"
    sheet.text(heat_top - _MARGIN - bars_h - _LINE + 2, strip, caption)
    sheet.place(zero, strip, np.zeros((1, features * cell_w, 3), np.uint8))
    half = bars_h // 2 - 2
    for j in range(features):
        left = strip + j * cell_w + 1
        spread_h = round(float(spread[j]) / reach * half)  # mean |.|: a grey bar up from the zero line
        sheet.place(zero - spread_h, left, np.full((1, 1, 3), 200, np.uint8), zoom=(spread_h, cell_w - 2))
        length = round(abs(float(mean[j])) / reach * half)  # the signed mean, narrower, in front
        top = zero - length if mean[j] >= 0 else zero + 1
        colour = _signed(np.array([[np.sign(mean[j])]]), 1.0)
        sheet.place(top, left + cell_w // 4, colour, zoom=(length, max(cell_w // 2 - 2, 2)))
    sheet.place(heat_top, strip, _signed(saliency, scale), zoom=(cell_h, cell_w))
    for i, label in enumerate(labels):
        sheet.text(heat_top + i * cell_h + 2, _MARGIN, label)
    for j, name in enumerate(names):
        sheet.text(heat_top + n * cell_h + 2, strip + j * cell_w + (cell_w - _LINE) // 2, name, upright=True)
    _colour_bar(sheet, heat_top, strip + features * cell_w + _MARGIN, n * cell_h, scale, "gradient")
    return sheet.finish()


def _heat_rows(maps: np.ndarray, labels: list[str], scale: float, title: str, axis: str, heading: str) -> np.ndarray:
    """One ``(rows, columns)`` heat map per sample, stacked, captions on the left, a colour bar on the right."""
    n, rows, columns = maps.shape
    cell_w, cell_h = int(np.clip(640 // columns, 1, 16)), int(np.clip(96 // rows, 1, 12))
    cell_h = max(cell_h, -(-(_LINE + 2) // rows))  # a block at least as tall as its caption
    block_h = rows * cell_h
    strip, head = _caption_width(labels), _LINE * ((1 if title else 0) + (1 if heading else 0)) + _MARGIN
    body_w = columns * cell_w
    sheet = _Sheet(head + n * (block_h + 4) + 2 * _LINE, strip + body_w + _MARGIN + _colour_bar_width(scale), title)
    if heading:
        sheet.text(head - _LINE - 2, strip, heading)
    for i, label in enumerate(labels):
        top = head + i * (block_h + 4)
        sheet.place(top, strip, _signed(maps[i], scale), zoom=(cell_h, cell_w))
        sheet.text(top + (rows * cell_h - _LINE) // 2, _MARGIN, label)
    bottom = head + n * (block_h + 4)
    sheet.text(bottom, strip, f"0 ... {columns - 1}: {axis}")
    _colour_bar(sheet, head, strip + body_w + _MARGIN, n * (block_h + 4) - 4, scale, "gradient")
    return sheet.finish()


def _to_display(image: Tensor) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) in [0, 1], min-max per image (one channel shown grey)."""
    array = image.detach().float().cpu()
    low, high = float(array.min()), float(array.max())
    array = (array - low) / (high - low) if high > low else torch.zeros_like(array)
    array = array[:1].expand(3, -1, -1) if array.shape[0] == 1 else array[:3]
    return array.permute(1, 2, 0).numpy()


def saliency_grid(
    inputs: Tensor,
    saliency: Tensor,
    *,
    labels: Sequence[str] | None = None,
    scale: float | None = None,
    cell: int = 64,
    title: str = "",
) -> np.ndarray:
    """Image inputs as one RGB grid: a row per sample with input, signed saliency and overlay.

    Args:
        inputs: ``(N, C, H, W)`` with 1, 3 or 4 channels.
        saliency: Signed input gradients, same shape.
        labels: One caption per sample.
        scale: Colour scale (``None``: :func:`robust_scale` of this batch).
        cell: Target size in pixels of the longer image side (nearest-neighbour upscaling).
        title: A line above the grid.

    Returns:
        ``(H, W, 3)`` uint8.

    Example:
        >>> grid = saliency_grid(torch.rand(2, 3, 10, 16), torch.randn(2, 3, 10, 16), labels=["a", "b"])
        >>> grid.shape[0], grid.dtype  # a 32-pixel header, then two rows of 40-pixel tiles (x4) and 4-pixel gaps
        (120, dtype('uint8'))

    """
    n, _, height, width = inputs.shape
    saliency, scale = _prepare(saliency, scale)
    zoom = max(1, cell // max(height, width))
    labels = list(labels) if labels is not None else [f"sample {i}" for i in range(n)]
    headings = (("input", ""), ("gradient", f"+-{scale:.2g}"), ("|gradient|", "on input"))
    gap, strip, header = 4, _caption_width(labels), _LINE * (3 if title else 2) + 4
    tile_h = max(height * zoom, _LINE + 2)  # a row at least as tall as its caption
    tile_w = max(width * zoom, *(_text_width(text) + 4 for pair in headings for text in pair))
    sheet = _Sheet(header + n * (tile_h + gap), strip + 3 * (tile_w + gap), title)
    for column, lines in enumerate(headings):  # two short lines per column: fits a tile 64 pixels wide
        for line, text in enumerate(lines):
            sheet.text(header - 2 * _LINE - 2 + _LINE * line, strip + column * (tile_w + gap) + 2, text)
    for i in range(n):
        top = header + i * (tile_h + gap)
        display = _to_display(inputs[i])
        signed = saliency[i].sum(0).numpy()
        magnitude = np.clip(saliency[i].abs().sum(0).numpy() / scale, 0, 1)
        grey = display @ np.array([0.299, 0.587, 0.114])
        overlay = 0.5 * grey[..., None] * 255 + 0.5 * _colours(magnitude, "magnitude")
        for column, block in enumerate(((display * 255).round(), _signed(signed, scale), overlay)):
            sheet.place(top, strip + column * (tile_w + gap), block.astype(np.uint8), zoom=(zoom, zoom))
        sheet.text(top + tile_h // 2 - _LINE // 2, _MARGIN, labels[i])
    return sheet.finish()


def token_picture(
    ids: Tensor,
    scores: Tensor,
    *,
    mask: Tensor | None = None,
    tokens: Callable[[list[int]], list[str]] | None = None,
    labels: Sequence[str] | None = None,
    scale: float | None = None,
    title: str = "",
) -> np.ndarray:
    """A token heat map: one row per sample, each token a cell coloured by its attribution, pads greyed.

    Args:
        ids: ``(N, L)`` token ids.
        scores: ``(N, L)`` signed per-token attribution (e.g. gradient x embedding summed over the embedding).
        mask: ``(N, L)`` attention mask; cells where it is 0 are drawn grey and left unlabelled.
        tokens: ``ids -> list[str]`` for one row (a tokenizer's ``convert_ids_to_tokens``); ids otherwise.
        labels: One caption per sample.
        scale: The colour scale (``None``: :func:`robust_scale` of the real tokens' scores).
        title: A line above the picture.

    Returns:
        ``(H, W, 3)`` uint8.

    Example:
        >>> picture = token_picture(torch.tensor([[5, 7, 0]]), torch.tensor([[0.5, -1.0, 0.0]]),
        ...                         mask=torch.tensor([[1, 1, 0]]), tokens=lambda row: [f"w{i}" for i in row])
        >>> picture.ndim, picture.dtype
        (3, dtype('uint8'))

    """
    scores = scores.detach().double().cpu().nan_to_num(0.0)
    real = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.detach().cpu().bool()
    scale = scale or robust_scale(scores[real] if real.any() else scores)
    used = int(real.any(0).nonzero().max()) + 1 if real.any() else scores.shape[1]  # trailing padding dropped
    shown = min(used, _MAX_COLUMNS)
    if shown < used:
        title = f"{title}  (the first {shown} of {used} tokens)".strip()
    n, length = scores.shape[0], shown
    rows = ids.tolist()
    labels = list(labels) if labels is not None else [f"sample {i}" for i in range(n)]
    words = [_words(tokens, row)[:shown] for row in rows]
    scores, real = scores[:, :shown], real[:, :shown]
    cell_w = int(np.clip(max(_text_width(w[:12]) for row in words for w in row) + 6, 24, 90))
    cell_h, strip, head = 18, _caption_width(labels), _LINE * (2 if title else 1) + 2
    sheet = _Sheet(head + n * cell_h + 2 * _LINE, strip + length * cell_w + _MARGIN + _colour_bar_width(scale), title)
    sheet.text(head - _LINE, strip, "token position ->")
    colours = _signed(scores.numpy(), scale)
    colours[~real.numpy()] = _PAD_GREY
    sheet.place(head, strip, colours, zoom=(cell_h, cell_w))
    sheet.pixels[head : head + n * cell_h, strip : strip + length * cell_w : cell_w] = 255  # a line between tokens
    dark = (colours.astype(float) @ np.array([0.299, 0.587, 0.114])) < 110
    for i, label in enumerate(labels):
        sheet.text(head + i * cell_h + 2, _MARGIN, label)
        for j in range(length):
            if real[i, j]:
                text, fill = _fit(words[i][j], cell_w - 4), (255, 255, 255) if dark[i, j] else _INK
                sheet.text(head + i * cell_h + 2, strip + j * cell_w + (cell_w - _text_width(text)) // 2, text, fill)
    sheet.text(head + n * cell_h + 4, strip, "grey: padding")
    _colour_bar(sheet, head, strip + length * cell_w + _MARGIN, n * cell_h, scale, "grad x input")
    return sheet.finish()


def _fit(text: str, width: int) -> str:
    """``text``, cut (with an ellipsis) to fit ``width`` pixels."""
    if _text_width(text) <= width:
        return text
    while text and _text_width(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _words(tokens: Callable[[list[int]], list[str]] | None, row: list[int]) -> list[str]:
    """One row's token texts (``tokens(row)``, or the ids), padded with the ids where ``tokens`` gives too few."""
    given = [str(word) for word in tokens(row)] if tokens is not None else []
    return given[: len(row)] + [str(token) for token in row[len(given) :]]
