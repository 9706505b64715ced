"""Exact merge: strength * ΔW per adapter module, computed here (not by LyCORIS's merge_to,
which scales LoHa and decomposed LoKr twice), as patches on ComfyUI weights and row slices."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .adapter_set import LoadedAdapter
from .families.base import take_rows
from .runtime import place
from .tlora import module_mask

# (ComfyUI parameter key under diffusion_model, offset (dim, start, length) or None, delta)
Patch = tuple[str, tuple[int, int, int] | None, torch.Tensor]


def merge_patches(adapter: LoadedAdapter, strength: float, base_weight: Callable[[str], torch.Tensor],
                  tlora_timestep: int | None = None, has_param: Callable[[str], bool] = lambda key: True,
                  multipliers: dict[str, float] | None = None) -> tuple[list[Patch], list[str]]:
    """Patches that add the adapter at `strength` to the base, and warnings.

    `base_weight(key)` returns a ComfyUI weight (float32). T-LoRA merges at one timestep's mask
    (`tlora_timestep`, 0..1000) or with every rank active (None). `multipliers`: per ComfyUI module
    path, a factor on the strength (per-block strengths; missing: 1.0); a module at 0 adds nothing.
    """
    patches: list[Patch] = []
    warnings: list[str] = []
    if adapter.tlora is not None:
        when = f"timestep {tlora_timestep}" if tlora_timestep is not None else "the full rank mask"
        warnings.append(f"T-LoRA merged at {when}: the merged model is no longer timestep-dependent")
    for binding in adapter.bindings.values():
        route, module = binding.route, binding.adapter
        module_strength = float(strength) * (multipliers or {}).get(route.comfy_module, 1.0)
        if module_strength == 0.0 and module.linear_in_strength:
            continue
        base = take_rows(route, base_weight(f"{route.comfy_module}.weight"))
        mask = None
        if getattr(module, "rank", None) is not None and adapter.tlora is not None and tlora_timestep is not None:
            mask = module_mask(torch.tensor([tlora_timestep]), module.rank, adapter.tlora.linear_dim,
                               adapter.tlora.min_rank, adapter.tlora.alpha)
        place(module, "cpu", torch.float32)
        delta_w, delta_b = module.delta_weight(base, module_strength, rank_mask=mask)
        patches += _sliced(f"{route.comfy_module}.weight", route, delta_w)
        if delta_b is not None:
            if not has_param(f"{route.comfy_module}.bias"):
                warnings.append(f"{binding.path}: the adapter changes a bias the ComfyUI layer does not have; dropped")
                continue
            patches += _sliced(f"{route.comfy_module}.bias", route, delta_b)
    return patches, warnings


def _sliced(key: str, route, delta: torch.Tensor) -> list[Patch]:
    if route.blocks is None:
        return [(key, None, delta)]
    return [(key, (0, c, n), delta[d : d + n]) for c, d, n in route.blocks]
