"""The loss curve as an IMAGE: raw losses, an exponential moving average, labelled axes."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def smoothed(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected EMA (as TensorBoard's smoothing), skipping non-finite values."""
    out, avg, n = [], 0.0, 0
    for v in values:
        if math.isfinite(v):
            n += 1
            avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**n) if n else float("nan"))
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def loss_curve(points: list[tuple[int, float]], width: int = 640, height: int = 360, title: str = "loss") -> torch.Tensor:
    """IMAGE [1, H, W, 3] of (step, loss) points; an empty list gives a 'no steps yet' frame."""
    img = Image.new("RGB", (width, height), (22, 22, 26))
    draw = ImageDraw.Draw(img)
    font, small = _font(16), _font(12)
    left, right, top, bottom = 64, width - 16, 36, height - 40
    draw.text((left, 10), title, fill=(230, 230, 230), font=font)
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if not finite:
        draw.text((left, height // 2), "no steps yet", fill=(200, 200, 200), font=font)
        return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)[None]
    steps = [s for s, _ in points]
    lo, hi = min(v for _, v in finite), max(v for _, v in finite)
    hi = hi if hi > lo else lo + 1e-6
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (step - s0) / (s1 - s0) * (right - left), bottom - (value - lo) / (hi - lo) * (bottom - top))

    draw.rectangle((left, top, right, bottom), outline=(90, 90, 100))
    for frac in (0.0, 0.5, 1.0):
        value = lo + frac * (hi - lo)
        y = xy(s0, value)[1]
        draw.line((left - 4, y, left, y), fill=(150, 150, 160))
        draw.text((4, y - 7), f"{value:.3g}", fill=(200, 200, 200), font=small)
    for step in (s0, (s0 + s1) // 2, s1):
        x = xy(step, lo)[0]
        draw.text((x - 10, bottom + 6), str(step), fill=(200, 200, 200), font=small)
    draw.text(((left + right) // 2 - 14, height - 18), "step", fill=(200, 200, 200), font=small)
    raw = [xy(s, v) for s, v in finite]
    if len(raw) > 1:
        draw.line(raw, fill=(110, 140, 200), width=1)
    smooth = [xy(s, v) for s, v in zip(steps, smoothed([v for _, v in points]), strict=True) if math.isfinite(v)]
    if len(smooth) > 1:
        draw.line(smooth, fill=(255, 170, 60), width=3)
    draw.text((right - 170, 10), "raw", fill=(110, 140, 200), font=small)
    draw.text((right - 120, 10), "smoothed (EMA 0.9)", fill=(255, 170, 60), font=small)
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)[None]
