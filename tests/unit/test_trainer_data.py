"""Dataset building: captions per image, folders with .txt captions, buckets, errors naming the item.

The VAE and text encoder are stand-ins here (this tests the pack's own bookkeeping); real
encoders are exercised in the server tests through the latent dataset path.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_lycoris.trainer.data import DatasetError, encoded_set, folder_items, load_image, split_captions


def encoders(calls):
    def encode_image(pixels):
        calls.append("img")
        return pixels.permute(0, 3, 1, 2)[:, :3, ::8, ::8] * 2.0

    def encode_text(text):
        calls.append(f"txt:{text}")
        return [[torch.full((1, 2, 4), float(len(text))), {"pooled_output": torch.zeros(1, 4)}]]

    return encode_image, encode_text


def test_captions_one_per_image_or_one_for_all():
    assert split_captions("a\nb\n", 2) == ["a", "b"]
    assert split_captions("same", 3) == ["same"] * 3
    with pytest.raises(DatasetError, match="2 lines for 3 images"):
        split_captions("a\nb", 3)


def test_encoded_set_buckets_sizes_and_encodes_each_caption_once():
    calls = []
    images = [torch.rand(64, 64, 3), torch.rand(64, 64, 3), torch.rand(32, 64, 3)]
    data = encoded_set(images, ["a cat", "a cat", "a dog"], *encoders(calls), repeats=2, caption_dropout=0.5)
    assert len(data) == 3 and sorted(len(v) for v in data.buckets().values()) == [1, 2]
    assert calls.count("txt:a cat") == 1 and "txt:" in calls, "equal captions once; the empty one for dropout"
    assert data.empty_conditioning is not None
    batches = data.batches(2, seed=0)
    for _ in range(6):
        batch = next(batches)
        assert len({tuple(data.latents[i].shape) for i in batch}) == 1, "a batch never mixes sizes"


def test_folder_items_need_captions_and_readable_images(tmp_path):
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("red square\n")
    assert folder_items(str(tmp_path)) == [(str(tmp_path / "a.png"), "red square")]
    assert load_image(str(tmp_path / "a.png")).shape == (16, 16, 3)
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="b.jpg: no caption file b.txt"):
        folder_items(str(tmp_path))
    (tmp_path / "b.txt").write_text("x")
    with pytest.raises(DatasetError, match="unreadable"):
        load_image(str(tmp_path / "b.jpg"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        folder_items(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="is not a folder"):
        folder_items(str(tmp_path / "missing"))


def test_mismatched_counts_name_the_problem():
    with pytest.raises(DatasetError, match="2 images but 1 captions"):
        encoded_set([torch.rand(8, 8, 3)] * 2, ["a"], *encoders([]))


def test_batches_resume_mid_epoch_where_an_uninterrupted_run_is():
    """A resumed run asks for batches from its step on: exactly the sequence a run from 0 reaches,
    mid-epoch included; every epoch holds each item `repeats` times; the seed changes the order."""
    from itertools import islice

    from comfyui_lycoris.trainer.data import TrainingSet

    data = TrainingSet([torch.zeros(4, 8, 8)] * 5 + [torch.zeros(4, 8, 16)] * 2, [[]], repeats=2)
    full = list(islice(data.batches(2, seed=3), 40))
    for start in (1, 5, 7, 8, 13):
        assert list(islice(data.batches(2, seed=3, start=start), 40 - start)) == full[start:], start
    epoch = full[:7]  # 10 + 4 item slots in batches of 2: 5 + 2 batches
    assert sorted(i for b in epoch for i in b) == sorted(list(range(7)) * 2)
    assert full[:7] != full[7:14], "each epoch is shuffled anew"
    assert list(islice(data.batches(2, seed=4), 40)) != full
