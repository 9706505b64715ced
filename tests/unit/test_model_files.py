"""scripts/model_files.py: real-width layouts are what ComfyUI's detection loads, files are seeded.

What each family's detection in this ComfyUI accepts, without writing a byte: the layouts are fed
to `comfy.model_detection` as `meta` tensors, ComfyUI's own model class is built on `meta` from
the detected config, and its parameter names and shapes must be exactly the file's (a load with no
missing or unexpected key). Then the pack's profile must recognise the config, and every module
LyCORIS creates on the diffusers twin (as SimpleTuner would) must have a ComfyUI route.
"""

from __future__ import annotations

import hashlib
import json

import model_files as mf
import pytest
import torch
from lycoris_reference import lycoris_network
from safetensors.torch import load_file

from comfyenv import REPO
from comfyui_lycoris.core.config import parse_config
from comfyui_lycoris.core.families import profile_for

_, _, FLUX2_KLEIN = mf.FILES["flux2_klein_width_1x1"]  # Flux 2 Klein 4B's width, as the tests' file


def same_names(shapes: mf.Shapes) -> mf.Shapes:
    """QK-norm scales are `.scale` in the files and in 0.3.75's modules, `.weight` in newer ComfyUI's."""
    return {k.removesuffix(".scale") + ".weight" if k.endswith("_norm.scale") else k: v for k, v in shapes.items()}


def comfy_model_shapes(shapes: mf.Shapes) -> mf.Shapes:
    """Parameter names and shapes of the model ComfyUI builds for a layout (prefix as in the file)."""
    import comfy.model_detection

    state_dict = mf.meta_state_dict(shapes)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(state_dict)
    prefix = prefix if any(k.startswith(prefix) for k in shapes) else ""
    config = comfy.model_detection.model_config_from_unet({k[len(prefix):]: v for k, v in state_dict.items()}, "")
    config.set_inference_dtype(torch.bfloat16, None)
    unet = config.get_model({}, "", device="meta").diffusion_model
    return {prefix + k: tuple(v.shape) for k, v in unet.state_dict().items()}


def lycoris_modules_have_routes(unet_config: dict, preset: str) -> int:
    """LyCORIS on the twin (preset as SimpleTuner applies it): every module it makes maps onto ComfyUI."""
    profile = profile_for(unet_config)
    twin = profile.build_skeleton(unet_config, device="meta")
    network = lycoris_network(parse_config((REPO / "configs" / f"{preset}.json").read_text()), twin)
    names = {lora.lora_name for lora in network.loras}
    routed = {"lycoris_" + path.replace(".", "_") for path in profile.routes(unet_config)}
    assert names and names <= routed, sorted(names - routed)[:5]
    return len(names)


@pytest.mark.parametrize("layout, family, preset, params", [
    (mf.flux1_shapes(), "flux1", "flux1_lokr", 545_548_096),
    (mf.flux2_shapes(), "flux2", "flux2_lokr", 2_288_517_888),
], ids=["flux1_3072", "flux2_6144"])
def test_flux_layouts_load_as_comfyui_detects_them(layout, family, preset, params):
    assert mf.parameters(layout) == params
    assert same_names(comfy_model_shapes(layout)) == same_names(layout), "ComfyUI's model has the file's keys"
    config = mf.detected_unet_config(layout)
    assert profile_for(config).name == family
    assert config["hidden_size"] == layout["txt_in.weight"][0] and config["depth"] == config["depth_single_blocks"] == 1
    assert lycoris_modules_have_routes(config, preset) > 0


def test_flux2_klein_width_needs_a_newer_comfyui():
    """0.3.75's detection fixes 48 heads for Flux 2, so 3072 wide means a head dim of 64 that its rotary
    axes (4 x 32) do not fit; a ComfyUI that reads the head count from the file (v0.33: hidden / 128)
    loads it, and its model then has exactly the file's keys (Klein: no guidance embedder)."""
    import comfy.model_detection

    layout = mf.flux2_shapes(**FLUX2_KLEIN)
    assert mf.parameters(layout) == 563_086_080 and "guidance_in.in_layer.weight" not in layout
    guessed = comfy.model_detection.model_config_from_unet(mf.meta_state_dict(layout), "").unet_config
    if guessed["num_heads"] == 48:
        with pytest.raises(ValueError, match="positional dim 64"):
            mf.detected_unet_config(layout)
    else:
        config = mf.detected_unet_config(layout)
        assert {k: config[k] for k in ("image_model", "hidden_size", "num_heads", "context_in_dim", "guidance_embed")} \
            == {"image_model": "flux2", "hidden_size": 3072, "num_heads": 24, "context_in_dim": 7680,
                "guidance_embed": False}
        assert same_names(comfy_model_shapes(layout)) == same_names(layout), "ComfyUI's model has the file's keys"
        assert profile_for(config).name == "flux2" and lycoris_modules_have_routes(config, "flux2_lokr") > 0


@pytest.mark.parametrize("variant, params", [("segmind_vega", 745_225_604), ("sdxl", 2_567_463_684)])
def test_sdxl_checkpoint_layouts(variant, params):
    layout = mf.sdxl_shapes(variant)
    assert all(k.startswith(mf.SDXL_UNET_PREFIX) for k in layout) and mf.parameters(layout) == params
    assert comfy_model_shapes(layout) == layout
    config = mf.detected_unet_config(layout)
    assert profile_for(config).name == "sdxl" and config["model_channels"] == 320 and config["context_dim"] == 2048
    assert lycoris_modules_have_routes(config, "sdxl_lokr_attention") > 0


SMALL = mf.flux1_shapes(hidden=64, heads=2, context_in_dim=32, vec_in_dim=16)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float32])
def test_files_are_seeded_safetensors(tmp_path, dtype):
    a = mf.write_model_file(tmp_path / "a.safetensors", SMALL, seed=3, dtype=dtype, metadata={"note": "x"})
    b = mf.write_model_file(tmp_path / "b.safetensors", SMALL, seed=3, dtype=dtype)
    c = mf.write_model_file(tmp_path / "c.safetensors", SMALL, seed=4, dtype=dtype)
    tensors = load_file(str(a))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == SMALL
    assert all(v.dtype == dtype for v in tensors.values())
    for key, value in tensors.items():
        assert torch.equal(value, mf.tensor_value(key, SMALL[key], 3, dtype)), key
    assert torch.equal(tensors["single_blocks.0.norm.key_norm.scale"].float(), torch.ones(32))
    assert mf.read_metadata(a) == {"format": "pt", "note": "x"} and mf.read_shapes(a) == SMALL
    assert load_file(str(b)).keys() == tensors.keys() and all(torch.equal(load_file(str(b))[k], v)
                                                             for k, v in tensors.items())
    assert not torch.equal(load_file(str(c))["txt_in.weight"], tensors["txt_in.weight"])
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file left behind"


def test_ensure_file_reuses_only_the_same_file(tmp_path, monkeypatch):
    monkeypatch.setitem(mf.FILES, "small", ("flux1", mf.flux1_shapes, dict(hidden=64, heads=2, context_in_dim=32,
                                                                             vec_in_dim=16)))
    first = mf.ensure_file(tmp_path, "small", seed=1)
    stamp = first.stat().st_mtime_ns
    assert mf.ensure_file(tmp_path, "small", seed=1).stat().st_mtime_ns == stamp, "an identical file is reused"
    before = digest(first)
    mf.ensure_file(tmp_path, "small", seed=2)
    assert digest(first) != before, "another seed rewrites it"
    assert json.loads(mf.read_metadata(first)["lycoris_test_model"])["seed"] == 2
    assert mf.read_metadata(first)["family"] == "flux1"
