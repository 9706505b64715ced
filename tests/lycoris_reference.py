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


def save_random_lycoris_file(config: LycorisConfig, model: torch.nn.Module, path, seed: int = 1,
                             scale: float = 0.2) -> None:
    """An adapter made and saved by LyCORIS itself on `model`, every parameter random (scale x N(0, 1))."""
    network = lycoris_network(config, model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras:
            for name, p in lora.named_parameters():
                if not name.startswith("org_"):
                    p.copy_(scale * torch.randn(p.shape, generator=gen))
    network.apply_to()  # registers the modules: state_dict() is empty before
    network.save_weights(str(path), torch.float32, {"lycoris_config": config.to_json()})
