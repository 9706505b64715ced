"""Strength sweeps: parsing the list, laying a batch out as a labelled grid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def parse_strengths(text: str) -> tuple[float, ...]:
    """'0, 0.5, 1' -> (0.0, 0.5, 1.0); errors name the bad item."""
    items = [item.strip() for item in text.replace(";", ",").split(",") if item.strip()]
    if not items:
        raise ValueError("strengths: give at least one number, e.g. '0, 0.5, 1'")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"strengths: '{item}' is not a number") from None
        if not math.isfinite(value) or abs(value) > 10:
            raise ValueError(f"strengths: {item} is outside -10..10")
        values.append(value)
    return tuple(values)


LABEL_SEPARATORS = ",;"  # between the items of a strengths / labels text; never inside a variant name


def _items(text: str) -> list[str]:
    for sep in LABEL_SEPARATORS[1:]:
        text = text.replace(sep, LABEL_SEPARATORS[0])
    return [item.strip() for item in text.split(LABEL_SEPARATORS[0]) if item.strip()]


def parse_labels(text: str) -> tuple[float, ...] | tuple[str, ...]:
    """The grid's columns: strengths ('0, 0.5, 1', checked as `parse_strengths`) or, when any item is not
    a number, the variant names LyCORIS A/B gives ('full, double blocks only')."""
    items = _items(text)
    if not items:
        raise ValueError("strengths: give at least one strength or variant name, e.g. '0, 0.5, 1'")
    for item in items:
        try:
            float(item)
        except ValueError:
            return tuple(items)
    return parse_strengths(text)


def sweep_latent(latent: dict, count: int) -> dict:
    """Each latent sample repeated `count` times in a row, sharing its noise (same batch_index)."""
    samples = latent["samples"]
    out = dict(latent)
    out["samples"] = samples.repeat_interleave(count, dim=0)
    index = torch.tensor(latent.get("batch_index", list(range(samples.shape[0]))))
    out["batch_index"] = index.repeat_interleave(count).tolist()
    if isinstance(latent.get("noise_mask"), torch.Tensor) and latent["noise_mask"].shape[0] == samples.shape[0]:
        out["noise_mask"] = latent["noise_mask"].repeat_interleave(count, dim=0)
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """`text` in lines no wider than `width` (words kept whole; a word too long for a line is cut with '…')."""
    lines: list[str] = []
    for word in text.split():
        joined = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(joined, font=font) <= width:
            lines[-1] = joined
            continue
        while len(word) > 1 and draw.textlength(word, font=font) > width:
            word = word[:-2] + "…"
        lines.append(word)
    return lines or [""]


def _header(draw: ImageDraw.ImageDraw, texts: list[str], width: int, size: int):
    """(font, lines per text): the largest font down to 9 px in which every text fits one line of `width`,
    else 9 px with the texts wrapped."""
    for points in range(size, 8, -1):
        font = _font(points)
        if all(draw.textlength(t, font=font) <= width for t in texts):
            return font, points, [[t] for t in texts]
    font = _font(9)
    return font, 9, [_wrap(draw, t, font, width) for t in texts]


def strength_grid(images: torch.Tensor, strengths: Sequence[float | str], label: str = "strength") -> torch.Tensor:
    """IMAGE [B, H, W, 3] (B a multiple of len(strengths), sample-major) -> one labelled grid image.

    Columns are strengths (headed '<label> 0.5') or named variants (headed with the name, wrapped when
    the column is narrow), rows are samples.
    """
    count = len(strengths)
    if images.shape[0] % count:
        raise ValueError(f"images: batch {images.shape[0]} is not a multiple of {count} strengths")
    rows, h, w = images.shape[0] // count, images.shape[1], images.shape[2]
    pad = max(2, w // 64)
    texts = [value if isinstance(value, str) else f"{label} {value:g}" for value in strengths]
    font, points, lines = _header(ImageDraw.Draw(Image.new("RGB", (1, 1))), texts, w - 2,
                                  max(12, min(32, w // 10)))
    line_h = round(points * 1.25)
    header = max(points * 2, max(len(t) for t in lines) * line_h + points)
    canvas = Image.new("RGB", (count * (w + pad) + pad, header + rows * (h + pad) + pad), (24, 24, 28))
    draw = ImageDraw.Draw(canvas)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    for i in range(images.shape[0]):
        row, col = divmod(i, count)
        x, y = pad + col * (w + pad), header + pad + row * (h + pad)
        canvas.paste(Image.fromarray(np.ascontiguousarray(pixels[i])), (x, y))
    for col, text_lines in enumerate(lines):
        top = (header - len(text_lines) * line_h) // 2
        for k, text in enumerate(text_lines):
            box = draw.textbbox((0, 0), text, font=font)
            x = pad + col * (w + pad) + max(0, (w - (box[2] - box[0])) // 2)
            y = top + k * line_h + (line_h - (box[3] - box[1])) // 2 - box[1]
            draw.text((x, y), text, fill=(235, 235, 235), font=font)
    return torch.from_numpy(np.asarray(canvas).astype(np.float32) / 255.0)[None]
