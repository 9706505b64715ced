"""The reference: what LyCORIS itself builds for a config, called the way SimpleTuner calls it."""

from __future__ import annotations

import threading

import torch
from lycoris import LycorisNetwork, create_lycoris

from comfyui_lycoris.core.config import LycorisConfig
from comfyui_lycoris.core.lycoris_modules import skip_lycoris_gc

_LOCK = threading.Lock()  # apply_preset writes process-global class state
_POSITIONAL = ("multiplier", "linear_dim", "linear_alpha")


def lycoris_network(config: LycorisConfig, model: torch.nn.Module) -> LycorisNetwork:
    """apply_preset (every key set, as in a fresh process) then create_lycoris, as SimpleTuner does."""
    kwargs = {k: v for k, v in config.source.items() if k not in _POSITIONAL}
    with _LOCK, skip_lycoris_gc():
        LycorisNetwork.apply_preset(config.preset.as_lycoris_preset())
        return create_lycoris(model, config.multiplier, config.linear_dim, config.linear_alpha, **kwargs)


def module_shapes(network: LycorisNetwork) -> dict[str, dict[str, tuple[int, ...]]]:
    """lora_name -> {param name: shape} for every module LyCORIS created."""
    return {
        m.lora_name: {n: tuple(p.shape) for n, p in m.named_parameters() if not n.startswith("org_")}
        for m in network.loras
    }
