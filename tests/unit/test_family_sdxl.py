"""SDXL profile: routes cover both models exactly, agree with ComfyUI's own map, and convert weights
so that a diffusers UNet and ComfyUI's UNet give the same noise prediction."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_lycoris.core import host
from comfyui_lycoris.core.families.base import Route
from comfyui_lycoris.core.families.sdxl import PROFILE, SDXLProfile
from comfyui_lycoris.core.tiny import TinySizes, unet_config

TINY = TinySizes(family="sdxl", width=32, heads=1, depth=1, context_dim=32)

_COMMON = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "channel_mult": [1, 2, 4], "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# Copied from comfy/model_detection.py (0.3.75), `dtype` left out.
FULL = {
    "sdxl": {**_COMMON, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "transformer_depth_middle": 10, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]},
    "ssd_1b": {**_COMMON, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 4, 4],
               "transformer_depth_middle": -1, "transformer_depth_output": [0, 0, 0, 1, 1, 2, 10, 4, 4]},
    "vega": {**_COMMON, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 2, 2],
             "transformer_depth_middle": -1, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2]},
    "koala_700m": {**_COMMON, "num_res_blocks": [1, 1, 1], "transformer_depth": [0, 2, 5],
                   "transformer_depth_middle": -2, "transformer_depth_output": [0, 0, 2, 2, 5, 5]},
}
LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


@pytest.fixture(scope="module")
def tiny_patcher():
    """One tiny ComfyUI SDXL (a ModelPatcher) for the module; tests only overwrite its weights."""
    return host.build_tiny_model(TINY)


def _config_of(patcher) -> dict:
    """The `unet_config` ComfyUI really built the model from.

    Not `tiny.unet_config(TINY)` as is: ComfyUI's `supported_models.SDXL` overrides its head
    settings with `num_head_channels=64` (see `supported_models_base.BASE.unet_extra_config`).
    """
    return dict(patcher.model.model_config.unet_config)


def _layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LAYERS)}


def _comfy_unet(cfg: dict) -> torch.nn.Module:
    """ComfyUI's UNetModel of `cfg` on `meta` (names, classes and shapes only)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**cfg, operations=comfy.ops.disable_weight_init, device="meta")


@pytest.fixture(scope="module", params=["tiny", *FULL])
def pair(request):
    """(unet_config, diffusers skeleton on meta, ComfyUI UNet)."""
    if request.param == "tiny":
        patcher = request.getfixturevalue("tiny_patcher")
        cfg, comfy_model = _config_of(patcher), patcher.model.diffusion_model
    else:
        cfg = dict(FULL[request.param])
        comfy_model = _comfy_unet(cfg)
    return cfg, PROFILE.build_skeleton(cfg), comfy_model


def test_every_layer_is_routed_once_to_a_same_shaped_layer(pair):
    cfg, diffusers_model, comfy_model = pair
    routes = PROFILE.routes(cfg)
    d_layers, c_layers = _layers(diffusers_model), _layers(comfy_model)
    assert set(routes) == set(d_layers), "a diffusers Linear/Conv without route, or a route to nothing"
    targets = [r.comfy_module for r in routes.values()]
    assert sorted(targets) == sorted(c_layers), "each ComfyUI Linear/Conv is covered exactly once"
    for name, route in routes.items():
        assert route.blocks is None, name
        d, c = d_layers[name], c_layers[route.comfy_module]
        assert [isinstance(c, k) for k in LAYERS] == [isinstance(d, k) for k in LAYERS], name
        assert d.weight.shape == c.weight.shape, (name, route.comfy_module)
        assert (d.bias is None) == (c.bias is None), name


def test_attention_heads_agree(pair):
    """Head counts do not show in weight shapes, so check them directly."""
    cfg, diffusers_model, comfy_model = pair
    routes, comfy_modules = PROFILE.routes(cfg), dict(comfy_model.named_modules())
    attentions = [n for n, _ in diffusers_model.named_modules() if n.endswith((".attn1", ".attn2"))]
    assert attentions
    for name in attentions:
        comfy_name = routes[f"{name}.to_q"].comfy_module.removesuffix(".to_q")
        assert diffusers_model.get_submodule(name).heads == comfy_modules[comfy_name].heads, name


def _conversion_names(cfg: dict, diffusers_model: torch.nn.Module) -> dict[str, str]:
    """diffusers key -> ComfyUI key as `convert_state_dict` places it (each value tagged by its index)."""
    keys = list(diffusers_model.state_dict())
    converted = PROFILE.convert_state_dict({k: torch.tensor([float(i)]) for i, k in enumerate(keys)}, cfg)
    return {keys[int(v.item())]: k for k, v in converted.items()}


def test_conversion_fills_comfy_state_dict_exactly(pair):
    cfg, diffusers_model, comfy_model = pair
    names = _conversion_names(cfg, diffusers_model)
    assert len(names) == len(diffusers_model.state_dict())
    assert sorted(names.values()) == sorted(comfy_model.state_dict())
    d_sd, c_sd = diffusers_model.state_dict(), comfy_model.state_dict()
    assert all(d_sd[d].shape == c_sd[c].shape for d, c in names.items())


def test_agrees_with_comfy_unet_to_diffusers(pair):
    """An independent check: ComfyUI's own diffusers->ComfyUI key map gives the same names."""
    import comfy.utils

    cfg, diffusers_model, _ = pair
    reference = comfy.utils.unet_to_diffusers(cfg)
    names = _conversion_names(cfg, diffusers_model)
    missing = sorted(set(names) - set(reference))
    assert not missing, f"ComfyUI's map lacks {missing[:5]}"
    wrong = {d: (c, reference[d]) for d, c in names.items() if reference[d] != c}
    assert not wrong, list(wrong.items())[:5]
    routes = PROFILE.routes(cfg)
    for name, route in routes.items():
        assert reference[f"{name}.weight"] == f"{route.comfy_module}.weight"


@pytest.mark.parametrize("name", list(FULL))
def test_comfy_detects_the_diffusers_config_as_the_same_model(name):
    """ComfyUI's detection of a diffusers UNet built from `diffusers_config` returns the config."""
    import comfy.model_detection

    skeleton = PROFILE.build_skeleton(FULL[name])
    detected = comfy.model_detection.unet_config_from_diffusers_unet(skeleton.state_dict())
    assert detected is not None
    for key, value in FULL[name].items():
        assert detected[key] == value, key


def test_matches(tiny_patcher):
    assert PROFILE.matches(_config_of(tiny_patcher))
    assert all(PROFILE.matches(dict(cfg)) for cfg in FULL.values())
    flux1 = unet_config(TinySizes(family="flux1", width=64, heads=2, context_dim=32))
    flux2 = unet_config(TinySizes(family="flux2", width=64, heads=2, context_dim=32))
    sd15 = {**FULL["sdxl"], "adm_in_channels": None, "context_dim": 768, "channel_mult": [1, 2, 4, 4],
            "use_linear_in_transformer": False, "num_res_blocks": [2, 2, 2, 2]}
    refiner = {**FULL["sdxl"], "adm_in_channels": 2560}
    for cfg in (flux1, flux2, sd15, refiner, {**FULL["sdxl"], "image_model": "flux"}):
        assert not PROFILE.matches(cfg)


def test_unknown_diffusers_key_is_an_error(tiny_patcher):
    cfg = _config_of(tiny_patcher)
    sd = {"conv_in.weight": torch.zeros(1), "down_blocks.9.resnets.0.conv1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="down_blocks.9"):
        PROFILE.convert_state_dict(sd, cfg)


# --- Equivalence: the same weights give the same prediction in diffusers and in ComfyUI ---


@torch.no_grad()
def _seeded_diffusers_unet(cfg: dict) -> torch.nn.Module:
    """A diffusers UNet with every parameter random (diffusers zero-inits conv_out and others)."""
    model = PROFILE.build_skeleton(cfg, device="cpu").eval()
    gen = torch.Generator().manual_seed(1234)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim >= 2:
            p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)
    return model


class _SwappedQK(SDXLProfile):
    """A deliberately wrong profile: one self-attention's q and k land on each other's module."""

    def routes(self, unet_config: dict) -> dict[str, Route]:
        routes = dict(super().routes(unet_config))
        q, k = (f"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_{x}" for x in "qk")
        routes[q], routes[k] = routes[k], routes[q]
        return routes


@pytest.fixture(scope="module")
def equivalence(tiny_patcher):
    """A seeded diffusers UNet, its prediction on fixed inputs, a tiny ComfyUI model and its inputs."""
    patcher = tiny_patcher
    cfg = _config_of(patcher)
    reference = _seeded_diffusers_unet(cfg)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 6, 32, generator=gen)
    pooled = torch.randn(2, 1280, generator=gen)
    t = torch.tensor([500, 120])
    size = {"height": 96, "width": 64, "crop_h": 8, "crop_w": 4, "target_height": 80, "target_width": 72}
    time_ids = torch.tensor([[96.0, 64.0, 8.0, 4.0, 80.0, 72.0]]).repeat(2, 1)
    y = patcher.model.encode_adm(pooled_output=pooled, **size)  # ComfyUI's own ADM vector
    with torch.no_grad():
        ref = reference(x, t, encoder_hidden_states=context,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    comfy_inputs = {"x": x, "timesteps": t, "context": context, "y": y}
    return cfg, reference.state_dict(), patcher.model.diffusion_model.eval(), comfy_inputs, ref


def _comfy_prediction(profile: SDXLProfile, equivalence) -> tuple[torch.Tensor, torch.Tensor]:
    """(diffusers reference, ComfyUI prediction with weights converted by `profile`)."""
    cfg, diffusers_sd, comfy_unet, inputs, ref = equivalence
    comfy_unet.load_state_dict(profile.convert_state_dict(diffusers_sd, cfg), strict=True)
    with torch.no_grad():
        return ref, comfy_unet(**inputs)


def test_converted_weights_give_the_same_prediction(equivalence):
    ref, out = _comfy_prediction(PROFILE, equivalence)
    assert ref.shape == out.shape == (2, 4, 16, 16)
    scale = ref.abs().max().item()
    assert scale > 0.1, "the reference output should be non-trivial"
    err = (ref - out).abs().max().item()
    print(f"max abs diff {err:.3g}, max|ref| {scale:.3g}")
    assert err <= 1e-4 * scale + 1e-6, f"max abs diff {err} vs max|ref| {scale}"


def test_a_wrong_route_changes_the_prediction(equivalence):
    ref, out = _comfy_prediction(_SwappedQK(), equivalence)
    err = (ref - out).abs().max().item()
    assert err > 1e-3 * ref.abs().max().item(), "equivalence check cannot see a swapped q/k route"
