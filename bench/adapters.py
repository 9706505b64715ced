"""Adapter files made by LyCORIS itself on the diffusers twin of a benchmark model.

As in tests/unit/test_runtime_interop.py: apply_preset + create_lycoris on the diffusers
skeleton, every parameter random and non-zero, `apply_to()`, then `save_weights`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from comfyui_lycoris.core.config import LycorisConfig, parse_config
from comfyui_lycoris.core.families import profile_named
from comfyui_lycoris.core.lycoris_modules import skip_lycoris_gc

from .env import REPO

# Every Linear of the transformer blocks (double: attention + feed-forwards; single: fused
# projections), as the shipped presets target them.
BLOCK_TARGETS = ["Flux2Attention", "Flux2FeedForward", "Flux2ParallelSelfAttention"]


def _preset(name: str) -> dict:
    return json.loads((REPO / "configs" / f"{name}.json").read_text())


def configs() -> dict[str, LycorisConfig]:
    """name -> config. `lora_r16_attn` is the file ComfyUI core can also load (see cases.py)."""
    lora = _preset("lora")  # LoRA r16 / alpha 8 on attention and feed-forward blocks
    loha = _preset("loha")  # LoHa r16 / alpha 8, same targets
    for preset in (lora, loha):
        preset["apply_preset"] = {"target_module": BLOCK_TARGETS}
    lokr = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 4,
            "full_matrix": True, "apply_preset": {"target_module": BLOCK_TARGETS}}
    attn = {**lora, "apply_preset": {"target_module": ["Flux2Attention"]}}
    return {
        "lora_r16": parse_config(lora),
        "lokr_f4_full": parse_config(lokr),
        "loha_r16": parse_config(loha),
        "lora_r16_attn": parse_config(attn),
    }


@torch.no_grad()
def write(config: LycorisConfig, unet_config: dict, path: Path, seed: int = 11, family: str = "flux2",
          device: str = "cpu") -> Path:
    """Build the adapter with LyCORIS on the diffusers skeleton of `family` (`device="meta"`: no base
    weights, for real widths), randomise it and save it."""
    import logging

    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # one INFO line per module otherwise
    model = profile_named(family).build_skeleton(unet_config, device=device)
    with skip_lycoris_gc():
        LycorisNetwork.apply_preset(config.preset.as_lycoris_preset())
        network = create_lycoris(model, config.multiplier, config.linear_dim, config.linear_alpha,
                                 **config.lycoris_kwargs())
    gen = torch.Generator().manual_seed(seed)
    for lora in network.loras:
        for name, p in lora.named_parameters():
            if not name.startswith("org_"):
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(noise * (0.15 if p.ndim < 2 else 0.15 / p.shape[-1] ** 0.25))
    network.apply_to()  # registers the modules: the state dict is empty before
    path.parent.mkdir(parents=True, exist_ok=True)
    network.save_weights(str(path), torch.float32, {"lycoris_config": config.to_json()})
    return path
