"""Per-block strengths and a strength schedule through the live server (Apply LyCORIS + Strength Schedule)."""

from __future__ import annotations

import json

import pytest
from graphs import train_prompt
from safetensors.torch import load_file

from comfyserver import PromptError

pytestmark = pytest.mark.integration


def graph(prefix: str, **apply_inputs) -> dict:
    prompt = train_prompt(3, "shape/adapter")
    prompt["train"]["inputs"]["learning_rate"] = 0.05  # an adapter that visibly changes samples
    prompt.update({
        "job": {"class_type": "LycorisJob", "inputs": {"job": ["train", 0], "wait": True}},
        "apply": {"class_type": "LycorisApply", "inputs": {"model": ["model", 0], "adapter": ["job", 0],
                                                           "strength": 1.0, **apply_inputs}},
        "empty": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["apply", 0], "positive": ["cond", 0], "negative": ["cond", 0], "latent_image": ["empty", 0],
            "seed": 3, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}},
    })
    return prompt


def latent(server, outputs):
    saved = outputs["save"]["latents"][0]
    return load_file(str(server.base / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]


def test_block_presets_lines_and_schedules(comfy_server):
    preset = latent(comfy_server, comfy_server.run(graph("shape/preset", block_preset="Flux: single blocks only")))
    typed = latent(comfy_server, comfy_server.run(graph("shape/typed", block_strengths="double_blocks.* = 0")))
    full = latent(comfy_server, comfy_server.run(graph("shape/full")))
    off = latent(comfy_server, comfy_server.run(graph("shape/off", block_strengths="* = 0")))
    assert (preset == typed).all(), "the preset is those lines"
    assert not (preset == full).all() and not (preset == off).all()
    prompt = graph("shape/scheduled")
    prompt["schedule"] = {"class_type": "LycorisStrengthSchedule", "inputs": {
        "mode": "window", "start": 0.0, "end": 1.0, "ramp": 0.0, "keyframes": "", "steps": 4,
        "scheduler": "simple", "model": ["model", 0]}}
    prompt["apply"]["inputs"]["schedule"] = ["schedule", 0]
    outputs = comfy_server.run(prompt)
    assert (latent(comfy_server, outputs) == full).all(), "a schedule of 1 everywhere is the plain strength"
    prompt["schedule"]["inputs"].update(mode="keyframes", keyframes="0 = 0\n1 = 0")
    assert (latent(comfy_server, comfy_server.run(prompt)) == off).all(), "a schedule of 0 is the base model"
    with pytest.raises(PromptError, match="blocks: pattern 'dubble_blocks.\\*' matches no adapted module"):
        comfy_server.run(graph("shape/typo", block_strengths="dubble_blocks.* = 0"))


VARIANTS = [  # (name, block preset, early-steps schedule): the four looks of example workflow 07
    ("full", "all blocks", False), ("double blocks only", "Flux: double blocks only", False),
    ("single blocks only", "Flux: single blocks only", False), ("early steps", "all blocks", True)]
EARLY = {"mode": "window", "start": 0.0, "end": 0.4, "ramp": 0.05, "keyframes": "", "steps": 4,
         "scheduler": "simple"}


def variants_graph(prefix: str) -> dict:
    prompt = graph(prefix)
    del prompt["apply"]
    prompt["early"] = {"class_type": "LycorisStrengthSchedule", "inputs": {**EARLY, "model": ["model", 0]}}
    previous = None
    for i, (name, preset, early) in enumerate(VARIANTS):
        inputs = {"name": name, "strength": 0.9, "block_preset": preset, "block_strengths": ""}
        if early:
            inputs["schedule"] = ["early", 0]
        if previous:
            inputs["variants"] = [previous, 0]
        previous = f"variant{i}"
        prompt[previous] = {"class_type": "LycorisVariant", "inputs": inputs}
    prompt["ab"] = {"class_type": "LycorisAB", "inputs": {"model": ["model", 0], "adapter": ["job", 0],
                                                          "strengths": "0, 1", "latent": ["empty", 0],
                                                          "variants": [previous, 0]}}
    prompt["sample"]["inputs"].update(model=["ab", 0], latent_image=["ab", 1])
    prompt["labels"] = {"class_type": "PreviewAny", "inputs": {"source": ["ab", 2]}}
    prompt["preview"] = {"class_type": "LycorisTinyLatentPreview", "inputs": {
        "latent": ["sample", 0], "scale": 16, "upscale": "nearest", "normalize": "fixed", "value_range": 2.0}}
    prompt["grid"] = {"class_type": "LycorisStrengthGrid", "inputs": {"images": ["preview", 0],
                                                                      "strengths": ["ab", 2]}}
    prompt["save_grid"] = {"class_type": "SaveImage", "inputs": {"images": ["grid", 0], "filename_prefix": prefix}}
    return prompt


def test_variants_in_one_batch_equal_each_variant_applied_alone(comfy_server):
    """The A/B batch of four named variants against four separate graphs, each with one Apply LyCORIS."""
    import numpy as np
    import torch
    from PIL import Image

    from comfyui_lycoris.core.grid import strength_grid

    outputs = comfy_server.run(variants_graph("shape/variants"))
    batch = latent(comfy_server, outputs)
    assert batch.shape[0] == len(VARIANTS)
    names = [name for name, _, _ in VARIANTS]
    assert outputs["labels"]["text"][0] == ", ".join(names)
    alone = []
    for name, preset, early in VARIANTS:
        prompt = graph(f"shape/alone_{name.replace(' ', '_')}", block_preset=preset)
        prompt["apply"]["inputs"]["strength"] = 0.9
        if early:
            prompt["early"] = {"class_type": "LycorisStrengthSchedule", "inputs": {**EARLY, "model": ["model", 0]}}
            prompt["apply"]["inputs"]["schedule"] = ["early", 0]
        alone.append(latent(comfy_server, comfy_server.run(prompt))[0])
    for i, name in enumerate(names):
        assert torch.allclose(batch[i], alone[i], atol=1e-5, rtol=1e-5), \
            f"{name}: {float((batch[i] - alone[i]).abs().max())}"
    for i in range(len(names)):
        for j in range(i):
            assert not torch.allclose(alone[i], alone[j], atol=1e-4), f"{names[i]} and {names[j]} look different"
    # The grid's header carries the names: the same header as a grid labelled with them, not with strengths.
    item = outputs["save_grid"]["images"][0]
    grid = np.asarray(Image.open(comfy_server.base / "output" / item["subfolder"] / item["filename"]).convert("RGB"))
    blank = torch.zeros(len(names), 64, 64, 3)
    named = (strength_grid(blank, names)[0] * 255).round().byte().numpy()
    numbered = (strength_grid(blank, (0.0, 1.0, 2.0, 3.0))[0] * 255).round().byte().numpy()
    assert grid.shape == named.shape
    header = named.shape[0] - (64 + 2) - 2  # above one row of 64 px previews (pad 2)
    def off(a, b):  # SaveImage truncates 255 x value: one level either way
        rows = min(header, b.shape[0] - 68)
        return int(np.abs(a[:rows].astype(int) - b[:rows].astype(int)).max())

    assert off(grid, named) <= 1 and off(grid, numbered) > 100


def refused_at_validation(server, prompt: dict) -> str:
    """The node errors of `prompt` (the training nodes still run: ComfyUI refuses only the outputs they reach)."""
    answer = server.post("/prompt", {"prompt": prompt, "client_id": server.client_id})
    server.wait(answer["prompt_id"])
    return json.dumps(answer["node_errors"])


def test_variant_errors_name_the_variant(comfy_server):
    prompt = variants_graph("shape/variant_typo")
    prompt["variant1"]["inputs"]["block_strengths"] = "dubble_blocks.* = 0"
    with pytest.raises(PromptError, match="variants: 'double blocks only': blocks: pattern 'dubble_blocks.\\*'"):
        comfy_server.run(prompt)
    prompt = variants_graph("shape/variant_twice")
    prompt["variant2"]["inputs"]["name"] = "full"
    with pytest.raises(PromptError, match="name: 'full' is already a variant"):
        comfy_server.run(prompt)
    prompt["variant2"]["inputs"]["name"] = "single, blocks"
    assert "name: 'single, blocks' contains ','" in refused_at_validation(comfy_server, prompt)
