"""The same tiny model twice: a seeded diffusers model and the ComfyUI model with converted weights.

Used by tests that compare this pack (on ComfyUI) with the reference (diffusers + LyCORIS): both
models get the same inputs, and `comfy_denoised` goes through ComfyUI's own `apply_model` with
the patcher's wrappers, exactly as a sampler calls it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange

from comfyui_lycoris.core import host
from comfyui_lycoris.core.families import FamilyProfile, profile_named
from comfyui_lycoris.core.tiny import TinySizes

SIZES = {
    "flux2": TinySizes(family="flux2", width=64, heads=2, depth=1, single_depth=1, context_dim=32, seed=3),
    "flux1": TinySizes(family="flux1", width=64, heads=2, depth=1, single_depth=1, context_dim=32, seed=3),
    "sdxl": TinySizes(family="sdxl", width=32, depth=1, context_dim=32, seed=3),
}


@torch.no_grad()
def seed_diffusers(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter non-trivial (diffusers zero-inits some layers); norm scales 1 + noise."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim >= 2:
            p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
        elif "norm" in name and name.endswith(("weight", "scale")):
            p.copy_(1 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)
    return model.eval()


@dataclass
class Pair:
    family: str
    profile: FamilyProfile
    unet_config: dict
    patcher: object  # ComfyUI ModelPatcher holding the converted weights
    diffusers: torch.nn.Module
    inputs: dict

    def reference_denoised(self, model: torch.nn.Module | None = None) -> torch.Tensor:
        """x - sigma * prediction of the diffusers model (what ComfyUI's apply_model returns)."""
        model = model or self.diffusers
        with torch.no_grad():
            out = (_flux_diffusers if self.family != "sdxl" else _sdxl_diffusers)(self, model)
        return self.inputs["x"] - out * _view(self.inputs["sigma"])

    def comfy_denoised(self, patcher=None, chunks: int = 1) -> torch.Tensor:
        """ComfyUI's apply_model of `patcher` (default: the base) with its wrappers, like a sampler."""
        patcher = patcher or self.patcher
        options = dict(patcher.model_options.get("transformer_options", {}))
        options["wrappers"] = patcher.wrappers
        options["cond_or_uncond"] = list(range(chunks))
        inp = self.inputs
        extra = {"y": inp["y"]} if inp.get("y") is not None else {}
        if "guidance" in inp:
            extra["guidance"] = inp["guidance"]
        with torch.no_grad():
            return patcher.model.apply_model(inp["x"].clone(), inp["sigma"], c_crossattn=inp["context"].clone(),
                                             transformer_options=options, **extra)


def _view(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.view(-1, 1, 1, 1)


def make_pair(family: str, seed: int = 0) -> Pair:
    patcher = host.build_tiny_model(SIZES[family])
    cfg = dict(host.model_unet_config(patcher))
    profile = profile_named(family)
    reference = seed_diffusers(profile.build_skeleton(cfg, device="cpu"), seed)
    converted = host.as_installed_unet_keys(family, cfg, profile.convert_state_dict(reference.state_dict(), cfg))
    patcher.model.diffusion_model.load_state_dict(converted, strict=True)
    patcher.model.diffusion_model.eval()
    return Pair(family, profile, cfg, patcher, reference, _inputs(family, cfg, patcher, seed))


def _inputs(family: str, cfg: dict, patcher, seed: int) -> dict:
    """Two samples at different sigmas."""
    gen = torch.Generator().manual_seed(seed + 100)
    if family == "sdxl":
        pooled = torch.randn(2, 1280, generator=gen)
        size = {"height": 64, "width": 64, "crop_h": 0, "crop_w": 0, "target_height": 64, "target_width": 64}
        return dict(x=torch.randn(2, 4, 16, 16, generator=gen), context=torch.randn(2, 6, cfg["context_dim"], generator=gen),
                    pooled=pooled, time_ids=torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(2, 1),
                    y=patcher.model.encode_adm(pooled_output=pooled, **size), sigma=torch.tensor([2.5, 0.6]))
    channels, size = (128, 4) if family == "flux2" else (16, 8)
    return dict(
        x=torch.randn(2, channels, size, size, generator=gen),
        context=torch.randn(2, 6, cfg["context_in_dim"], generator=gen),
        y=torch.randn(2, cfg["vec_in_dim"], generator=gen) if cfg.get("vec_in_dim") else None,
        sigma=torch.tensor([0.7, 0.25]),
        guidance=torch.tensor([3.5, 1.0]),
    )


def _flux_diffusers(pair: Pair, model: torch.nn.Module) -> torch.Tensor:
    """The diffusers call that sees what ComfyUI's Flux.forward builds internally (packing, ids)."""
    inp, p = pair.inputs, (2 if pair.family == "flux1" else 1)
    x = inp["x"]
    h, w = x.shape[2] // p, x.shape[3] // p
    tokens = rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=p, pw=p)
    axes = 3 if pair.family == "flux1" else 4
    img_ids = torch.zeros(h, w, axes)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    txt_ids = torch.zeros(inp["context"].shape[1], axes)
    if pair.family == "flux2":
        txt_ids[:, 3] = torch.arange(inp["context"].shape[1])
    kwargs = dict(hidden_states=tokens, encoder_hidden_states=inp["context"], timestep=inp["sigma"],
                  img_ids=img_ids.reshape(h * w, axes), txt_ids=txt_ids, guidance=inp["guidance"], return_dict=False)
    if pair.family == "flux1":
        kwargs["pooled_projections"] = inp["y"]
    out = model(**kwargs)[0]
    return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=p, pw=p)


def _sdxl_diffusers(pair: Pair, model: torch.nn.Module) -> torch.Tensor:
    """Epsilon on ComfyUI's scaled input and timestep (model_sampling), as apply_model feeds the UNet."""
    inp = pair.inputs
    sampling = pair.patcher.model.model_sampling
    x_in = sampling.calculate_input(inp["sigma"], inp["x"])
    t = sampling.timestep(inp["sigma"]).float()
    return model(x_in, t, encoder_hidden_states=inp["context"],
                 added_cond_kwargs={"text_embeds": inp["pooled"], "time_ids": inp["time_ids"]}).sample
