"""A latent batch as pictures without a VAE: the fixed, documented projection of Tiny Latent Preview.

The C latent channels are mapped to RGB by the 3 orthonormal columns of the QR factor of a
C x 3 standard normal matrix drawn from `torch.Generator().manual_seed(0)` in float64 (the
first 3 principal directions of that seeded projection); each RGB value is then mapped to
0..1 by `0.5 + v / (2 * value_range)`, clamped, where v is the projected value itself ("fixed"),
or its distance from the mean in standard deviations over the whole batch ("batch": images
of one batch, e.g. an A/B sweep, share one scale) or over each image ("image"). Finally each
latent cell becomes `scale` x `scale` pixels (bilinear or nearest). Used by the node and by the
trainer's validation previews when no VAE is given.
"""

from __future__ import annotations

import torch

PROJECTION_SEED = 0
NORMALIZE = ("fixed", "batch", "image")
UPSCALE = ("bilinear", "nearest")


def rgb_projection(channels: int) -> torch.Tensor:
    """[channels, 3] orthonormal columns (QR of a seeded normal matrix); fewer channels repeat."""
    gen = torch.Generator().manual_seed(PROJECTION_SEED)
    matrix = torch.randn(max(channels, 3), 3, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(matrix)
    q = q * torch.sign(torch.diagonal(r))  # a unique sign per column, whatever the QR backend
    return q[:channels].float()


def latent_to_rgb(samples: torch.Tensor, normalize: str = "batch", value_range: float = 2.0) -> torch.Tensor:
    """[B, C, H, W] latents -> [B, 3, H, W] in 0..1 by the fixed projection (module docstring)."""
    if samples.ndim != 4:
        raise ValueError(f"latent: expected [batch, channels, height, width], got shape {list(samples.shape)}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize: '{normalize}' is not one of {', '.join(NORMALIZE)}")
    if not value_range > 0:
        raise ValueError(f"value_range: must be > 0, got {value_range}")
    x = samples.detach().float().cpu()
    rgb = torch.einsum("bchw,ck->bkhw", x, rgb_projection(x.shape[1]))
    if normalize != "fixed":
        dims = (0, 2, 3) if normalize == "batch" else (2, 3)
        count = rgb.shape[2] * rgb.shape[3] * (rgb.shape[0] if normalize == "batch" else 1)
        mean = rgb.mean(dim=dims, keepdim=True)
        std = rgb.std(dim=dims, keepdim=True) if count > 1 else torch.ones_like(mean)
        rgb = (rgb - mean) / std.clamp_min(1e-6)
    return (0.5 + rgb / (2 * value_range)).clamp(0, 1)


def preview_image(samples: torch.Tensor, scale: int = 16, upscale: str = "bilinear", normalize: str = "batch",
                  value_range: float = 2.0) -> torch.Tensor:
    """IMAGE [B, H * scale, W * scale, 3] of a latent batch."""
    if upscale not in UPSCALE:
        raise ValueError(f"upscale: '{upscale}' is not one of {', '.join(UPSCALE)}")
    rgb = latent_to_rgb(samples, normalize, value_range)
    size = (rgb.shape[2] * scale, rgb.shape[3] * scale)
    if upscale == "nearest":
        rgb = torch.nn.functional.interpolate(rgb, size=size, mode="nearest")
    else:
        rgb = torch.nn.functional.interpolate(rgb, size=size, mode="bilinear", align_corners=False)
    return rgb.clamp(0, 1).permute(0, 2, 3, 1).contiguous()
