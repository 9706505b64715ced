"""Strength sweeps: parsing the list, laying a batch out as a labelled grid."""

from __future__ import annotations

import math

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


def strength_grid(images: torch.Tensor, strengths: tuple[float, ...], label: str = "strength") -> torch.Tensor:
    """IMAGE [B, H, W, 3] (B a multiple of len(strengths), sample-major) -> one labelled grid image.

    Columns are strengths, rows are samples; a header row names each column's strength.
    """
    count = len(strengths)
    if images.shape[0] % count:
        raise ValueError(f"images: batch {images.shape[0]} is not a multiple of {count} strengths")
    rows, h, w = images.shape[0] // count, images.shape[1], images.shape[2]
    font_size = max(12, min(32, w // 10))
    header = font_size * 2
    pad = max(2, w // 64)
    canvas = Image.new("RGB", (count * (w + pad) + pad, header + rows * (h + pad) + pad), (24, 24, 28))
    draw = ImageDraw.Draw(canvas)
    font = _font(font_size)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    for i in range(images.shape[0]):
        row, col = divmod(i, count)
        x, y = pad + col * (w + pad), header + pad + row * (h + pad)
        canvas.paste(Image.fromarray(np.ascontiguousarray(pixels[i])), (x, y))
    for col, value in enumerate(strengths):
        text = f"{label} {value:g}"
        box = draw.textbbox((0, 0), text, font=font)
        x = pad + col * (w + pad) + max(0, (w - (box[2] - box[0])) // 2)
        draw.text((x, (header - (box[3] - box[1])) // 2 - box[1]), text, fill=(235, 235, 235), font=font)
    return torch.from_numpy(np.asarray(canvas).astype(np.float32) / 255.0)[None]
