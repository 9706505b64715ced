"""SDXL: ComfyUI's `UNetModel` (openaimodel) and diffusers' `UNet2DConditionModel`.

Both describe the same network; only module paths differ (ComfyUI numbers `input_blocks` /
`output_blocks` flatly, diffusers nests `down_blocks.X.resnets.I`). No weight is fused, so every
route is a whole-weight rename (`blocks=None`), including GEGLU's `ff.net.0.proj` (both split the
projection as (value, gate) halves in the same order).

Every name comes from one walk over the block structure (`_pairs`), which yields each module as
(diffusers path, ComfyUI path, is Linear/Conv). `routes` keeps the Linear/Conv pairs; the state
dict conversion uses all of them (norms included), so the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .base import FamilyProfile, Route, place_rows

# (diffusers module path, ComfyUI module path, True for Linear/Conv, False for a norm).
Pair = tuple[str, str, bool]

SDXL_ADM_CHANNELS = 2816  # pooled text 1280 + 6 size/crop numbers x 256-dim sinusoidal embedding
TIME_ID_EMBED_DIM = 256

_RESNET: tuple[Pair, ...] = (
    ("norm1", "in_layers.0", False),
    ("conv1", "in_layers.2", True),
    ("time_emb_proj", "emb_layers.1", True),
    ("norm2", "out_layers.0", False),
    ("conv2", "out_layers.3", True),
)
_TRANSFORMER_OUTER: tuple[Pair, ...] = (
    ("norm", "norm", False),
    ("proj_in", "proj_in", True),
    ("proj_out", "proj_out", True),
)
# Inside `transformer_blocks.N` both sides use the same names.
_BLOCK_NORMS = ("norm1", "norm2", "norm3")
_BLOCK_LINEARS = tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")) + (
    "ff.net.0.proj",
    "ff.net.2",
)
_BASIC: tuple[Pair, ...] = (
    ("conv_in", "input_blocks.0.0", True),
    ("time_embedding.linear_1", "time_embed.0", True),
    ("time_embedding.linear_2", "time_embed.2", True),
    ("add_embedding.linear_1", "label_emb.0.0", True),
    ("add_embedding.linear_2", "label_emb.0.2", True),
    ("conv_norm_out", "out.0", False),
    ("conv_out", "out.2", True),
)


@dataclass(frozen=True)
class _Layout:
    """The block structure of an SDXL-style UNet, read from a ComfyUI `unet_config`."""

    channels: tuple[int, ...]  # output channels per level
    res_blocks: tuple[int, ...]  # resnets per down level (up levels have one more)
    down_depths: tuple[tuple[int, ...], ...]  # transformer depth per down level, per resnet
    up_depths: tuple[tuple[int, ...], ...]  # per up block (deepest level first), per resnet
    mid_depth: int  # >= 0: resnet+transformer+resnet; -1: one resnet; -2: no middle block
    heads: tuple[int, ...] | int  # attention heads per level, or one count for all


def _split(depths: list[int], counts: list[int]) -> tuple[tuple[int, ...], ...]:
    """Cut ComfyUI's flat per-resnet depth list into one tuple per level."""
    if len(depths) != sum(counts):
        raise ValueError(f"transformer depths {depths} do not fit num_res_blocks {counts}")
    out, start = [], 0
    for n in counts:
        out.append(tuple(depths[start : start + n]))
        start += n
    return tuple(out)


def _heads(cfg: dict, channels: tuple[int, ...], attended: list[bool]) -> tuple[int, ...] | int:
    """Heads per level the way ComfyUI derives them (fixed head width, or a fixed head count).

    Levels without attention get a placeholder: diffusers ignores it, ComfyUI never computes it.
    """
    head_channels = cfg.get("num_head_channels", -1)
    if head_channels is not None and head_channels > 0:
        if any(a and c % head_channels for c, a in zip(channels, attended, strict=True)):
            raise ValueError(f"num_head_channels {head_channels} does not divide channels {channels}")
        return tuple(max(1, c // head_channels) for c in channels)
    if cfg.get("num_heads", -1) > 0:
        return int(cfg["num_heads"])
    raise ValueError("neither num_head_channels nor num_heads is set")


def _layout(cfg: dict) -> _Layout:
    """Parse and check `unet_config`; ValueError when diffusers cannot express the same network."""
    mult = list(cfg["channel_mult"])
    res = cfg["num_res_blocks"]
    res = [int(res)] * len(mult) if isinstance(res, int) else [int(n) for n in res]
    if mult[0] != 1:
        raise ValueError(f"channel_mult {mult}: diffusers' conv_in width needs channel_mult[0] == 1")
    channels = tuple(cfg["model_channels"] * m for m in mult)
    down = _split(list(cfg["transformer_depth"]), res)
    up = _split(list(reversed(cfg["transformer_depth_output"])), [n + 1 for n in reversed(res)])
    for level in (*down, *up):
        if 0 in level and any(level):
            raise ValueError(f"transformer depths {level}: a diffusers block has attention on all resnets or none")
    mid = cfg.get("transformer_depth_middle")
    mid = down[-1][-1] if mid is None else int(mid)
    if mid >= 0 and (not any(down[-1]) or mid != down[-1][0]):
        raise ValueError(f"transformer_depth_middle {mid}: diffusers ties it to the last level's depth {down[-1]}")
    attended = [any(d) or any(u) for d, u in zip(down, reversed(up), strict=True)]
    attended[-1] = attended[-1] or mid >= 0
    return _Layout(channels, tuple(res), down, up, mid, _heads(cfg, channels, attended))


def _resnet(d: str, c: str, cin: int, cout: int) -> Iterator[Pair]:
    """A ResnetBlock2D / ResBlock; the 1x1 shortcut exists only when the width changes."""
    for dn, cn, routed in _RESNET:
        yield f"{d}.{dn}", f"{c}.{cn}", routed
    if cin != cout:
        yield f"{d}.conv_shortcut", f"{c}.skip_connection", True


def _transformer(d: str, c: str, depth: int) -> Iterator[Pair]:
    """A Transformer2DModel / SpatialTransformer with `depth` BasicTransformerBlocks."""
    for dn, cn, routed in _TRANSFORMER_OUTER:
        yield f"{d}.{dn}", f"{c}.{cn}", routed
    for t in range(depth):
        for name in _BLOCK_NORMS:
            yield f"{d}.transformer_blocks.{t}.{name}", f"{c}.transformer_blocks.{t}.{name}", False
        for name in _BLOCK_LINEARS:
            yield f"{d}.transformer_blocks.{t}.{name}", f"{c}.transformer_blocks.{t}.{name}", True


def _down(lay: _Layout, skips: list[int]) -> Iterator[Pair]:
    """down_blocks.X -> input_blocks.N; records each block's output width in `skips`."""
    n, ch = 1, lay.channels[0]
    skips.append(ch)
    for x, out in enumerate(lay.channels):
        for i in range(lay.res_blocks[x]):
            yield from _resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0", ch, out)
            ch = out
            if lay.down_depths[x][i]:
                yield from _transformer(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", lay.down_depths[x][i])
            skips.append(ch)
            n += 1
        if x < len(lay.channels) - 1:
            yield f"down_blocks.{x}.downsamplers.0.conv", f"input_blocks.{n}.0.op", True
            skips.append(ch)
            n += 1


def _middle(lay: _Layout) -> Iterator[Pair]:
    """mid_block -> middle_block (resnet, transformer, resnet), or less when the depth is negative."""
    ch = lay.channels[-1]
    if lay.mid_depth >= -1:
        yield from _resnet("mid_block.resnets.0", "middle_block.0", ch, ch)
    if lay.mid_depth >= 0:
        yield from _transformer("mid_block.attentions.0", "middle_block.1", lay.mid_depth)
        yield from _resnet("mid_block.resnets.1", "middle_block.2", ch, ch)


def _up(lay: _Layout, skips: list[int]) -> Iterator[Pair]:
    """up_blocks.X (deepest first) -> output_blocks.N, consuming the down path's skip widths."""
    n, ch = 0, lay.channels[-1]
    for x, level in enumerate(reversed(range(len(lay.channels)))):
        out = lay.channels[level]
        for i, depth in enumerate(lay.up_depths[x]):
            yield from _resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0", ch + skips.pop(), out)
            ch = out
            if depth:
                yield from _transformer(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", depth)
            if level > 0 and i == len(lay.up_depths[x]) - 1:
                yield f"up_blocks.{x}.upsamplers.0.conv", f"output_blocks.{n}.{2 if depth else 1}.conv", True
            n += 1


def _pairs(unet_config: dict) -> list[Pair]:
    """Every parametrised module of the UNet as (diffusers path, ComfyUI path, is Linear/Conv)."""
    lay, skips = _layout(unet_config), []
    return [*_BASIC, *_down(lay, skips), *_middle(lay), *_up(lay, skips)]


def _transformer_layers(lay: _Layout) -> dict:
    """diffusers' transformer depth kwargs: one int per level when uniform, else per-resnet lists."""
    down = [level[0] if level and level[0] else 1 for level in lay.down_depths]
    uniform = all(len(set(level)) <= 1 for level in (*lay.down_depths, *lay.up_depths))
    mirrored = all(set(u) <= {0, d} for u, d in zip(lay.up_depths, reversed(down), strict=True))
    if uniform and mirrored:
        return {"transformer_layers_per_block": down}
    return {
        "transformer_layers_per_block": [list(level) for level in lay.down_depths],
        "reverse_transformer_layers_per_block": [list(level) for level in lay.up_depths],
    }


_MID_BLOCK = {-2: None, -1: "UNetMidBlock2D"}


class SDXLProfile(FamilyProfile):
    """SDXL base (and SDXL-shaped distillations such as SSD-1B, Vega, KOALA)."""

    name = "sdxl"
    display_name = "SDXL"
    diffusers_class = "UNet2DConditionModel"

    def matches(self, unet_config: dict) -> bool:
        """An SDXL-architecture UNet: text-time ADM of 2816, cross-attention, linear proj, 3 levels."""
        cfg = unet_config
        if cfg.get("image_model") is not None or cfg.get("adm_in_channels") != SDXL_ADM_CHANNELS:
            return False
        if cfg.get("context_dim") is None or not cfg.get("use_linear_in_transformer"):
            return False
        if len(cfg.get("channel_mult") or ()) != 3 or cfg.get("use_temporal_resblock"):
            return False
        try:
            _layout(cfg)
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def diffusers_config(self, unet_config: dict) -> dict:
        """`UNet2DConditionModel` kwargs; `attention_head_dim` is the head *count* (a diffusers quirk)."""
        lay = _layout(unet_config)
        attn_down = [any(level) for level in lay.down_depths]
        attn_up = [any(level) for level in lay.up_depths]
        return {
            "in_channels": unet_config["in_channels"],
            "out_channels": unet_config["out_channels"],
            "block_out_channels": list(lay.channels),
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_down],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn_up],
            "mid_block_type": _MID_BLOCK.get(lay.mid_depth, "UNetMidBlock2DCrossAttn"),
            "layers_per_block": list(lay.res_blocks),
            **_transformer_layers(lay),
            "attention_head_dim": lay.heads if isinstance(lay.heads, int) else list(lay.heads),
            "cross_attention_dim": unet_config["context_dim"],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": TIME_ID_EMBED_DIM,
            "projection_class_embeddings_input_dim": unet_config["adm_in_channels"],
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
            "act_fn": "silu",
        }

    def routes(self, unet_config: dict) -> dict[str, Route]:
        """Whole-weight routes for every Linear/Conv: SDXL fuses nothing."""
        return {d: Route(c) for d, c, routed in _pairs(unet_config) if routed}

    def convert_state_dict(self, diffusers_sd: dict[str, torch.Tensor], unet_config: dict) -> dict[str, torch.Tensor]:
        """Every parameter under its ComfyUI name: Linear/Conv through `routes`, norms by the same walk.

        Raises ValueError on a diffusers key the architecture does not have (a mapping hole).
        """
        routes = self.routes(unet_config)
        out: dict[str, torch.Tensor] = {}
        left = set(diffusers_sd)
        for d, c, routed in _pairs(unet_config):
            for param in ("weight", "bias"):
                value = diffusers_sd.get(f"{d}.{param}")
                if value is None:
                    continue
                left.discard(f"{d}.{param}")
                if routed:
                    route = routes[d]
                    c = route.comfy_module
                    target = value.new_empty(value.shape)
                    place_rows(route, target, value)
                    value = target
                out[f"{c}.{param}"] = value
        if left:
            raise ValueError(f"diffusers keys with no SDXL counterpart: {sorted(left)[:8]}")
        return out


PROFILE = SDXLProfile()
