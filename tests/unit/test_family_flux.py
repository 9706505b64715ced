"""Flux 1 / Flux 2 family profiles: complete routes, exact weight conversion, family detection.

Routes are checked structurally (every diffusers Linear routed, every ComfyUI Linear row covered
exactly once, on tiny and real full-size configs built on `meta`) and numerically: a seeded
diffusers model converted through the routes must give ComfyUI's forward the same output, and a
deliberately wrong route must not.
"""

from __future__ import annotations

import functools
import inspect
import math

import diffusers
import pytest
import torch
from einops import rearrange

from comfyui_lycoris.core import host
from comfyui_lycoris.core.families._flux_common import mlp_hidden
from comfyui_lycoris.core.families.base import Route
from comfyui_lycoris.core.families.flux1 import PROFILE as FLUX1
from comfyui_lycoris.core.families.flux2 import PROFILE as FLUX2
from comfyui_lycoris.core.tiny import TinySizes, fit_flux_params, unet_config

PROFILES = {"flux1": FLUX1, "flux2": FLUX2}
FAMILIES = tuple(PROFILES)
LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def tiny_sizes(family: str) -> TinySizes:
    return TinySizes(family=family, width=128, heads=2, depth=2, single_depth=2, context_dim=64, seed=3)


_FLUX2 = dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, mlp_ratio=3.0,
              axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False, global_modulation=True,
              mlp_silu_act=True, ops_bias=False, default_ref_method="index", ref_index_scale=10.0)
_FLUX1 = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
              hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
              axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True)

# Real full-size unet_configs, as comfy/model_detection.py builds them from the checkpoints.
FULL = {
    "flux2-dev": ("flux2", dict(_FLUX2, context_in_dim=15360, hidden_size=6144, num_heads=48, depth=8,
                                depth_single_blocks=48, guidance_embed=True)),
    # Klein 4B layout (newer ComfyUI derives num_heads = hidden / 128; 0.3.75 would say 48).
    "flux2-klein-4b": ("flux2", dict(_FLUX2, context_in_dim=7680, hidden_size=3072, num_heads=24, depth=5,
                                     depth_single_blocks=20, guidance_embed=False)),
    "flux1-dev": ("flux1", dict(_FLUX1, guidance_embed=True)),
    "flux1-schnell": ("flux1", dict(_FLUX1, guidance_embed=False)),
}



def layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, LAYERS)}


def comfy_meta_model(cfg: dict) -> torch.nn.Module:
    """ComfyUI's own Flux class at full size, weightless."""
    import comfy.ldm.flux.model
    import comfy.ops

    family = "flux2" if cfg.get("image_model") == "flux2" else "flux1"
    cfg = fit_flux_params(cfg, family, host.flux_param_fields())  # what this ComfyUI's FluxParams requires
    with torch.device("meta"):
        return comfy.ldm.flux.model.Flux(**cfg, dtype=torch.float32, operations=comfy.ops.disable_weight_init)


@functools.cache
def tiny_comfy_model(family: str) -> torch.nn.Module:
    """One tiny ComfyUI model per family for the whole module (tests reload its weights as needed)."""
    return host.build_tiny_model(tiny_sizes(family)).model.diffusion_model


def exact_cover(spans: list[tuple[int, int]], rows: int) -> bool:
    """True if the (start, stop) spans tile [0, rows) with no gap and no overlap."""
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            return False
        end = stop
    return end == rows


def assert_routes_cover(profile, cfg: dict, comfy_model: torch.nn.Module) -> None:
    """Routes == diffusers Linears; each ComfyUI Linear row (and each diffusers row) used exactly once."""
    diff, comfy = layers(profile.build_skeleton(cfg)), layers(comfy_model)
    routes = profile.routes(cfg)
    assert set(routes) == set(diff), f"unrouted {set(diff) - set(routes)}, stale {set(routes) - set(diff)}"
    used: dict[str, list[tuple[int, int]]] = {name: [] for name in comfy}
    for dname, route in routes.items():
        assert route.comfy_module in comfy, f"{dname} -> {route.comfy_module}: no such ComfyUI layer"
        d, c = diff[dname].weight, comfy[route.comfy_module].weight
        assert d.shape[1:] == c.shape[1:], f"{dname}: input shape {d.shape} vs {c.shape}"
        assert (diff[dname].bias is None) == (comfy[route.comfy_module].bias is None), f"{dname}: bias mismatch"
        blocks = route.blocks or ((0, 0, c.shape[0]),)
        used[route.comfy_module] += [(c0, c0 + n) for c0, _, n in blocks]
        assert exact_cover([(d0, d0 + n) for _, d0, n in blocks], d.shape[0]), f"{dname}: rows not used once"
    bad = [n for n, spans in used.items() if not exact_cover(spans, comfy[n].weight.shape[0])]
    assert not bad, f"ComfyUI layers with missing or doubled rows: {bad}"


# ---------------------------------------------------------------------------------------------- (a)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_routes_cover_both_models(family):
    assert_routes_cover(PROFILES[family], unet_config(tiny_sizes(family)), tiny_comfy_model(family))


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_routes_and_conversion_shapes(name):
    family, cfg = FULL[name]
    profile, comfy_model = PROFILES[family], comfy_meta_model(cfg)
    assert_routes_cover(profile, cfg, comfy_model)
    # Conversion on meta tensors: exactly ComfyUI's parameter names and shapes.
    converted = host.as_installed_unet_keys(family, cfg, profile.convert_state_dict(profile.build_skeleton(cfg).state_dict(), cfg))
    want = {k: tuple(v.shape) for k, v in comfy_model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == want


def test_diffusers_configs_of_real_models():
    """Flux 2 dev and Flux 1 dev give diffusers' published configs (the class defaults are Flux 2 dev's)."""
    f2_defaults = {k: p.default for k, p in inspect.signature(diffusers.Flux2Transformer2DModel).parameters.items()}
    f2 = FLUX2.diffusers_config(FULL["flux2-dev"][1])
    assert f2 == {**{k: f2_defaults[k] for k in f2}, "out_channels": 128}
    f1 = FLUX1.diffusers_config(FULL["flux1-dev"][1])
    assert f1 == dict(patch_size=1, in_channels=64, out_channels=64, num_layers=19, num_single_layers=38,
                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                      pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


# ---------------------------------------------------------------------------------------------- (b)


@torch.no_grad()
def seeded_diffusers_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny diffusers model with every parameter non-trivial (diffusers zero-inits some layers).

    Norm scales get 1 + noise, so swapping query/key norms or their streams changes the output.
    """
    model = PROFILES[family].build_skeleton(unet_config(tiny_sizes(family)), device="cpu")
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:])))
        elif "norm" in name.rsplit(".", 2)[-2]:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def make_inputs(family: str, seed: int = 0) -> dict:
    """Two samples: latent, text tokens, pooled vector, sigma, raw guidance (both models scale by 1000)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = unet_config(tiny_sizes(family))
    channels, size = (128, 4) if family == "flux2" else (16, 8)
    return dict(
        x=torch.randn(2, channels, size, size, generator=gen),
        context=torch.randn(2, 6, cfg["context_in_dim"], generator=gen),
        y=torch.randn(2, cfg["vec_in_dim"], generator=gen) if cfg["vec_in_dim"] else None,
        sigma=torch.tensor([0.7, 0.25]),
        guidance=torch.tensor([3.5, 1.0]),
    )


def diffusers_forward(family: str, model: torch.nn.Module, inp: dict) -> torch.Tensor:
    """The diffusers call that sees what ComfyUI's Flux.forward builds internally (packing, position ids)."""
    p = 2 if family == "flux1" else 1
    x = inp["x"]
    h, w = x.shape[2] // p, x.shape[3] // p
    tokens = rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=p, pw=p)
    axes = 3 if family == "flux1" else 4
    img_ids = torch.zeros(h, w, axes)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    txt_ids = torch.zeros(inp["context"].shape[1], axes)
    if family == "flux2":
        txt_ids[:, 3] = torch.arange(inp["context"].shape[1])
    kwargs = dict(hidden_states=tokens, encoder_hidden_states=inp["context"], timestep=inp["sigma"],
                  img_ids=img_ids.reshape(h * w, axes), txt_ids=txt_ids, guidance=inp["guidance"], return_dict=False)
    if family == "flux1":
        kwargs["pooled_projections"] = inp["y"]
    out = model(**kwargs)[0]
    return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=p, pw=p)


def comfy_forward(model: torch.nn.Module, inp: dict) -> torch.Tensor:
    return model(inp["x"].clone(), inp["sigma"], inp["context"].clone(), y=inp["y"], guidance=inp["guidance"],
                 transformer_options={})


@pytest.fixture(scope="module")
def pair(request):
    """(family, diffusers model, its output, ComfyUI tiny model, inputs), built once per family."""
    family = request.param
    ref_model, inp = seeded_diffusers_model(family), make_inputs(family)
    with torch.no_grad():
        ref = diffusers_forward(family, ref_model, inp)
    return family, ref_model, ref, tiny_comfy_model(family), inp


def run_converted(pair) -> tuple[torch.Tensor, torch.Tensor]:
    family, ref_model, ref, comfy_model, inp = pair
    cfg = unet_config(tiny_sizes(family))
    converted = host.as_installed_unet_keys(family, cfg, PROFILES[family].convert_state_dict(ref_model.state_dict(), cfg))
    comfy_model.load_state_dict(converted, strict=True)
    with torch.no_grad():
        return comfy_forward(comfy_model, inp), ref


@pytest.mark.parametrize("pair", FAMILIES, indirect=True)
def test_converted_weights_give_the_same_output(pair):
    out, ref = run_converted(pair)
    assert out.shape == ref.shape and torch.isfinite(ref).all()
    assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max()) + 1e-6


def corruptions(family: str) -> dict[str, dict[str, Route]]:
    """Wrong routes, each keeping every row covered once (so the weights still load strictly)."""
    routes = PROFILES[family].routes(unet_config(tiny_sizes(family)))
    m = mlp_hidden(unet_config(tiny_sizes(family)))
    # Flux 2: swap the SiLU (gate, up) halves; Flux 1 (GELU): any row permutation must show.
    half, ff_in = (m, "ff.linear_in") if family == "flux2" else (m // 2, "ff.net.0.proj")

    def swap(a: str, b: str) -> dict[str, Route]:
        return {a: routes[b], b: routes[a]}

    wrong = {
        "img q<->k": swap("transformer_blocks.1.attn.to_q", "transformer_blocks.1.attn.to_k"),
        "txt k<->v": swap("transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj"),
        "final halves unswapped": {"norm_out.linear": Route("final_layer.adaLN_modulation.1")},
        "ff halves swapped": {f"transformer_blocks.0.{ff_in}": Route(
            "double_blocks.0.img_mlp.0", ((half, 0, half), (0, half, half)))},
    }
    if family == "flux1":
        wrong["single q<->k"] = swap("single_transformer_blocks.1.attn.to_q", "single_transformer_blocks.1.attn.to_k")
    else:
        wrong["img<->txt modulation"] = swap("double_stream_modulation_img.linear", "double_stream_modulation_txt.linear")
    return {name: {**routes, **change} for name, change in wrong.items()}


CORRUPTIONS = [(family, name) for family in FAMILIES for name in corruptions(family)]


@pytest.mark.parametrize("pair, corruption", CORRUPTIONS, indirect=["pair"])
def test_a_wrong_route_changes_the_output(pair, corruption, monkeypatch):
    profile = PROFILES[pair[0]]
    wrong = corruptions(pair[0])[corruption]
    monkeypatch.setattr(profile, "routes", lambda cfg: wrong)
    out, ref = run_converted(pair)
    assert float((out - ref).abs().max() / ref.abs().max()) > 1e-2, f"{corruption}: a wrong route went unnoticed"


@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_rejects_unknown_and_partial_weights(family):
    profile, cfg = PROFILES[family], unet_config(tiny_sizes(family))
    sd = profile.build_skeleton(cfg).state_dict()
    with pytest.raises(ValueError, match="no ComfyUI place"):
        profile.convert_state_dict({**sd, "transformer_blocks.0.attn.to_x.weight": sd["x_embedder.weight"]}, cfg)
    partial = {k: v for k, v in sd.items() if not k.startswith("transformer_blocks.0.attn.to_k.")}
    with pytest.raises(ValueError, match="double_blocks.0.img_attn.qkv.weight"):
        profile.convert_state_dict(partial, cfg)


# ---------------------------------------------------------------------------------------------- (c)

SDXL_LIKE = {"adm_in_channels": 2816, "context_dim": 2048, "model_channels": 320, "in_channels": 4,
             "use_linear_in_transformer": True, "transformer_depth": [0, 0, 2, 2, 10, 10]}


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_only_its_own_family(family):
    profile = PROFILES[family]
    other = next(f for f in FAMILIES if f != family)
    own = [unet_config(tiny_sizes(family))] + [cfg for fam, cfg in FULL.values() if fam == family]
    others = [unet_config(tiny_sizes(other))] + [cfg for fam, cfg in FULL.values() if fam == other]
    assert all(profile.matches(cfg) for cfg in own)
    assert not any(profile.matches(cfg) for cfg in others)
    assert not profile.matches(SDXL_LIKE)
    assert not profile.matches(unet_config(TinySizes(family="sdxl", width=64, heads=2)))


def test_flux1_rejects_relatives_diffusers_cannot_describe():
    flux1 = FULL["flux1-dev"][1]
    assert not FLUX1.matches(dict(flux1, vec_in_dim=None, context_in_dim=3584))  # LongCat-Image
    assert not FLUX1.matches(dict(flux1, yak_mlp=True, txt_norm=True))  # Ovis
    with pytest.raises(ValueError, match="mlp_ratio"):
        FLUX1.diffusers_config(dict(flux1, mlp_ratio=3.0))
    with pytest.raises(ValueError, match="ops_bias"):
        FLUX2.diffusers_config(dict(FULL["flux2-dev"][1], ops_bias=True))
