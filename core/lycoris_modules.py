"""Building LyCORIS's own module classes for planned targets (the math stays LyCORIS's)."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import lycoris.modules.tlora as _tlora
import torch
from lycoris.wrapper import network_module_dict

from .targets import PlannedTarget


@contextlib.contextmanager
def skip_lycoris_gc() -> Iterator[None]:
    """T-LoRA's init calls gc.collect() per module: ~0.5 s each in a process as big as ComfyUI's.

    Collection frees nothing the init needs, so it is skipped (only inside LyCORIS's tlora module).
    """
    saved = _tlora.gc
    _tlora.gc = types.SimpleNamespace(collect=lambda *args: 0)
    try:
        yield
    finally:
        _tlora.gc = saved


def build_adapter(target: PlannedTarget, org_module: torch.nn.Module, multiplier: float = 1.0,
                  dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0) -> torch.nn.Module:
    """The LyCORIS module create_lycoris would build for `target` around `org_module`."""
    cls = network_module_dict[target.algo]
    with skip_lycoris_gc():
            return cls(target.lora_name, org_module, multiplier, target.dim, target.alpha, dropout, rank_dropout,
                   module_dropout, target.use_tucker, **dict(target.module_kwargs))


def _stand_in(target: PlannedTarget) -> torch.nn.Module:
    """A weightless layer of the target's shape, to size its adapter."""
    shape = target.weight_shape
    if target.layer == "Linear":
        return torch.nn.Linear(shape[1], shape[0], bias=False)
    conv = {3: torch.nn.Conv1d, 4: torch.nn.Conv2d, 5: torch.nn.Conv3d}[len(shape)]
    return conv(shape[1], shape[0], tuple(shape[2:]), bias=False)


def adapter_param_shapes(target: PlannedTarget) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the target's adapter, as saved (built on `meta`: no memory)."""
    if target.algo == "full":  # FullModule copies the base weight, which a meta tensor cannot give
        return {"diff": target.weight_shape}
    with torch.device("meta"):
        module = build_adapter(target, _stand_in(target))
    return {name: tuple(p.shape) for name, p in module.named_parameters() if not name.startswith("org_")}
