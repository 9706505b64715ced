"""Strength sweeps: parsing, latent repetition with shared noise, the labelled grid."""

import pytest
import torch

from comfyui_lycoris.core.grid import parse_strengths, strength_grid, sweep_latent
from comfyui_lycoris.core.runtime import per_sample_strengths


def test_parse_strengths():
    assert parse_strengths("0, 0.5 ,1;-2") == (0.0, 0.5, 1.0, -2.0)
    with pytest.raises(ValueError, match="'x' is not a number"):
        parse_strengths("0, x")
    with pytest.raises(ValueError, match="outside -10..10"):
        parse_strengths("11")
    with pytest.raises(ValueError, match="at least one"):
        parse_strengths(" , ")


def test_sweep_latent_repeats_each_sample_with_its_noise_index():
    latent = {"samples": torch.arange(2 * 3).float().view(2, 3, 1, 1)}
    out = sweep_latent(latent, 3)
    assert out["samples"].shape[0] == 6
    assert torch.equal(out["samples"][3], latent["samples"][1])
    assert out["batch_index"] == [0, 0, 0, 1, 1, 1]


def test_strength_of_each_sample_follows_the_sweep_in_every_cfg_chunk():
    # 2 latents x 3 strengths = 6 samples per chunk, cond + uncond chunks = 12
    vec = per_sample_strengths((0.0, 0.5, 1.0), batch=12, chunks=2)
    assert vec.tolist() == [0.0, 0.5, 1.0] * 4
    assert per_sample_strengths((0.7,), batch=4, chunks=2) == 0.7


def test_grid_layout_and_labels():
    images = torch.zeros(4, 32, 48, 3)
    images[1] = 1.0  # sample 0, strength 1 is white
    grid = strength_grid(images, (0.0, 1.0))
    assert grid.shape[0] == 1 and grid.shape[3] == 3
    h, w = grid.shape[1], grid.shape[2]
    assert w > 2 * 48 and h > 2 * 32, "two columns, two rows and a header"
    right_cell = grid[0, h - 32 - 40 : h - 40, w // 2 + 10 : w - 10]
    assert right_cell.numel() and grid[0, :, w // 2 :].max() == 1.0
    header = grid[0, : h - 2 * 32 - 4]
    assert (header > 0.5).any(), "labels are drawn in the header"
    with pytest.raises(ValueError, match="not a multiple of 3"):
        strength_grid(images, (0.0, 0.5, 1.0))


def test_grid_labels_are_strengths_or_variant_names():
    from comfyui_lycoris.core.grid import parse_labels

    assert parse_labels("0, 0.5;1") == (0.0, 0.5, 1.0)
    assert parse_labels("full, double blocks only") == ("full", "double blocks only")
    with pytest.raises(ValueError, match="outside -10..10"):
        parse_labels("0, 11")
    with pytest.raises(ValueError, match="give at least one"):
        parse_labels(" , ")
    images = torch.zeros(2, 32, 48, 3)
    named = strength_grid(images, ("a very long variant name", "b"))
    numbered = strength_grid(images, (0.0, 1.0))
    assert named.shape[2] == numbered.shape[2] and named.shape[1] > numbered.shape[1], "the long name wraps"
    header = named[0, : named.shape[1] - 2 * 32]
    assert not torch.equal(header[:24], numbered[0, :24])
    gap = slice(48 + 1, 48 + 3)  # between the two columns: no text runs over
    assert (header[:, :48] > 0.5).any() and not (header[:, gap] > 0.5).any(), "the long name stays in its column"
