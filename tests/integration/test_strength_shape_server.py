"""Per-block strengths and a strength schedule through the live server (Apply LyCORIS + Strength Schedule)."""

from __future__ import annotations

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
