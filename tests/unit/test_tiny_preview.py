"""Tiny Latent Preview: the documented, fixed projection of latent channels to RGB."""

import pytest
import torch

from comfyui_lycoris.nodes.preview_nodes import TinyLatentPreview, latent_to_rgb, preview_image, rgb_projection


def test_projection_is_fixed_and_orthonormal():
    for channels in (4, 16, 128):
        p = rgb_projection(channels)
        assert p.shape == (channels, 3)
        assert torch.allclose(p.T @ p, torch.eye(3), atol=1e-5)
        assert torch.equal(p, rgb_projection(channels)), "same channels, same projection"
    assert rgb_projection(2).shape == (2, 3), "fewer than 3 channels still give RGB"


def test_fixed_normalisation_is_comparable_across_batches():
    latents = torch.randn(2, 16, 4, 5, generator=torch.Generator().manual_seed(0))
    alone = latent_to_rgb(latents[:1], "fixed", 2.0)
    together = latent_to_rgb(latents, "fixed", 2.0)
    assert torch.allclose(alone[0], together[0], atol=1e-6), "fixed: an image does not depend on its batch"
    assert torch.allclose(latent_to_rgb(torch.zeros(1, 16, 2, 2), "fixed"), torch.full((1, 3, 2, 2), 0.5))
    batch = latent_to_rgb(latents, "batch", 2.0)
    assert 0.45 < float(batch.mean()) < 0.55 and batch.min() >= 0 and batch.max() <= 1


def test_image_shape_and_errors():
    image = preview_image(torch.randn(3, 128, 4, 6), scale=8, upscale="nearest")
    assert image.shape == (3, 32, 48, 3) and image.dtype == torch.float32
    assert torch.equal(image[:, :8, :8], image[:, :1, :1].expand(3, 8, 8, 3)), "nearest: whole cells"
    with pytest.raises(ValueError, match="latent"):
        preview_image(torch.randn(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="normalize"):
        latent_to_rgb(torch.randn(1, 4, 2, 2), "nope")
    with pytest.raises(ValueError, match="Tiny Latent Preview: value_range"):
        TinyLatentPreview.execute({"samples": torch.randn(1, 4, 2, 2)}, 4, "bilinear", "fixed", 0.0)
