"""Training sets built in the graph: cached latents + conditioning, aspect buckets, repeats, dropout.

Items are kept as ComfyUI gives them (a VAE latent and a CONDITIONING per item); the loop turns
them into model inputs once, with the model's own `process_latent_in` / `extra_conds`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


class DatasetError(ValueError):
    """An unusable dataset; the message names the item."""


@dataclass(eq=False)
class TrainingSet:
    latents: list[torch.Tensor]  # one [C, H, W] VAE latent per item
    conditionings: list[list]  # one ComfyUI CONDITIONING per item
    repeats: int = 1
    caption_dropout: float = 0.0  # probability of training an item on the empty conditioning
    empty_conditioning: list | None = None
    captions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.latents:
            raise DatasetError("dataset: no items")
        if len(self.conditionings) not in (1, len(self.latents)):
            raise DatasetError(f"dataset: {len(self.latents)} latents but {len(self.conditionings)} conditionings "
                               "(give one for all, or one per latent)")
        for i, latent in enumerate(self.latents):
            if latent.ndim != 3 or not torch.isfinite(latent).all():
                raise DatasetError(f"dataset item {i}: latent must be a finite [C, H, W] tensor, "
                                   f"got shape {tuple(latent.shape)}")
        if not 0 <= self.caption_dropout <= 1:
            raise DatasetError(f"caption_dropout: must be between 0 and 1, got {self.caption_dropout}")
        if self.repeats < 1:
            raise DatasetError(f"repeats: must be at least 1, got {self.repeats}")

    def __len__(self) -> int:
        return len(self.latents)

    def conditioning(self, index: int) -> list:
        return self.conditionings[0] if len(self.conditionings) == 1 else self.conditionings[index]

    def buckets(self) -> dict[tuple[int, ...], list[int]]:
        """Items grouped by latent shape: a batch never mixes aspect ratios."""
        out: dict[tuple[int, ...], list[int]] = {}
        for i, latent in enumerate(self.latents):
            out.setdefault(tuple(latent.shape), []).append(i)
        return out

    def batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[list[int]]:
        """Endless shuffled epochs (each item `repeats` times; each batch from one bucket), from batch `start`.

        Each epoch's order comes from its own generator (`seed`, epoch number), not from the run's
        generator: a run resumed at batch `start` gets exactly the batches an uninterrupted run had
        from there, even mid-epoch, and the run's generator (noise, caption dropout) is not consumed.
        """
        epoch_number = 0
        while True:
            epoch = self._epoch(batch_size, torch.Generator().manual_seed(_epoch_seed(seed, epoch_number)))
            epoch_number += 1
            if start >= len(epoch):
                start -= len(epoch)
                continue
            yield from epoch[start:]
            start = 0

    def _epoch(self, batch_size: int, generator: torch.Generator) -> list[list[int]]:
        epoch: list[list[int]] = []
        for indices in self.buckets().values():
            pool = [i for i in indices for _ in range(self.repeats)]
            order = torch.randperm(len(pool), generator=generator).tolist()
            pool = [pool[j] for j in order]
            epoch += [pool[k : k + batch_size] for k in range(0, len(pool), batch_size)]
        return [epoch[j] for j in torch.randperm(len(epoch), generator=generator).tolist()]

    def drop_caption(self, generator: torch.Generator) -> bool:
        return self.caption_dropout > 0 and float(torch.rand(1, generator=generator)) < self.caption_dropout


def _epoch_seed(seed: int, epoch: int) -> int:
    """A generator seed per (run seed, epoch): distinct epochs, in torch's seed range."""
    return (int(seed) * 1_000_003 + epoch) % (1 << 63)


def from_latent_batch(latent: dict, conditioning: Sequence[Any], repeats: int = 1, caption_dropout: float = 0.0,
                      empty_conditioning: list | None = None) -> TrainingSet:
    """A set from a ComfyUI LATENT batch and one CONDITIONING (for every item) or a list of them."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise DatasetError("latent: expected a LATENT with a [B, C, H, W] 'samples' tensor")
    conds = [conditioning] if conditioning and isinstance(conditioning[0], list) and \
        isinstance(conditioning[0][0], torch.Tensor) else list(conditioning)
    return TrainingSet([s.detach().cpu() for s in samples], conds, repeats, caption_dropout, empty_conditioning)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def split_captions(text: str, count: int) -> list[str]:
    """One caption per line for `count` images, or a single line used for all of them."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise DatasetError(f"captions: {len(lines)} lines for {count} images (give one per image, or one for all)")
    return lines


def folder_items(folder: str) -> list[tuple[str, str]]:
    """(image path, caption) pairs of a folder: every image with a same-name .txt caption, sorted."""
    from pathlib import Path

    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"folder: '{folder}' is not a folder")
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(f"folder: no images ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'")
    items = []
    for image in images:
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise DatasetError(f"folder item {image.name}: no caption file {caption.name}")
        items.append((str(image), caption.read_text(encoding="utf-8").strip()))
    return items


def load_image(path: str) -> torch.Tensor:
    """An image file as a ComfyUI IMAGE item [H, W, 3] in 0..1; unreadable files name the file."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise DatasetError(f"image {path}: unreadable ({err})") from None
    return torch.from_numpy(np.asarray(rgb).astype("float32") / 255.0)


def encoded_set(images: list[torch.Tensor], captions: list[str], encode_image, encode_text, repeats: int = 1,
                caption_dropout: float = 0.0) -> TrainingSet:
    """Encode images ([H, W, 3] each) and captions once into a cached set (the VAE/CLIP calls are passed in).

    Images are encoded one at a time (sizes may differ: each size becomes a bucket); equal captions
    are encoded once.
    """
    if len(images) != len(captions):
        raise DatasetError(f"dataset: {len(images)} images but {len(captions)} captions")
    if not images:
        raise DatasetError("dataset: no images")
    latents, conds, cache = [], [], {}
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        if image.ndim != 3 or image.shape[-1] < 3:
            raise DatasetError(f"dataset item {i}: expected an [H, W, 3] image, got shape {tuple(image.shape)}")
        latents.append(encode_image(image[None, ..., :3])[0].detach().cpu())
        if caption not in cache:
            cache[caption] = encode_text(caption)
        conds.append(cache[caption])
    empty = encode_text("") if caption_dropout > 0 else None
    return TrainingSet(latents, conds, repeats, caption_dropout, empty, list(captions))
