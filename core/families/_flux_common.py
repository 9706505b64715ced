"""What Flux 1 and Flux 2 share: ComfyUI's BFL-style layout and the diffusers names that map onto it.

ComfyUI runs both families through one class (`comfy.ldm.flux.model.Flux`): double blocks with a
fused `qkv` per stream, single blocks with a fused `linear1`, a `final_layer` whose modulation
halves are (shift, scale). Diffusers splits q/k/v and orders the final modulation (scale, shift).
The rules that hold for both families live here; each family file adds what differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Route, place_rows

# Defaults of ComfyUI's FluxParams for the flags an older/minimal unet_config may omit.
FLUX_PARAM_DEFAULTS = {"global_modulation": False, "mlp_silu_act": False, "ops_bias": True}


@dataclass(frozen=True)
class FluxNames:
    """The diffusers names that differ between `FluxTransformer2DModel` and `Flux2Transformer2DModel`."""

    time_embed: str  # container of the time/guidance(/pooled text) embedders
    ff_in: str  # first Linear of a double block's feed-forward
    ff_out: str  # last Linear of a double block's feed-forward


def hidden_size(unet_config: dict) -> int:
    """Model width; also the row count of each of q, k, v in a fused weight."""
    return int(unet_config["hidden_size"])


def head_dim(unet_config: dict) -> int:
    """Per-head width; ComfyUI requires it to equal sum(axes_dim)."""
    return hidden_size(unet_config) // int(unet_config["num_heads"])


def mlp_hidden(unet_config: dict) -> int:
    """Feed-forward inner width, computed as ComfyUI does (`int(hidden * mlp_ratio)`)."""
    return int(hidden_size(unet_config) * unet_config["mlp_ratio"])


def base_diffusers_config(unet_config: dict) -> dict:
    """Diffusers kwargs common to both Flux classes.

    ComfyUI patchifies inside the model while diffusers takes already-packed tokens, so the
    diffusers model has patch_size 1 and channels multiplied by patch_size**2.
    """
    p2 = int(unet_config["patch_size"]) ** 2
    if sum(unet_config["axes_dim"]) != head_dim(unet_config):
        raise ValueError(f"axes_dim: {unet_config['axes_dim']} must sum to the head dim {head_dim(unet_config)}")
    return dict(
        patch_size=1,
        in_channels=int(unet_config["in_channels"]) * p2,
        out_channels=int(unet_config["out_channels"]) * p2,
        num_layers=int(unet_config["depth"]),
        num_single_layers=int(unet_config["depth_single_blocks"]),
        attention_head_dim=head_dim(unet_config),
        num_attention_heads=int(unet_config["num_heads"]),
        joint_attention_dim=int(unet_config["context_in_dim"]),
        guidance_embeds=bool(unet_config.get("guidance_embed", False)),
        axes_dims_rope=tuple(int(a) for a in unet_config["axes_dim"]),
    )


def require(unet_config: dict, family: str, expected: dict) -> None:
    """Raise ValueError naming the first `unet_config` flag the diffusers class cannot represent."""
    for key, want in expected.items():
        got = unet_config.get(key, FLUX_PARAM_DEFAULTS.get(key))
        if got != want:
            raise ValueError(f"{key}: a {family} model with {key}={got!r} has no diffusers equivalent (needs {want!r})")



def double_block_routes(index: int, unet_config: dict, names: FluxNames) -> dict[str, Route]:
    """Attention and feed-forward routes of one double block (per-block modulation is Flux 1 only).

    ComfyUI's `qkv` output is viewed as (3, heads, head_dim): q, k, v are its row thirds, each
    in diffusers' own (heads, head_dim) order, so a diffusers projection is one contiguous slice.
    """
    h = hidden_size(unet_config)
    d, c = f"transformer_blocks.{index}", f"double_blocks.{index}"
    routes: dict[str, Route] = {}
    streams = (("img_attn", ("to_q", "to_k", "to_v")), ("txt_attn", ("add_q_proj", "add_k_proj", "add_v_proj")))
    for stream, projections in streams:
        for third, name in enumerate(projections):
            routes[f"{d}.attn.{name}"] = Route.rows(f"{c}.{stream}.qkv", third * h, h)
    routes[f"{d}.attn.to_out.0"] = Route(f"{c}.img_attn.proj")
    routes[f"{d}.attn.to_add_out"] = Route(f"{c}.txt_attn.proj")
    for ff, mlp in (("ff", "img_mlp"), ("ff_context", "txt_mlp")):
        routes[f"{d}.{ff}.{names.ff_in}"] = Route(f"{c}.{mlp}.0")
        routes[f"{d}.{ff}.{names.ff_out}"] = Route(f"{c}.{mlp}.2")
    return routes


def io_routes(unet_config: dict, names: FluxNames) -> dict[str, Route]:
    """Input projections, time/guidance/pooled embedders and the final layer.

    The final modulation is permuted: diffusers' AdaLayerNormContinuous chunks its output as
    (scale, shift), ComfyUI's LastLayer as (shift, scale); block modulations are not swapped.
    """
    h = hidden_size(unet_config)
    routes = {
        "x_embedder": Route("img_in"),
        "context_embedder": Route("txt_in"),
        "proj_out": Route("final_layer.linear"),
        "norm_out.linear": Route("final_layer.adaLN_modulation.1", ((h, 0, h), (0, h, h))),
    }
    embedders = [("timestep_embedder", "time_in")]
    if unet_config.get("guidance_embed"):
        embedders.append(("guidance_embedder", "guidance_in"))
    if unet_config.get("vec_in_dim") is not None:
        embedders.append(("text_embedder", "vector_in"))
    for d, c in embedders:
        routes[f"{names.time_embed}.{d}.linear_1"] = Route(f"{c}.in_layer")
        routes[f"{names.time_embed}.{d}.linear_2"] = Route(f"{c}.out_layer")
    return routes


def qk_norm_params(unet_config: dict) -> dict[str, str]:
    """Diffusers QK-norm weights -> ComfyUI parameter names (the only non-Linear parameters).

    This is the original file layout (`.scale`), which ComfyUI 0.3.75's modules use too; newer
    ComfyUI (v0.33) renames it to `weight` when it loads a file: `host.as_installed_unet_keys`
    applies that loader's renaming.
    """
    params: dict[str, str] = {}
    for i in range(int(unet_config["depth"])):
        d, c = f"transformer_blocks.{i}.attn", f"double_blocks.{i}"
        for name, stream, which in (("norm_q", "img_attn", "query"), ("norm_k", "img_attn", "key"),
                                    ("norm_added_q", "txt_attn", "query"), ("norm_added_k", "txt_attn", "key")):
            params[f"{d}.{name}.weight"] = f"{c}.{stream}.norm.{which}_norm.scale"
    for i in range(int(unet_config["depth_single_blocks"])):
        d, c = f"single_transformer_blocks.{i}.attn", f"single_blocks.{i}"
        params[f"{d}.norm_q.weight"] = f"{c}.norm.query_norm.scale"
        params[f"{d}.norm_k.weight"] = f"{c}.norm.key_norm.scale"
    return params


def convert_with_routes(
    diffusers_sd: dict[str, torch.Tensor], routes: dict[str, Route], renames: dict[str, str]
) -> dict[str, torch.Tensor]:
    """A diffusers state dict as ComfyUI keys: Linear params through `routes`, others through `renames`.

    Parameters routed into the same ComfyUI tensor (fused q/k/v, permuted halves) are assembled
    into one tensor; a key neither table knows is an error, so a missed layer cannot pass silently.
    Unfused tensors are passed through, not copied (they share storage with `diffusers_sd`).
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[tuple[torch.Tensor, Route]]] = {}
    unknown = []
    for key, tensor in diffusers_sd.items():
        module, _, param = key.rpartition(".")
        if key in renames:
            out[renames[key]] = tensor
        elif module in routes:
            route = routes[module]
            fused.setdefault(f"{route.comfy_module}.{param}", []).append((tensor, route))
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"no ComfyUI place for {len(unknown)} diffusers parameter(s), e.g. {unknown[:3]}")
    for comfy_key, parts in fused.items():
        out[comfy_key] = _assemble(comfy_key, parts)
    return out


def _assemble(comfy_key: str, parts: list[tuple[torch.Tensor, Route]]) -> torch.Tensor:
    """One ComfyUI tensor from the diffusers tensors routed into it; every row written exactly once."""
    first, route = parts[0]
    if route.blocks is None:
        if len(parts) != 1:
            raise ValueError(f"{comfy_key}: {len(parts)} whole weights routed to one tensor")
        return first
    for tensor, r in parts:
        if tensor.shape[0] != sum(n for _, _, n in r.blocks or ()):
            raise ValueError(f"{comfy_key}: a part with {tensor.shape[0]} rows does not fill its route {r.blocks}")
    rows = covered_rows(comfy_key, [r for _, r in parts])
    out = first.new_empty((rows, *first.shape[1:]))
    for tensor, r in parts:
        place_rows(r, out, tensor)
    return out


def covered_rows(comfy_key: str, routes: list[Route]) -> int:
    """Total rows of a fused tensor; ValueError if the routes leave a gap or overlap."""
    spans = sorted(span for r in routes for span in r.comfy_rows())
    end = 0
    for start, stop in spans:
        if start != end:
            what = "overlap" if start < end else "missing"
            raise ValueError(f"{comfy_key}: rows {min(start, end)}..{max(start, end)} {what} (a fused part absent?)")
        end = stop
    return end
