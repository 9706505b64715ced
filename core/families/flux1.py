"""Flux 1 (dev, schnell, fill): ComfyUI `image_model="flux"` <-> diffusers `FluxTransformer2DModel`.

Differences from Flux 2 that matter for routes: every block has its own modulation
(`norm1.linear` -> `img_mod.lin`, `norm1_context.linear` -> `txt_mod.lin`, single
`norm.linear` -> `modulation.lin`), a pooled-text embedder (`vector_in`), biases everywhere, a
GELU feed-forward (`ff.net.0.proj` / `ff.net.2`), and single blocks whose q, k, v and MLP input
are four diffusers Linears fused into ComfyUI's `linear1` rows (q | k | v | mlp).
"""

from __future__ import annotations

import torch

from ._flux_common import (
    FluxNames,
    base_diffusers_config,
    convert_with_routes,
    double_block_routes,
    hidden_size,
    io_routes,
    mlp_hidden,
    qk_norm_params,
    require,
)
from .base import FamilyProfile, Route

NAMES = FluxNames(time_embed="time_text_embed", ff_in="net.0.proj", ff_out="net.2")

# diffusers' FluxTransformer2DModel hard-codes these (mlp_ratio 4, rope theta 10000, biases on,
# per-block modulation, GELU MLP); a ComfyUI config with other values is another architecture.
REQUIRED = {"mlp_ratio": 4.0, "theta": 10000, "qkv_bias": True, "ops_bias": True,
            "global_modulation": False, "mlp_silu_act": False}


def block_modulation_routes(index: int) -> dict[str, Route]:
    """Flux 1's per-block AdaLN-Zero layers; (shift, scale, gate) order is the same on both sides."""
    d, c = f"transformer_blocks.{index}", f"double_blocks.{index}"
    return {f"{d}.norm1.linear": Route(f"{c}.img_mod.lin"), f"{d}.norm1_context.linear": Route(f"{c}.txt_mod.lin")}


def single_block_routes(index: int, unet_config: dict) -> dict[str, Route]:
    """A Flux 1 single block: q, k, v and the MLP input are consecutive row slices of `linear1`."""
    h, m = hidden_size(unet_config), mlp_hidden(unet_config)
    d, c = f"single_transformer_blocks.{index}", f"single_blocks.{index}"
    slices = (("attn.to_q", 0, h), ("attn.to_k", h, h), ("attn.to_v", 2 * h, h), ("proj_mlp", 3 * h, m))
    routes = {f"{d}.{name}": Route.rows(f"{c}.linear1", start, count) for name, start, count in slices}
    routes[f"{d}.proj_out"] = Route(f"{c}.linear2")
    routes[f"{d}.norm.linear"] = Route(f"{c}.modulation.lin")
    return routes


class Flux1Profile(FamilyProfile):
    """Flux 1: per-block modulation, pooled text vector, GELU MLPs, 3 rotary axes."""

    name = "flux1"
    display_name = "Flux 1"
    diffusers_class = "FluxTransformer2DModel"
    suggested_targets = ("FluxAttention", "FeedForward")

    def matches(self, unet_config: dict) -> bool:
        """`image_model="flux"`, minus the relatives ComfyUI also tags "flux" that diffusers' Flux
        class cannot describe (no pooled vector: LongCat-Image; `yak_mlp`/`txt_norm`: Ovis)."""
        return (
            unet_config.get("image_model") == "flux"
            and unet_config.get("vec_in_dim") is not None
            and not unet_config.get("yak_mlp")
            and not unet_config.get("txt_norm")
        )

    def diffusers_config(self, unet_config: dict) -> dict:
        """FluxTransformer2DModel kwargs; ValueError if a flag has no diffusers equivalent."""
        require(unet_config, self.display_name, REQUIRED)
        return dict(base_diffusers_config(unet_config), pooled_projection_dim=int(unet_config["vec_in_dim"]))

    def routes(self, unet_config: dict) -> dict[str, Route]:
        """Every diffusers Linear of Flux 1 -> its ComfyUI module, block by block."""
        require(unet_config, self.display_name, REQUIRED)
        routes = io_routes(unet_config, NAMES)
        for i in range(int(unet_config["depth"])):
            routes.update(double_block_routes(i, unet_config, NAMES))
            routes.update(block_modulation_routes(i))
        for i in range(int(unet_config["depth_single_blocks"])):
            routes.update(single_block_routes(i, unet_config))
        return routes

    def convert_state_dict(self, diffusers_sd: dict[str, torch.Tensor], unet_config: dict) -> dict[str, torch.Tensor]:
        """Diffusers Flux 1 weights as ComfyUI `diffusion_model` keys in the file layout (QK norms as `.scale`)."""
        return convert_with_routes(diffusers_sd, self.routes(unet_config), qk_norm_params(unet_config))


PROFILE = Flux1Profile()
