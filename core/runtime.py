"""Application of adapters on ComfyUI modules without writing a base weight.

Each targeted ComfyUI module gets, once, a forward that does nothing unless a *call state* is
active in the current context (its class is swapped for a subclass whose `forward` checks; the
original forward runs otherwise). The call state is set by a wrapper that ComfyUI runs only for
the ModelPatcher clone that carries the adapters (see `host.attach_application`), so clones never
see each other's adapters, a clone without adapters runs exactly the base, and changing a
strength changes a number, not a weight.

A call state holds, for one model call, every active adapter module with its per-sample strength
(a batch can mix strengths: LyCORIS A/B) and per-sample T-LoRA rank mask (from each sample's
timestep, so the CFG uncond half and mixed timesteps are right).

Two ways to run an adapted layer, chosen per module and call from the adapters' cost estimates:
- *delta* (bypass): the base op, then output[rows] += strength * delta(x) (LoRA's rank-r chain,
  T-LoRA's masked chain, small token counts);
- *rebuilt weight*: W' = W + Σ strength * ΔW (row slices of fused layers included) built for this
  call only, then one op with W' instead of the base op plus a delta product (LoKr, LoHa, full,
  and every algorithm that is not linear in the strength). Samples are grouped by strength.
  With autograd (training), `_RebuiltLinear` keeps no W': it saves only x, rebuilds W' in
  backward for grad x and takes the adapter's gradients from (grad_out, x). Which path is cheaper
  is decided per module and call from the adapters' cost estimates (`_rebuild_pays`).
The base part is exactly what the host's op computes: the weight and bias come from the host's
own cast (ComfyUI's `cast_bias_weight`: dtype casts, weight patches, lowvram), registered by
`core.host` through `register_host`; plain torch Linear/Conv modules use their own tensors.
Modules whose op cannot be reproduced that way always take the delta path.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import scratch
from .adapters.base import PASS_MACS, pass_cost
from .dropout import ModuleDraw
from .families import Route
from .strength_shape import scaled
from .tlora import module_mask

_ACTIVE: contextvars.ContextVar[CallState | None] = contextvars.ContextVar("lycoris_call_state", default=None)
# 'auto' (per cost), 'rebuild' or 'delta'; the environment variable sets the default (tests run both).
_POLICY: contextvars.ContextVar[str] = contextvars.ContextVar(
    "lycoris_rebuild_policy", default=os.environ.get("COMFYUI_LYCORIS_REBUILD", "auto").strip().lower() or "auto")
_HOOK_FLAG = "_lycoris_hook_path"


@dataclass(frozen=True, eq=False)
class TLoraSchedule:
    """How an adapter's T-LoRA ranks follow the timestep (SimpleTuner's tlora_min_rank / tlora_alpha)."""

    min_rank: int = 1
    alpha: float = 1.0
    linear_dim: int | None = None  # SimpleTuner's mask width (the config's linear_dim); None: each module's rank


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
    Nothing derived from a call (no rebuilt weight) is kept here.
    """

    name: str
    bindings: dict[str, list[ModuleBinding]]  # ComfyUI module path -> bindings
    strengths: tuple[float, ...]
    tlora: TLoraSchedule | None = None
    blocks: dict[str, float] | None = None  # ComfyUI module path -> multiplier (core.strength_shape)
    schedule: object = None  # a core.strength_shape.BoundSchedule: multiplier over the sampling percent

    def __deepcopy__(self, memo) -> Application:
        return self


@dataclass(eq=False)
class _Active:
    binding: ModuleBinding
    strength: float | torch.Tensor  # a number, or a [B] vector when the batch mixes strengths
    mask: torch.Tensor | None  # [B, rank] T-LoRA mask, None = all ranks
    app: Application
    drop: ModuleDraw | None = None  # LyCORIS's dropouts of this call (training only, core.dropout)


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
                     timesteps: torch.Tensor | None, sigmas: torch.Tensor | None = None,
                     draws: dict[str, ModuleDraw] | None = None) -> CallState:
    """The call state for a batch; `timesteps` (per sample, 0..1000) drive T-LoRA masks, `sigmas`
    (per sample) strength schedules. Strength per module and sample: strength x block x schedule.
    `draws` (training only): LyCORIS's dropouts of this call per binding path; a dropped module is left out."""
    by_module: dict[str, list[_Active]] = {}
    for app in applications:
        strength = per_sample_strengths(app.strengths, batch, chunks)
        if app.schedule is not None and sigmas is not None:
            strength = scaled(strength, app.schedule.multipliers(sigmas), batch)
        masks: dict[int, torch.Tensor] = {}
        for comfy_path, bindings in app.bindings.items():
            multiplier = (app.blocks or {}).get(comfy_path, 1.0)
            module_strength = strength if multiplier == 1.0 else scaled(strength, multiplier, batch)
            for binding in bindings:
                drop = (draws or {}).get(binding.path)
                if drop is not None and drop.dropped:
                    continue  # module dropout: this layer runs its base only in this call
                mask = None
                rank = getattr(binding.adapter, "rank", None)
                if app.tlora is not None and rank is not None and timesteps is not None:
                    if rank not in masks:
                        masks[rank] = module_mask(timesteps, rank, app.tlora.linear_dim, app.tlora.min_rank,
                                                  app.tlora.alpha)
                    mask = masks[rank]
                by_module.setdefault(comfy_path, []).append(_Active(binding, module_strength, mask, app,
                                                                    drop if drop is not None and drop.changes_output
                                                                    else None))
    return CallState(by_module)


@contextlib.contextmanager
def active(state: CallState) -> Iterator[None]:
    """Make `state` the one the hooks see in this context (thread) for the duration."""
    token = _ACTIVE.set(state)
    try:
        # Sampling: the rebuilt layers of the call share their transient buffers. Training keeps
        # allocating per layer: a buffer held for the whole forward would add to the step's peak.
        with scratch.scope() if not torch.is_grad_enabled() else contextlib.nullcontext():
            yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def rebuild_policy(mode: str) -> Iterator[None]:
    """'auto' (default: per cost), 'rebuild' (rebuilt weight wherever possible) or 'delta' (never, for
    algorithms linear in the strength), in this context. For tests and benchmarks."""
    if mode not in ("auto", "rebuild", "delta"):
        raise ValueError(f"rebuild policy: '{mode}' is not one of auto, rebuild, delta")
    token = _POLICY.set(mode)
    try:
        yield
    finally:
        _POLICY.reset(token)


# -- the host's ops ---------------------------------------------------------------------------

@dataclass(frozen=True)
class HostOps:
    """How the host's layer classes are run (registered by `core.host`; core imports no host code).

    `kind(cls)`: 'linear' / 'conv' for a host class whose op is exactly `op(x, *weights(module, x))`,
    False for a host class whose op is something else (quantised matmuls...), None for a class that
    is not the host's. `weights(module, x)`: (weight, bias) as the host's op would use them for x.
    """

    kind: Callable[[type], str | bool | None]
    weights: Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


_HOST: HostOps | None = None
_KINDS: dict[type, str | None] = {}
_HOOKED_CLASSES: dict[type, type] = {}


def register_host(ops: HostOps) -> None:
    global _HOST
    _HOST = ops
    _KINDS.clear()


_PLAIN_CONV_FORWARDS = (torch.nn.Conv1d.forward, torch.nn.Conv2d.forward, torch.nn.Conv3d.forward)


def _op_kind(module: torch.nn.Module) -> str | None:
    """'linear' / 'conv' when the module's own forward is op(x, weight, bias) with weights we can get."""
    cls = getattr(type(module), "_lycoris_base", type(module))
    if cls in _KINDS:
        return _KINDS[cls]
    kind = _HOST.kind(cls) if _HOST is not None else None
    if kind is None:
        if cls.forward is torch.nn.Linear.forward:
            kind = "linear"
        elif cls.forward in _PLAIN_CONV_FORWARDS:
            kind = "conv"
    kind = kind or None
    _KINDS[cls] = kind
    return kind


def _base_weights(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) the module's own op uses for input x (a reproducible module: see _op_kind)."""
    cls = getattr(type(module), "_lycoris_base", type(module))
    if _HOST is not None and _HOST.kind(cls) is not None:
        return _HOST.weights(module, x)
    bias = module.bias
    return (module.weight.to(device=x.device, dtype=x.dtype),
            None if bias is None else bias.to(device=x.device, dtype=x.dtype))


def _op(module: torch.nn.Module, kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    return F.linear(x, weight, bias) if kind == "linear" else module._conv_forward(x, weight, bias)


# -- hooks ------------------------------------------------------------------------------------

def install_hooks(root: torch.nn.Module, comfy_paths: Sequence[str]) -> None:
    """Give each ComfyUI module the (inert until activated) adapter forward; idempotent.

    The module's class becomes a subclass that only overrides `forward` (isinstance checks, the
    host's attributes and anything that wraps the instance's forward keep working).
    """
    for path in comfy_paths:
        module = root.get_submodule(path)
        if getattr(module, _HOOK_FLAG, None) is None:
            module.__class__ = _hooked_class(type(module))
            setattr(module, _HOOK_FLAG, path)


def _hooked_class(cls: type) -> type:
    if getattr(cls, "_lycoris_base", None) is not None:
        return cls
    sub = _HOOKED_CLASSES.get(cls)
    if sub is None:
        def body(ns):
            ns.update(forward=_hooked_forward, _lycoris_base=cls, __module__=cls.__module__,
                      __qualname__=cls.__qualname__)
        sub = types.new_class(cls.__name__, (cls,), exec_body=body)
        _HOOKED_CLASSES[cls] = sub
    return sub


def _hooked_forward(self, *args, **kwargs):
    state = _ACTIVE.get()
    if state is not None:
        actives = state.by_module.get(self.__dict__.get(_HOOK_FLAG))
        if actives:
            return _adapted_forward(self, actives, args, kwargs)
    return type(self)._lycoris_base.forward(self, *args, **kwargs)


def _adapted_forward(module: torch.nn.Module, actives: list[_Active], args: tuple, kwargs: dict):
    x = args[0] if args else next(iter(kwargs.values()), None)
    simple = len(args) == 1 and not kwargs and isinstance(x, torch.Tensor) and x.ndim >= 2
    kind = _op_kind(module) if simple else None
    rebuild, post = _split(module, kind, actives, x) if kind is not None else ([], actives)
    if rebuild:
        output = _rebuilt_output(module, kind, x, rebuild)
    else:
        output = type(module)._lycoris_base.forward(module, *args, **kwargs)
    _add_deltas(module, post, x, output)
    return output


def _trains(adapter) -> bool:
    return any(t.requires_grad for t in adapter.params.values())


def _split(module: torch.nn.Module, kind: str, actives: list[_Active], x: torch.Tensor
           ) -> tuple[list[_Active], list[_Active]]:
    """(actives folded into a rebuilt weight, actives added as output deltas) for this call."""
    policy = _POLICY.get()
    trains = {id(act): _trains(act.binding.adapter) for act in actives} if torch.is_grad_enabled() else {}
    grad = torch.is_grad_enabled() and (x.requires_grad or any(trains.values()))  # the output needs a graph
    if grad and (kind != "linear" or module.weight.requires_grad
                 or (module.bias is not None and module.bias.requires_grad)):
        return [], actives  # autograd through the base op itself (an unfrozen base, a conv): deltas
    channels = x.shape[-1] if kind == "linear" else x.shape[1]
    tokens = x.numel() // max(1, channels)
    rebuild, post = [], []
    for act in actives:
        adapter = act.binding.adapter
        uniform = isinstance(act.strength, float)
        if uniform and act.strength == 0.0 and adapter.linear_in_strength:
            continue  # exactly the base
        if act.drop is not None:
            post.append(act)  # masks and nn.Dropout act on the delta (core.dropout)
        elif not uniform and (grad or act.strength.numel() != x.shape[0]):
            post.append(act)  # mixed strengths with autograd, or a layer whose batch is not the call's: deltas
        elif not adapter.linear_in_strength:
            (post if grad else rebuild).append(act)
        elif not adapter.can_rebuild or policy == "delta":
            post.append(act)
        elif policy == "rebuild" or _rebuild_pays(adapter, tokens, grad and trains[id(act)], x.dtype):
            rebuild.append(act)
        else:
            post.append(act)
    return rebuild, post


def _rebuild_pays(adapter, tokens: int, training: bool, dtype: torch.dtype = torch.float32) -> bool:
    """Whether building W' beats the delta product (forward; or forward twice + backward when training).

    Sampling prices passes for the call's dtype (`pass_cost`); training keeps the fp32 price, which
    `core.memory_estimate` follows too (the path decides what a step saves for backward)."""
    passes = PASS_MACS if training else pass_cost(dtype)
    build = adapter.rebuild_macs() + passes * adapter.rebuild_passes() * math.prod(adapter.layer.weight_shape)
    if training:
        return adapter.grad_macs(tokens) + 3 * build < 4 * adapter.delta_macs(tokens)
    return build < adapter.delta_macs(tokens, passes)


# -- the rebuilt-weight path ------------------------------------------------------------------

class _Plan:
    """One module's rebuilt weight for a call: which bindings, with which tensors trainable."""

    def __init__(self, module: torch.nn.Module, kind: str, bindings: list[ModuleBinding]):
        self.module, self.kind, self.bindings = module, kind, bindings
        self.leaves: list[torch.Tensor] = []
        self.slots: list[tuple[int, int]] = []  # per binding: (first leaf, count)
        for binding in bindings:
            own = [t for t in binding.adapter.params.values() if t.requires_grad]
            self.slots.append((len(self.leaves), len(own)))
            self.leaves += own

    def rebuilt(self, x: torch.Tensor, strengths: Sequence[float]) -> _Rebuilt:
        weight, bias = _base_weights(self.module, x)
        return _Rebuilt(weight, bias, self.bindings, strengths)

    def weights(self, x: torch.Tensor, strengths: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b') in full (W itself when nothing adds)."""
        return self.rebuilt(x, strengths).full()

    def run(self, x: torch.Tensor, strengths: Sequence[float]) -> torch.Tensor:
        """The op with W' + b' (no autograd). A linear layer's W' is built a window of output rows at a
        time (`scratch.window_rows`), each window just before its product, so the transient stays bounded."""
        rebuilt = self.rebuilt(x, strengths)
        if self.kind != "linear" or not rebuilt.changed:
            return _op(self.module, self.kind, x, *rebuilt.full())
        weight, bias = rebuilt.weight, rebuilt.bias
        rows = weight.shape[0]
        blocks = max((binding.adapter.rebuild_blocks() for binding in self.bindings), default=0)
        step = scratch.window_rows(rows, weight[0].numel() * weight.element_size(), 1 + blocks)
        buffer = scratch.take("window", (step, *weight.shape[1:]), weight)
        if step >= rows:  # one window: the base's own op, with W'
            return F.linear(x, rebuilt.rows(0, rows, buffer), bias)
        x2 = x.reshape(-1, x.shape[-1])
        y = x2.new_empty((x2.shape[0], rows))
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            window = rebuilt.rows(lo, hi, buffer[: hi - lo])
            if bias is None:
                torch.mm(x2, window.t(), out=y[:, lo:hi])
            else:
                torch.addmm(bias[lo:hi], x2, window.t(), out=y[:, lo:hi])
        return y if x.ndim == 2 else y.view(*x.shape[:-1], rows)


def _rebuilt_output(module: torch.nn.Module, kind: str, x: torch.Tensor, rebuild: list[_Active]) -> torch.Tensor:
    plan = _Plan(module, kind, [act.binding for act in rebuild])
    if all(isinstance(act.strength, float) for act in rebuild):
        strengths = tuple(act.strength for act in rebuild)
        if torch.is_grad_enabled() and (x.requires_grad or plan.leaves):
            # 2-d in and out: the result is then not a view made inside the Function, so deltas of
            # the other adapters can still be added to it in place.
            y = _RebuiltLinear.apply(x.reshape(-1, x.shape[-1]), plan, strengths, *plan.leaves)
            return y.view(*x.shape[:-1], y.shape[-1])
        return plan.run(x, strengths)
    batch = x.shape[0]
    per_sample = [[act.strength] * batch if isinstance(act.strength, float) else act.strength.tolist()
                  for act in rebuild]
    groups: dict[tuple[float, ...], list[int]] = {}
    for i, key in enumerate(zip(*per_sample, strict=True)):
        groups.setdefault(key, []).append(i)
    output = None
    for strengths, samples in groups.items():
        index = torch.tensor(samples, device=x.device)
        y = plan.run(x.index_select(0, index), strengths)
        if output is None:
            output = y.new_empty((batch, *y.shape[1:]))
        output.index_copy_(0, index, y)
    return output


class _RebuiltLinear(torch.autograd.Function):
    """F.linear(x, W + Σ s ΔW, b') for a 2-d x that saves only x: W' is rebuilt in backward for grad x,
    the adapters' gradients come from (grad_out, x) (`ModuleAdapter.leaf_grads`), the base gets none."""

    @staticmethod
    def forward(ctx, x, plan, strengths, *leaves):
        ctx.plan, ctx.strengths = plan, strengths
        # Only x is saved: the leaves are the adapters' own tensors (plan.leaves), which nothing
        # changes between a step's forward and backward, so no copy of them is ever taken.
        ctx.save_for_backward(x)
        return plan.run(x, strengths)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        plan, strengths = ctx.plan, ctx.strengths
        leaves = plan.leaves
        grad = grad.to(x.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight, _ = plan.weights(x, strengths)
            grad_x = grad.matmul(weight)
            del weight
        wanted = ctx.needs_input_grad[3:]
        leaf_grads: list[torch.Tensor | None] = [None] * len(leaves)
        if any(wanted):
            g2, x2 = grad, x  # [tokens, out], [tokens, in]
            base = None
            for binding, strength, (first, count) in zip(plan.bindings, strengths, plan.slots, strict=True):
                if not any(wanted[first : first + count]) or strength == 0.0:
                    continue
                adapter, route = binding.adapter, binding.route
                base_rows = None
                if adapter.needs_base_weight:
                    base = base if base is not None else _base_weights(plan.module, x)[0]
                    base_rows = _rows(base, route)
                grads = adapter.leaf_grads(_rows(g2, route, dim=1), x2, strength, base_rows,
                                           list(leaves[first : first + count]))
                leaf_grads[first : first + count] = grads
        return (grad_x, None, None, *leaf_grads)


class _Rebuilt:
    """W' = W + every binding's ΔW at its strength, at its rows (b' likewise), built on request.

    The adapters' writers are prepared once; `rows(lo, hi)` then writes W'[lo:hi] (each row from
    W plus the deltas of the bindings that cover it; rows none covers are copied), `full()` all of
    it. b' (small) is built at once. Nothing is kept once the call is done.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bindings: list[ModuleBinding],
                 strengths: Sequence[float]):
        self.weight, self.bias = weight, bias
        self.writers: list[tuple[Callable, tuple[tuple[int, int, int], ...]]] = []
        own_bias = False
        for binding, strength in zip(bindings, strengths, strict=True):
            adapter, route = binding.adapter, binding.route
            if strength == 0.0 and adapter.linear_in_strength:
                continue
            base_rows = _rows(weight, route) if (adapter.needs_base_weight or not adapter.linear_in_strength) else None
            write, delta_bias = adapter.weight_writer(weight, strength, base_rows)
            self.writers.append((write, _blocks(route, adapter)))
            if delta_bias is not None:
                if not own_bias:  # a bias-free layer gets one: the delta path adds Δb to the output too
                    self.bias = delta_bias.new_zeros(weight.shape[0]) if bias is None else bias.clone()
                    own_bias = True
                for c, d, n in _blocks(route, adapter):
                    self.bias[c : c + n] += delta_bias[d : d + n]

    @property
    def changed(self) -> bool:
        return bool(self.writers)

    def rows(self, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """W'[lo:hi], into `out` (contiguous, hi - lo rows) or a new tensor."""
        weight = self.weight
        if out is None:
            out = torch.empty((hi - lo, *weight.shape[1:]), dtype=weight.dtype, device=weight.device)
        written: list[tuple[int, int]] = []
        for write, blocks in self.writers:
            for c, d, n in blocks:
                a, b = max(c, lo), min(c + n, hi)
                if a >= b:
                    continue
                for p0, p1, fresh in _pieces(a, b, written):
                    write(out[p0 - lo : p1 - lo], weight[p0:p1] if fresh else None, d + p0 - c, p1 - p0)
                written = _cover(written, a, b)
        for p0, p1, fresh in _pieces(lo, hi, written):
            if fresh:
                out[p0 - lo : p1 - lo].copy_(weight[p0:p1])
        return out

    def full(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b'), or (W, b) itself when nothing is added."""
        if not self.writers:
            return self.weight, self.bias
        return self.rows(0, self.weight.shape[0]), self.bias


def _blocks(route: Route, adapter) -> tuple[tuple[int, int, int], ...]:
    return route.blocks if route.blocks is not None else ((0, 0, adapter.layer.out_features),)


def _pieces(lo: int, hi: int, written: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """[lo, hi) cut into (start, end, not yet written) pieces against sorted disjoint `written` intervals."""
    out, pos = [], lo
    for a, b in written:
        if b <= pos or a >= hi:
            continue
        if a > pos:
            out.append((pos, a, True))
        out.append((max(a, pos), min(b, hi), False))
        pos = min(b, hi)
    if pos < hi:
        out.append((pos, hi, True))
    return out


def _cover(written: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    merged = []
    for a, b in sorted([*written, (lo, hi)]):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _rows(tensor: torch.Tensor, route: Route, dim: int = 0) -> torch.Tensor:
    """The diffusers layer's rows (or output columns, dim=1) inside a ComfyUI tensor, in diffusers order."""
    if route.blocks is None:
        return tensor
    return torch.cat([tensor.narrow(dim, c, n) for c, _, n in sorted(route.blocks, key=lambda b: b[1])], dim=dim)


# -- the delta path ---------------------------------------------------------------------------

def _add_deltas(module: torch.nn.Module, actives: list[_Active], x: torch.Tensor, output: torch.Tensor) -> None:
    channel_dim = 1 if isinstance(module, torch.nn.modules.conv._ConvNd) else -1
    for act in actives:
        if isinstance(act.strength, float) and act.binding.adapter.linear_in_strength:
            if act.strength == 0.0 or (act.drop is None and act.binding.adapter.add_output_(
                    x, output, act.binding.route.blocks, act.strength)):
                continue
        delta = _delta(act, x, module)
        if act.drop is not None:
            delta = act.drop.apply(delta, channel_dim)
        _add_rows(output, delta.to(output.dtype), act.binding.route, channel_dim)


def _base_weight(module: torch.nn.Module, route: Route, like: torch.Tensor) -> torch.Tensor:
    """The diffusers-layer weight inside the ComfyUI weight (row slice), in the input's dtype."""
    if _op_kind(module) is not None:
        weight = _base_weights(module, like)[0]
    else:
        weight = module.weight.to(device=like.device, dtype=like.dtype)
    return _rows(weight, route)


def _broadcast(strength: float | torch.Tensor, delta: torch.Tensor) -> float | torch.Tensor:
    if isinstance(strength, float):
        return strength
    shape = (delta.shape[0],) + (1,) * (delta.ndim - 1)
    return strength.to(device=delta.device, dtype=delta.dtype).view(shape)


def _delta(act: _Active, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """The adapter's output delta for this call, in diffusers row order, strength applied."""
    adapter, route = act.binding.adapter, act.binding.route
    base = _base_weight(module, route, x) if adapter.needs_base_weight else None
    mask = None if act.mask is None else act.mask.to(device=x.device, dtype=x.dtype)
    if adapter.linear_in_strength:
        if isinstance(act.strength, float) and act.strength == 0.0:
            return torch.zeros((), device=x.device, dtype=x.dtype)
        if act.drop is not None and act.drop.ranks is not None:  # LoRA's rank dropout in bypass mode
            delta = adapter.delta_output_ranks(x, act.drop.mask(act.drop.ranks, x))
        else:
            delta = adapter.delta_output(x, base_weight=base, rank_mask=mask)
        return delta * _broadcast(act.strength, delta)
    return _delta_by_weight(act, x, module, base if base is not None else _base_weight(module, route, x))


def _delta_by_weight(act: _Active, x: torch.Tensor, module: torch.nn.Module, base: torch.Tensor) -> torch.Tensor:
    """Exact route for algorithms non-linear in strength (DoRA, OFT...): x through ΔW(strength), built per call."""
    strengths = [act.strength] if isinstance(act.strength, float) else act.strength.tolist()
    outputs = {}
    for s in dict.fromkeys(strengths):
        dw, db = act.binding.adapter.delta_weight(base, float(s))
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
    """Warm an adapter module's placement cache for (device, dtype). Its own tensors are never moved or cast."""
    placed = getattr(adapter, "placed", None)
    if placed is not None:
        placed(torch.device(device), dtype)


def _add_rows(output: torch.Tensor, delta: torch.Tensor, route: Route, channel_dim: int) -> None:
    """output[rows of route] += delta (diffusers rows), in place, along the channel dimension."""
    if delta.ndim == 0:
        return
    if route.blocks is None:
        output.add_(delta)
        return
    for c, d, n in route.blocks:
        output.narrow(channel_dim, c, n).add_(delta.narrow(channel_dim, d, n))
