"""The pack inside a live ComfyUI server: registration over HTTP, version, and a real graph."""

import re

import pytest
from safetensors.torch import load_file

from comfyenv import comfy_root
from comfyui_lycoris.nodes import NODE_CLASS_MAPPINGS

pytestmark = pytest.mark.integration


def test_object_info_lists_every_node_with_tooltips(comfy_server):
    info = comfy_server.get("/object_info")
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id in info, f"{node_id} not registered in the live server"
        entry = info[node_id]
        assert entry["category"].startswith("LyCORIS")
        assert entry["description"]
        schema_ids = [i.id for i in cls.define_schema().inputs]
        served = {**entry["input"].get("required", {}), **entry["input"].get("optional", {})}
        assert sorted(served) == sorted(schema_ids)
        for name, spec in served.items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} served without tooltip"
    print(f"live server at {comfy_server.url} lists {len(NODE_CLASS_MAPPINGS)} LyCORIS nodes")


def test_server_runs_the_comfyui_under_test(comfy_server):
    """COMFYUI_PATH (or the pinned .comfyui) decides which ComfyUI serves the tests."""
    text = (comfy_root() / "comfyui_version.py").read_text()
    expected = re.search(r'__version__ = "([^"]+)"', text).group(1)
    reported = comfy_server.get("/system_stats")["system"]["comfyui_version"]
    assert reported == expected


def smoke_prompt(**model_inputs) -> dict:
    """Tiny Flux 2 -> tiny text -> KSampler (3 steps) -> SaveLatent."""
    model = {"family": "flux2", "width": 128, "heads": 1, "depth": 1, "single_depth": 1,
             "context_dim": 64, "seed": 0, "dtype": "float32", **model_inputs}
    return {
        "1": {"class_type": "LycorisTinyModel", "inputs": model},
        "2": {"class_type": "LycorisTinyTextEncode", "inputs": {"model": ["1", 0], "text": "a cat", "tokens": 8}},
        "3": {"class_type": "LycorisTinyTextEncode", "inputs": {"model": ["1", 0], "text": "", "tokens": 8}},
        "4": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 1, "steps": 3, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "smoke/tiny"}},
    }


def test_tiny_flux2_graph_samples_and_saves(comfy_server):
    outputs = comfy_server.run(smoke_prompt())
    saved = outputs["6"]["latents"][0]
    latent = load_file(str(comfy_server.base / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    assert latent.shape == (1, 128, 4, 4)
    assert latent.abs().sum() > 0, "sampling changed the empty latent"


def test_bad_tiny_size_is_a_node_error_and_server_survives(comfy_server):
    from comfyserver import PromptError

    with pytest.raises(PromptError, match="width: 96 is not divisible by heads=5"):
        comfy_server.run(smoke_prompt(width=96, heads=5))
    assert comfy_server.run(smoke_prompt(seed=3))["6"]["latents"]
