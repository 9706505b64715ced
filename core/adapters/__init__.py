"""The exact math of every LyCORIS algorithm, per module, from saved tensors (ComfyUI-free).

`parse_module(lora_name, params, layer)` detects the algorithm from the keys (LyCORIS's order),
validates every tensor against the layer and returns a `ModuleAdapter` with:
- `delta_output(x, base_weight=None, rank_mask=None)`: bypass output delta at strength 1
  (only when `linear_in_strength`);
- `delta_weight(base_weight, strength, rank_mask=None)`: exact (ΔW, Δbias) of LyCORIS's rebuild
  forward at that strength, for every algorithm;
- `state_dict()`, `to(device, dtype)`, `warnings`, and `rank` for T-LoRA;
- for the runtime's rebuilt-weight path: `weight_writer`, `leaf_grads`, the cost estimates
  `delta_macs` / `rebuild_macs` / `rebuild_passes` / `grad_macs`, and `placed(device, dtype)`
  (cached derived copies; the saved tensors themselves are never moved by the runtime).
"""

from .base import KERNEL_BACKEND, PASS_MACS, AdapterError, LayerSpec, ModuleAdapter
from .fullrank import FullAdapter, IA3Adapter
from .glora import GLoRAAdapter
from .lokr import LoKrAdapter
from .lowrank import LoHaAdapter, LoRAAdapter
from .oft import BOFTAdapter, DiagOFTAdapter
from .parse import ALGOS, detect_algo, parse_module
from .tlora import TLoRAAdapter, svd_base

__all__ = [
    "ALGOS",
    "KERNEL_BACKEND",
    "PASS_MACS",
    "AdapterError",
    "BOFTAdapter",
    "DiagOFTAdapter",
    "FullAdapter",
    "GLoRAAdapter",
    "IA3Adapter",
    "LayerSpec",
    "LoHaAdapter",
    "LoKrAdapter",
    "LoRAAdapter",
    "ModuleAdapter",
    "TLoRAAdapter",
    "detect_algo",
    "parse_module",
    "svd_base",
]
