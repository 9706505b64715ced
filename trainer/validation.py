"""Validation previews while training, as SimpleTuner's `validation_lycoris_strength` promises.

A `Validation` (what the LyCORIS Validation node outputs) says what to sample: conditioning, a
latent (size and batch), sampler, scheduler, steps, cfg, Flux guidance, seed, the strengths, how
often, and optionally a VAE. The loop renders at step 0 (the base model: the adapter starts at
ΔW = 0), every `every` steps and at the end, with the live adapter snapshot applied in bypass
exactly as Apply LyCORIS applies it, through ComfyUI's own sampler code (a KSampler node's), the
same noise each time. Each image is written atomically as
`<job folder>/validation/step-000100_s1.0.png` and published to the reporter.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core import api, host
from ..core.adapter_file import atomic_write
from ..core.latent_preview import preview_image

SUBFOLDER = "validation"


@dataclass(frozen=True)
class Validation:
    """What to render and how often (a LYCORIS_VALIDATION value)."""

    positive: list
    negative: list
    latent: dict
    sampler_name: str
    scheduler: str
    steps: int
    cfg: float
    seed: int
    strengths: tuple[float, ...]
    every: int
    guidance: float | None = None
    vae: Any = None

    def __post_init__(self) -> None:
        if not self.strengths:
            raise ValueError("strengths: give at least one strength, e.g. 1.0 or 0, 1")
        bad = [s for s in self.strengths if not math.isfinite(s)]
        if bad:
            raise ValueError(f"strengths: must be finite numbers, got {bad[0]}")
        if self.every < 1:
            raise ValueError(f"every: must be at least 1, got {self.every}")

    def due(self, step: int, last: int) -> bool:
        """Render after `step` steps? At 0, every `every` steps and at the last step."""
        return step == 0 or step == last or step % self.every == 0


def parse_strengths(text: str) -> tuple[float, ...]:
    """'1.0' or '0, 1' (commas or spaces) -> strengths, without repeats; ValueError naming `strengths`."""
    values = []
    for token in text.replace(",", " ").split():
        try:
            value = float(token)
        except ValueError:
            raise ValueError(f"strengths: '{token}' is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"strengths: must be finite numbers, got {token}")
        values.append(value)
    if not values:
        raise ValueError("strengths: give at least one strength, e.g. 1.0 or 0, 1")
    return tuple(dict.fromkeys(values))


@dataclass(frozen=True)
class Preview:
    """One rendered validation image."""

    step: int
    strength: float
    path: Path
    image: torch.Tensor  # IMAGE [B, H, W, 3] in 0..1


def file_name(step: int, strength: float) -> str:
    return f"step-{step:06d}_s{strength:g}.png"


def _png_bytes(image: torch.Tensor) -> bytes:
    """One PNG of a [B, H, W, 3] IMAGE (a batch side by side)."""
    from PIL import Image

    row = torch.cat(list(image), dim=1) if image.shape[0] > 1 else image[0]
    pixels = (row.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def render(validation: Validation, patcher: Any, adapter: Any, step: int, folder: Path) -> tuple[list[Preview], float]:
    """Render every strength of `validation` with `adapter` (a LoadedAdapter snapshot) applied to `patcher`.

    Returns the previews and the seconds it took. Runs under `torch.no_grad()`; the model is the
    same MODEL the job trains, with the snapshot applied on a clone as Apply LyCORIS does.
    """
    started = time.monotonic()
    out = folder / SUBFOLDER
    out.mkdir(parents=True, exist_ok=True)
    previews = []
    with torch.no_grad():
        for strength in validation.strengths:
            model = api.apply(patcher, adapter, strength)
            samples = host.ksample(model, validation.positive, validation.negative, validation.latent,
                                   validation.seed, validation.steps, validation.cfg, validation.sampler_name,
                                   validation.scheduler, validation.guidance)
            image = decode(validation.vae, samples)
            path = out / file_name(step, strength)
            data = _png_bytes(image)
            atomic_write(path, lambda tmp, data=data: tmp.write_bytes(data))
            previews.append(Preview(step, strength, path, image))
    return previews, time.monotonic() - started


def decode(vae: Any, samples: torch.Tensor) -> torch.Tensor:
    """IMAGE of sampled latents: the VAE's decode, or the Tiny Latent Preview projection without one."""
    if vae is not None:
        image = vae.decode(samples)
        return image.reshape(-1, *image.shape[-3:]).float().cpu()
    return preview_image(samples, scale=8, normalize="fixed")


def strip(previews: Sequence[Preview]) -> torch.Tensor:
    """All previews as one IMAGE grid: a row per strength, a column per step (first image of each batch)."""
    steps = sorted({p.step for p in previews})
    strengths = list(dict.fromkeys(p.strength for p in previews))
    by_key = {(p.step, p.strength): p.image[0] for p in previews}
    h, w = next(iter(by_key.values())).shape[:2]
    blank = torch.zeros(h, w, 3)
    rows = [torch.cat([by_key.get((s, k), blank) for s in steps], dim=1) for k in strengths]
    return torch.cat(rows, dim=0)[None]
