"""Flux 2 (dev, and the same layout at other sizes): ComfyUI `image_model="flux2"` <-> diffusers
`Flux2Transformer2DModel`.

Differences from Flux 1 that matter for routes: modulation is global (three shared
`*_modulation` layers, none per block), there are no biases, the feed-forward is SiLU-gated
(`linear_in` -> `img_mlp.0`, whose (gate, up) halves are in the same order in both: ComfyUI's
SiLUActivation and diffusers' Flux2SwiGLU both gate with the first half), and each single block's
q/k/v+MLP projection is one diffusers Linear (`to_qkv_mlp_proj`), ComfyUI's `linear1` as is.
"""

from __future__ import annotations

import torch

from ._flux_common import (
    FluxNames,
    base_diffusers_config,
    convert_with_routes,
    double_block_routes,
    io_routes,
    qk_norm_params,
    require,
)
from .base import FamilyProfile, Route

NAMES = FluxNames(time_embed="time_guidance_embed", ff_in="linear_in", ff_out="linear_out")

# The flags under which ComfyUI's Flux class builds the architecture diffusers' Flux 2 class has.
REQUIRED = {"global_modulation": True, "mlp_silu_act": True, "qkv_bias": False, "ops_bias": False, "vec_in_dim": None}

GLOBAL_MODULATIONS = ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")


def single_block_routes(index: int) -> dict[str, Route]:
    """A Flux 2 single block: the fused projections are fused identically on both sides."""
    d, c = f"single_transformer_blocks.{index}.attn", f"single_blocks.{index}"
    return {f"{d}.to_qkv_mlp_proj": Route(f"{c}.linear1"), f"{d}.to_out": Route(f"{c}.linear2")}


class Flux2Profile(FamilyProfile):
    """Flux 2: global modulation, bias-free, SiLU-gated MLPs, 4 rotary axes."""

    name = "flux2"
    display_name = "Flux 2"
    diffusers_class = "Flux2Transformer2DModel"
    suggested_targets = ("Flux2Attention", "Flux2FeedForward", "Flux2ParallelSelfAttention")

    def matches(self, unet_config: dict) -> bool:
        """ComfyUI tags Flux 2 checkpoints with `image_model="flux2"` (model_detection)."""
        return unet_config.get("image_model") == "flux2"

    def diffusers_config(self, unet_config: dict) -> dict:
        """Flux2Transformer2DModel kwargs; ValueError if a flag has no diffusers equivalent."""
        require(unet_config, self.display_name, REQUIRED)
        return dict(
            base_diffusers_config(unet_config),
            timestep_guidance_channels=256,  # ComfyUI's timestep_embedding(t, 256)
            mlp_ratio=float(unet_config["mlp_ratio"]),
            rope_theta=int(unet_config["theta"]),
            eps=1e-6,  # ComfyUI's LayerNorm and RMSNorm eps
        )

    def routes(self, unet_config: dict) -> dict[str, Route]:
        """Every diffusers Linear of Flux 2 -> its ComfyUI module, block by block."""
        require(unet_config, self.display_name, REQUIRED)
        routes = io_routes(unet_config, NAMES)
        for mod in GLOBAL_MODULATIONS:
            routes[f"{mod}.linear"] = Route(f"{mod}.lin")
        for i in range(int(unet_config["depth"])):
            routes.update(double_block_routes(i, unet_config, NAMES))
        for i in range(int(unet_config["depth_single_blocks"])):
            routes.update(single_block_routes(i))
        return routes

    def convert_state_dict(self, diffusers_sd: dict[str, torch.Tensor], unet_config: dict) -> dict[str, torch.Tensor]:
        """Diffusers Flux 2 weights as ComfyUI `diffusion_model` keys in the file layout (QK norms as `.scale`)."""
        return convert_with_routes(diffusers_sd, self.routes(unet_config), qk_norm_params(unet_config))


PROFILE = Flux2Profile()
