"""Adapters through the live server: load, apply (strength changes re-run only sampling), A/B in one
batch, merge, save, and clear errors for pickle and corrupt files."""

import json

import pytest
import torch
from graphs import adapter_chain
from lycoris_reference import save_random_lycoris_file
from safetensors.torch import load_file

from comfyenv import REPO
from comfyserver import PromptError
from comfyui_lycoris.core.config import parse_config
from comfyui_lycoris.core.families import profile_named
from comfyui_lycoris.core.tiny import TinySizes, unet_config

pytestmark = pytest.mark.integration

TINY = {"family": "flux2", "width": 64, "heads": 2, "depth": 1, "single_depth": 1, "context_dim": 32,
        "seed": 5, "dtype": "float32"}
SIZES = TinySizes(**{k: v for k, v in TINY.items() if k != "dtype"})


@pytest.fixture(scope="module")
def adapter_name(comfy_server):
    """A LoKr file made by LyCORIS on the diffusers twin of the tiny model, in the server's loras."""
    config = parse_config((REPO / "configs" / "flux2_lokr.json").read_text())
    model = profile_named("flux2").build_skeleton(unet_config(SIZES), device="cpu")
    save_random_lycoris_file(config, model, comfy_server.base / "models" / "loras" / "tiny_lokr.safetensors")
    return "tiny_lokr.safetensors"


def graph(adapter_name: str | None, strength: float = 1.0, *, ab: str | None = None, merge: bool = False,
          prefix: str = "adapter") -> dict:
    g = {
        "model": {"class_type": "LycorisTinyModel", "inputs": TINY},
        "pos": {"class_type": "LycorisTinyTextEncode", "inputs": {"model": ["model", 0], "text": "a cat", "tokens": 4}},
        "neg": {"class_type": "LycorisTinyTextEncode", "inputs": {"model": ["model", 0], "text": "", "tokens": 4}},
        "latent": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    model, latent = ["model", 0], ["latent", 0]
    model, latent = adapter_chain(g, model, latent, adapter_name, strength, ab=ab, merge=merge)
    g["sample"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": latent, "seed": 7,
        "steps": 3, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    g["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}}
    return g


def run_latent(server, prompt) -> tuple[torch.Tensor, str]:
    prompt_id = server.submit(prompt)
    outputs = server.wait(prompt_id)
    item = outputs["save"]["latents"][0]
    return load_file(str(server.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"], prompt_id


def executed_nodes(server, prompt_id: str) -> set[str]:
    messages = server.get(f"/history/{prompt_id}")[prompt_id]["status"]["messages"]
    cached = next((data["nodes"] for kind, data in messages if kind == "execution_cached"), [])
    return {"model", "pos", "neg", "latent", "load", "apply", "sample", "save"} - set(cached)


def test_apply_strengths_and_caching(comfy_server, adapter_name):
    base, _ = run_latent(comfy_server, graph(None, prefix="base"))
    zero, _ = run_latent(comfy_server, graph(adapter_name, 0.0, prefix="s0"))
    one, _ = run_latent(comfy_server, graph(adapter_name, 1.0, prefix="s1"))
    assert torch.equal(zero, base), "strength 0 is exactly the base model"
    assert not torch.allclose(one, base, atol=1e-3), "the adapter changes the result"
    half, prompt_id = run_latent(comfy_server, graph(adapter_name, 0.5, prefix="s05"))
    ran = executed_nodes(comfy_server, prompt_id)
    assert "load" not in ran and "model" not in ran, f"a strength change re-ran {ran}"
    assert {"apply", "sample"} <= ran
    again, _ = run_latent(comfy_server, graph(None, prefix="base2"))
    assert torch.equal(again, base), "the base model is untouched after adapted runs"


def test_ab_batch_equals_separate_runs(comfy_server, adapter_name):
    zero, _ = run_latent(comfy_server, graph(adapter_name, 0.0, prefix="ab0"))
    one, _ = run_latent(comfy_server, graph(adapter_name, 1.0, prefix="ab1"))
    both, _ = run_latent(comfy_server, graph(adapter_name, ab="0, 1", prefix="ab"))
    assert both.shape[0] == 2
    assert torch.allclose(both[0], zero[0], atol=1e-5) and torch.allclose(both[1], one[0], atol=1e-5)


def test_merge_matches_apply_and_leaves_base(comfy_server, adapter_name):
    base, _ = run_latent(comfy_server, graph(None, prefix="mbase"))
    applied, _ = run_latent(comfy_server, graph(adapter_name, 0.8, prefix="mapply"))
    merged, _ = run_latent(comfy_server, graph(adapter_name, 0.8, merge=True, prefix="mmerge"))
    assert torch.allclose(merged, applied, atol=1e-4)
    after, _ = run_latent(comfy_server, graph(None, prefix="mbase2"))
    assert torch.equal(after, base), "unpatching restored the base"


def test_save_writes_a_loadable_file(comfy_server, adapter_name):
    prompt = graph(adapter_name, 1.0, prefix="saved")
    prompt["write"] = {"class_type": "LycorisSave", "inputs": {"adapter": ["load", 0], "filename": "copies/tiny",
                                                              "folder": "loras", "overwrite": False}}
    comfy_server.run(prompt)
    prompt["load"]["inputs"]["strict"] = False  # a changed input, so ComfyUI runs the save again
    comfy_server.run(prompt)  # the second save takes a new numbered name, the first file stays
    written = sorted((comfy_server.base / "models" / "loras" / "copies").glob("*.safetensors"))
    assert [p.name for p in written] == ["tiny.safetensors", "tiny_00001.safetensors"]
    original = load_file(str(comfy_server.base / "models" / "loras" / adapter_name))
    assert load_file(str(written[0])).keys() == original.keys()
    reloaded, _ = run_latent(comfy_server, graph("copies/tiny.safetensors", 1.0, prefix="reloaded"))
    first, _ = run_latent(comfy_server, graph(adapter_name, 1.0, prefix="orig"))
    assert torch.allclose(reloaded, first, atol=1e-6)


@pytest.mark.parametrize("filename, content, message", [
    ("evil.ckpt", b"\x80\x04K\x01.", "pickle"),
    ("broken.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1", "broken.safetensors"),
])
def test_bad_files_are_clear_errors(comfy_server, filename, content, message):
    (comfy_server.base / "models" / "loras" / filename).write_bytes(content)
    with pytest.raises(PromptError, match=message):
        comfy_server.run(graph(filename, prefix="bad"))
    assert comfy_server.get("/system_stats")["system"]["comfyui_version"]


def test_unmatched_keys_fail_only_with_strict(comfy_server, adapter_name):
    from safetensors.torch import save_file
    tensors = load_file(str(comfy_server.base / "models" / "loras" / adapter_name))
    tensors["lycoris_not_a_layer.lokr_w1"] = torch.ones(2, 2)
    save_file(tensors, str(comfy_server.base / "models" / "loras" / "extra.safetensors"),
              {"lycoris_config": json.dumps({"algo": "lokr", "multiplier": 1, "linear_dim": 4, "linear_alpha": 1})})
    with pytest.raises(PromptError, match="lycoris_not_a_layer"):
        comfy_server.run(graph("extra.safetensors", prefix="strict"))
    lenient = graph("extra.safetensors", prefix="lenient")
    lenient["load"]["inputs"]["strict"] = False
    assert comfy_server.run(lenient)["load"]["text"][0].count("not in this model") == 1
