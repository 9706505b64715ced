"""Bypass application of adapters on ComfyUI modules: output[rows] += strength * delta(x).

Base weights are never written. Each targeted ComfyUI module gets one forward hook, installed
once; the hook does nothing unless a *call state* is active in the current context. The call
state is set by a wrapper that ComfyUI runs only for the ModelPatcher clone that carries the
adapters (see `host.attach_runtime`), so clones never see each other's adapters, a clone without
adapters runs exactly the base, and changing a strength changes a number, not a weight.

A call state holds, for one model call, every active adapter module with its per-sample strength
(a batch can mix strengths: LyCORIS A/B) and per-sample T-LoRA rank mask (from each sample's
timestep, so the CFG uncond half and mixed timesteps are right).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .families import Route
from .tlora import rank_mask

_ACTIVE: contextvars.ContextVar[CallState | None] = contextvars.ContextVar("lycoris_call_state", default=None)
_HOOK_FLAG = "_lycoris_hook_path"


@dataclass(frozen=True, eq=False)
class TLoraSchedule:
    """How an adapter's T-LoRA ranks follow the timestep (SimpleTuner's tlora_min_rank / tlora_alpha)."""

    min_rank: int = 1
    alpha: float = 1.0


@dataclass(eq=False)
class ModuleBinding:
    """One adapter module bound to a ComfyUI module: the math object plus where its rows land."""

    path: str  # diffusers path (for messages and files)
    adapter: object  # a core.adapters ModuleAdapter
    route: Route


@dataclass(eq=False)
class Application:
    """An adapter applied to a model clone: its bindings per ComfyUI module, and the strengths.

    `strengths` has one value, or several for an A/B batch: latent sample i of each CFG chunk
    uses strengths[i % len(strengths)]. Immutable once built; deep copies (ModelPatcher.clone
    deep-copies model_options) return the same object so adapter tensors are never duplicated.
    """

    name: str
    bindings: dict[str, list[ModuleBinding]]  # ComfyUI module path -> bindings
    strengths: tuple[float, ...]
    tlora: TLoraSchedule | None = None
    _weight_cache: dict = field(default_factory=dict, repr=False)

    def __deepcopy__(self, memo) -> Application:
        return self


@dataclass(eq=False)
class _Active:
    binding: ModuleBinding
    strength: float | torch.Tensor  # a number, or a [B] vector when the batch mixes strengths
    mask: torch.Tensor | None  # [B, rank] T-LoRA mask, None = all ranks
    app: Application


@dataclass(eq=False)
class CallState:
    """Everything the hooks need during one model call."""

    by_module: dict[str, list[_Active]]


def per_sample_strengths(strengths: Sequence[float], batch: int, chunks: int) -> float | torch.Tensor:
    """Strength of every sample of a model call whose batch is `chunks` equal CFG chunks."""
    if len(set(strengths)) == 1:
        return float(strengths[0])
    chunk = max(1, batch // max(1, chunks))
    return torch.tensor([strengths[(i % chunk) % len(strengths)] for i in range(batch)], dtype=torch.float32)


def build_call_state(applications: Sequence[Application], batch: int, chunks: int,
                     timesteps: torch.Tensor | None) -> CallState:
    """The call state for a batch; `timesteps` (per sample, 0..1000) drive T-LoRA masks."""
    by_module: dict[str, list[_Active]] = {}
    for app in applications:
        strength = per_sample_strengths(app.strengths, batch, chunks)
        masks: dict[int, torch.Tensor] = {}
        for comfy_path, bindings in app.bindings.items():
            for binding in bindings:
                mask = None
                rank = getattr(binding.adapter, "rank", None)
                if app.tlora is not None and rank is not None and timesteps is not None:
                    if rank not in masks:
                        masks[rank] = rank_mask(timesteps, rank, min(app.tlora.min_rank, rank), app.tlora.alpha)
                    mask = masks[rank]
                by_module.setdefault(comfy_path, []).append(_Active(binding, strength, mask, app))
    return CallState(by_module)


@contextlib.contextmanager
def active(state: CallState) -> Iterator[None]:
    """Make `state` the one the hooks see in this context (thread) for the duration."""
    token = _ACTIVE.set(state)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def install_hooks(root: torch.nn.Module, comfy_paths: Sequence[str]) -> None:
    """Put the (inert until activated) hook on each ComfyUI module; idempotent."""
    for path in comfy_paths:
        module = root.get_submodule(path)
        if getattr(module, _HOOK_FLAG, None) is None:
            module.register_forward_hook(functools.partial(_hook, path))
            setattr(module, _HOOK_FLAG, path)


def _hook(path: str, module: torch.nn.Module, inputs: tuple, output: torch.Tensor):
    state = _ACTIVE.get()
    if state is None:
        return None
    actives = state.by_module.get(path)
    if not actives:
        return None
    x = inputs[0]
    channel_dim = 1 if isinstance(module, torch.nn.modules.conv._ConvNd) else -1
    for act in actives:
        if isinstance(act.strength, float) and act.binding.adapter.linear_in_strength:
            place(act.binding.adapter, x.device, x.dtype)
            if act.strength == 0.0 or act.binding.adapter.add_output_(x, output, act.binding.route.blocks,
                                                                      act.strength):
                continue
        delta = _delta(act, x, module)
        _add_rows(output, delta.to(output.dtype), act.binding.route, channel_dim)
    return output


def _base_weight(module: torch.nn.Module, route: Route, like: torch.Tensor) -> torch.Tensor:
    """The diffusers-layer weight inside the ComfyUI weight (row slice), in the input's dtype."""
    weight = module.weight.to(device=like.device, dtype=like.dtype)
    if route.blocks is None:
        return weight
    return torch.cat([weight[c : c + n] for c, _, n in sorted(route.blocks, key=lambda b: b[1])])


def _broadcast(strength: float | torch.Tensor, delta: torch.Tensor) -> float | torch.Tensor:
    if isinstance(strength, float):
        return strength
    shape = (delta.shape[0],) + (1,) * (delta.ndim - 1)
    return strength.to(device=delta.device, dtype=delta.dtype).view(shape)


def _delta(act: _Active, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """The adapter's output delta for this call, in diffusers row order, strength applied."""
    adapter, route = act.binding.adapter, act.binding.route
    place(adapter, x.device, x.dtype)
    base = _base_weight(module, route, x) if adapter.needs_base_weight else None
    mask = None if act.mask is None else act.mask.to(device=x.device, dtype=x.dtype)
    if adapter.linear_in_strength:
        if isinstance(act.strength, float) and act.strength == 0.0:
            return torch.zeros((), device=x.device, dtype=x.dtype)
        delta = adapter.delta_output(x, base_weight=base, rank_mask=mask)
        return delta * _broadcast(act.strength, delta)
    return _delta_by_weight(act, x, module, base if base is not None else _base_weight(module, route, x))


def _delta_by_weight(act: _Active, x: torch.Tensor, module: torch.nn.Module, base: torch.Tensor) -> torch.Tensor:
    """Exact route for algorithms non-linear in strength (DoRA, OFT...): x through ΔW(strength)."""
    strengths = [act.strength] if isinstance(act.strength, float) else act.strength.tolist()
    outputs = {}
    for s in dict.fromkeys(strengths):
        key = (act.binding.path, float(s), x.device, x.dtype)
        if key not in act.app._weight_cache:
            act.app._weight_cache[key] = act.binding.adapter.delta_weight(base, float(s))
        dw, db = act.app._weight_cache[key]
        outputs[s] = _apply_weight(module, x, dw, db)
    if isinstance(act.strength, float):
        return outputs[act.strength]
    picked = [outputs[s][i] for i, s in enumerate(strengths)]
    return torch.stack(picked)


def _apply_weight(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.ndim - 2]
        return conv(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, weight, bias)


def place(adapter: object, device: torch.device, dtype: torch.dtype) -> None:
    """Move an adapter module's tensors once per (device, dtype) change, not on every call."""
    device = torch.device(device)
    if getattr(adapter, "_lycoris_placed", None) != (device, dtype):
        adapter.to(device=device, dtype=dtype)
        adapter._lycoris_placed = (device, dtype)


def _add_rows(output: torch.Tensor, delta: torch.Tensor, route: Route, channel_dim: int) -> None:
    """output[rows of route] += delta (diffusers rows), in place, along the channel dimension."""
    if delta.ndim == 0:
        return
    if route.blocks is None:
        output.add_(delta)
        return
    for c, d, n in route.blocks:
        output.narrow(channel_dim, c, n).add_(delta.narrow(channel_dim, d, n))
