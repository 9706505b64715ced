"""Recipes for tiny, seeded, random-weight models of each supported family.

No weights can be downloaded in tests or the demo, and ComfyUI's model detection cannot load a
small Flux 2 or SDXL state dict (it hard-codes sizes), so tiny models are described here as
ComfyUI `unet_config` dicts and built directly through `comfy.supported_models` (see `host.py`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

FAMILIES = ("flux2", "flux1", "sdxl")

# Width of the pooled text embedding each family's conditioning carries (`pooled_output`).
# SDXL's is fixed by its ADM input (1280 + 6 * 256 = 2816); Flux 2 has none but the key must exist.
TINY_POOLED_DIM = {"flux1": 32, "flux2": 32, "sdxl": 1280}


class TinyModelError(ValueError):
    """A size combination that cannot form a valid model; the message names the input."""


@dataclass(frozen=True)
class TinySizes:
    """User-facing sizes of a tiny model (the node's inputs)."""

    family: str = "flux2"
    width: int = 128  # hidden size (Flux) or model channels (SDXL)
    heads: int = 1  # attention heads (Flux); SDXL always has 64 channels per head (ComfyUI fixes it)
    depth: int = 1  # double-stream blocks (Flux) or transformer depth per attention level (SDXL)
    single_depth: int = 1  # single-stream blocks (Flux only)
    context_dim: int = 64  # text-embedding width the model expects
    seed: int = 0


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise TinyModelError(message)


def _flux1_axes(head_dim: int) -> list[int]:
    """Rotary axes for Flux 1 in its (t, h, w) proportions (16, 56, 56 at head dim 128)."""
    first = max(2, (head_dim // 8) // 2 * 2)
    second = ((head_dim - first) // 2) // 2 * 2
    return [first, second, head_dim - first - second]


def unet_config(sizes: TinySizes) -> dict:
    """The ComfyUI `unet_config` of a tiny model; raises TinyModelError naming a bad input."""
    _check(sizes.family in FAMILIES, f"family: '{sizes.family}' is not one of {', '.join(FAMILIES)}")
    for name in ("width", "heads", "depth", "context_dim"):
        _check(getattr(sizes, name) >= 1, f"{name}: must be at least 1, got {getattr(sizes, name)}")
    if sizes.family == "sdxl":
        return _sdxl_config(sizes)
    _check(sizes.width % sizes.heads == 0, f"width: {sizes.width} is not divisible by heads={sizes.heads}")
    head_dim = sizes.width // sizes.heads
    if sizes.family == "flux2":
        _check(head_dim % 8 == 0, f"width/heads: head dim {head_dim} must be a multiple of 8 (4 rotary axes)")
        return dict(
            image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
            context_in_dim=sizes.context_dim, hidden_size=sizes.width, mlp_ratio=3.0,
            num_heads=sizes.heads, depth=sizes.depth, depth_single_blocks=sizes.single_depth,
            axes_dim=[head_dim // 4] * 4, theta=2000, patch_size=1, qkv_bias=False,
            guidance_embed=True, global_modulation=True, mlp_silu_act=True, ops_bias=False,
            default_ref_method="index", ref_index_scale=10.0,
        )
    if sizes.family == "flux1":
        _check(head_dim % 8 == 0 and head_dim >= 16, f"width/heads: head dim {head_dim} must be a multiple of 8, at least 16")
        return dict(
            image_model="flux", in_channels=16, out_channels=16, vec_in_dim=TINY_POOLED_DIM["flux1"],
            context_in_dim=sizes.context_dim, hidden_size=sizes.width, mlp_ratio=4.0,
            num_heads=sizes.heads, depth=sizes.depth, depth_single_blocks=sizes.single_depth,
            axes_dim=_flux1_axes(head_dim), theta=10000, patch_size=2, qkv_bias=True,
            guidance_embed=True,
        )


# What a newer ComfyUI's `FluxParams` requires that 0.3.75's does not take (v0.33: `txt_ids_dims`,
# the position-id axes the text tokens use: [3] for Flux 2, none for Flux 1).
FLUX_PARAM_EXTRAS = {"flux2": {"txt_ids_dims": [3]}, "flux1": {"txt_ids_dims": []}}


def fit_flux_params(config: dict, family: str, fields: dict[str, bool]) -> dict:
    """`config` completed for the installed ComfyUI's `FluxParams`, read from its dataclass fields.

    `fields` maps each field name to whether it is required (no default). Extras (FLUX_PARAM_EXTRAS)
    are added only where that ComfyUI has the field, so one recipe builds on 0.3.75 and on v0.33;
    a required field this recipe cannot fill raises TinyModelError naming it.
    """
    if family not in FLUX_PARAM_EXTRAS:
        return dict(config)
    out = dict(config)
    for name, value in FLUX_PARAM_EXTRAS[family].items():
        if name in fields and name not in out:
            out[name] = list(value)
    missing = [name for name, required in fields.items() if required and name not in out]
    _check(not missing, f"family: this ComfyUI's FluxParams needs {', '.join(missing)}, which the tiny "
                        f"{family} recipe does not know")
    return out


def _sdxl_config(sizes: TinySizes) -> dict:
    """SDXL's block layout (3 levels, attention on levels 2 and 3), with small widths."""
    # Group norms need multiples of 32; attention levels (2x, 4x width) then hold whole 64-channel heads.
    _check(sizes.width % 32 == 0, f"width: SDXL model channels must be a multiple of 32, got {sizes.width}")
    d = sizes.depth
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": sizes.width, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, d, d, d, d],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": d, "use_linear_in_transformer": True,
        "context_dim": sizes.context_dim, "num_head_channels": 64,
        "transformer_depth_output": [0, 0, 0, d, d, d, d, d, d],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


@torch.no_grad()
def seed_parameters(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter deterministically from `seed`, in name order.

    ComfyUI builds models with uninitialised weights (`disable_weight_init`), so a tiny model
    needs its own init. Matrices get N(0, 1/fan_in) so activations stay O(1) through depth;
    1-D tensors named like norm scales get 1, other vectors small noise.
    """
    gen = torch.Generator().manual_seed(int(seed))
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            value = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
        elif name.endswith(("scale", "norm.weight")) or ".norm" in name and name.endswith("weight"):
            value = torch.ones(p.shape)
        else:
            value = torch.randn(p.shape, generator=gen) * 0.02
        p.copy_(value.to(p.dtype))


def text_embedding(text: str, tokens: int, dim: int, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic stand-in for a text encoder: each word gets a fixed random vector.

    Returns `(cond [1, tokens, dim], pooled [1, pooled_dim])`. Different captions give different
    conditioning (so a tiny model can learn caption-dependent output); the same caption always
    gives the same tensors, on any machine.
    """
    words = text.split() or [""]
    rows = []
    for i in range(tokens):
        word = words[i % len(words)] if i < len(words) else ""
        digest = hashlib.sha256(f"{i}:{word}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        rows.append(torch.randn(dim, generator=gen))
    cond = torch.stack(rows)[None]
    digest = hashlib.sha256(("pooled:" + " ".join(words)).encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    pooled = torch.randn(1, pooled_dim, generator=gen)
    return cond, pooled


def pattern_latents(channels: int, height: int, width: int, count: int, seed: int = 0) -> torch.Tensor:
    """`count` smooth, structured latents [count, C, H, W] (sums of low-frequency waves), seeded.

    A stand-in for encoded training images: unlike noise they have structure a small adapter
    can learn, so a tiny training run shows its loss fall and its samples move toward the data.
    """
    gen = torch.Generator().manual_seed(int(seed))
    ys = torch.linspace(0, 1, height).view(1, 1, height, 1)
    xs = torch.linspace(0, 1, width).view(1, 1, 1, width)
    out = torch.zeros(count, channels, height, width)
    for _ in range(3):
        fy, fx = torch.randint(1, 3, (2, count, channels, 1, 1), generator=gen).float()
        phase = torch.rand(count, channels, 1, 1, generator=gen) * 6.283
        amp = torch.randn(count, channels, 1, 1, generator=gen)
        out += amp * torch.sin(6.283 * (fy * ys + fx * xs) + phase)
    return out / 3**0.5
