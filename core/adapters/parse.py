"""parse_module: one LyCORIS module's saved tensors -> the adapter object for its algorithm.

Detection mirrors LyCORIS's `get_module`: the first class (in `lycoris.modules.MODULE_LIST` order)
whose `algo_check` finds its marker key wins.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import AdapterError, LayerSpec, ModuleAdapter, check_finite
from .fullrank import FullAdapter, IA3Adapter
from .glora import GLoRAAdapter
from .lokr import LoKrAdapter
from .lowrank import LoHaAdapter, LoRAAdapter
from .oft import BOFTAdapter, DiagOFTAdapter
from .tlora import TLoRAAdapter


def _has(*keys: str) -> Callable[[dict], bool]:
    return lambda params: any(k in params for k in keys)


def _oft_blocks(ndim: int) -> Callable[[dict], bool]:
    return lambda params: "oft_blocks" in params and params["oft_blocks"].ndim == ndim


# (name, LyCORIS algo_check, adapter class or None when unsupported), in LyCORIS's MODULE_LIST order.
_DETECT: tuple[tuple[str, Callable[[dict], bool], type[ModuleAdapter] | None], ...] = (
    ("lora", _has("lora_up.weight"), LoRAAdapter),
    ("loha", _has("hada_w1_a"), LoHaAdapter),
    ("ia3", _has("on_input"), IA3Adapter),
    ("lokr", _has("lokr_w1", "lokr_w1_a"), LoKrAdapter),
    ("full", _has("diff"), FullAdapter),
    ("norm", _has("w_norm"), None),
    ("diag-oft", _oft_blocks(3), DiagOFTAdapter),
    ("boft", _oft_blocks(4), BOFTAdapter),
    ("glora", _has("a1.weight"), GLoRAAdapter),
    ("tlora", _has("lambda_layer"), TLoRAAdapter),
)

_SHARED = {"alpha", "dora_scale"}  # keys several algorithms save
ALGOS = tuple(name for name, _, cls in _DETECT if cls is not None)


def detect_algo(params: dict[str, torch.Tensor]) -> str | None:
    """The LyCORIS algorithm a module's keys belong to, or None. A lone `weight` is IA3 (on the output)."""
    for name, check, _ in _DETECT:
        if check(params):
            return name
    return "ia3" if set(params) == {"weight"} else None


def _unrecognised(lora_name: str, params: dict[str, torch.Tensor]) -> AdapterError:
    keys = sorted(params)
    hints = ((LoRAAdapter, "lora_up.weight"), (LoHaAdapter, "hada_w1_a"), (LoKrAdapter, "lokr_w1"),
             (FullAdapter, "diff"), (GLoRAAdapter, "a1.weight"), (TLoRAAdapter, "lambda_layer"),
             (DiagOFTAdapter, "oft_blocks"))
    for cls, marker in hints:
        if set(keys) & (set(cls.KEYS) - _SHARED):  # looks like this algorithm, but its marker is absent or wrong
            if marker == "oft_blocks":
                return AdapterError(f"{lora_name}.oft_blocks: expected a 3-d (diag-oft) or 4-d (boft) tensor, "
                                    f"got shape {tuple(params['oft_blocks'].shape)}")
            return AdapterError(f"{lora_name}.{marker}: missing ({cls.algo} keys present: {keys})")
    return AdapterError(f"{lora_name}: no LyCORIS algorithm recognised from keys {keys}")


def parse_module(lora_name: str, params: dict[str, torch.Tensor], layer: LayerSpec) -> ModuleAdapter:
    """The adapter for one module's tensors (keys without the `lycoris_<path>.` prefix) on `layer`.

    Raises AdapterError (a ValueError) naming the key for a missing key, a shape that does not fit
    the layer (expected vs got), a NaN/inf value, or an unsupported algorithm.
    """
    if not params:
        raise AdapterError(f"{lora_name}: no tensors")
    check_finite(lora_name, params)
    algo = detect_algo(params)
    if algo is None:
        raise _unrecognised(lora_name, params)
    cls = next(c for name, _, c in _DETECT if name == algo)
    if cls is None:
        raise AdapterError(f"{lora_name}: LyCORIS {algo} modules (norm layers) are not supported")
    return cls(lora_name, layer, params)
