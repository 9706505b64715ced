"""What every adapter module shares: the layer it sits on, its saved tensors, and the entry points.

`delta_output(x)` is the cheap bypass path (output += strength * delta_output(x)), valid only for
algorithms whose effect is linear in the strength; `delta_weight(W, strength)` is the exact
ΔW (and Δbias) of LyCORIS's non-bypass *rebuild* forward at that strength, for every algorithm.

For the runtime's rebuilt-weight path (one matmul with W' = W + strength * ΔW instead of the base
matmul plus a delta product) every module also offers `weight_writer` (writes rows of W' into a
buffer), `leaf_grads` (gradients of its tensors from the layer's output gradient and input) and
cost estimates (`delta_macs`, `rebuild_macs`, `grad_macs`) from which the runtime picks a path.

The saved tensors (`params`) are the master copies: the runtime never moves or casts them. Casts
to a call's device and dtype come from a per-module placement cache keyed by (device, dtype);
tensors that require grad (trainable leaves) are cast per call instead (differentiable, and no
derived copy outlives the call's graph). `to(device, dtype)` still moves the masters on request.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
import torch.nn.functional as F

# Backend for LyCORIS's functional ops. "torch" (eager) by default: predictable inside ComfyUI's
# sampling loop (LyCORIS's own pick on CUDA may torch.compile single ops per shape). "auto" lets
# LyCORIS choose (fused triton kernels on CUDA where it has them, else torch.compile).
_BACKEND_ENV = os.environ.get("COMFYUI_LYCORIS_KERNEL_BACKEND", "torch").strip().lower()
KERNEL_BACKEND: str | None = None if _BACKEND_ENV in ("", "auto") else _BACKEND_ENV

_CONV_OPS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# The cost estimates below are in multiply-adds of a matmul. One elementwise pass over a tensor
# (read + write) costs about this many per element: measured on CPU (AVX-512, fp32) at ~17 for a
# tensor that stays in cache and ~50 for one that does not.
PASS_MACS = 32.0
# In bfloat16 the matmuls run on matrix units (AMX on this CPU, tensor cores on GPUs) while passes
# stay bound by memory: measured on this CPU, 2 threads, an add costs 125 multiply-adds of a large
# bf16 matmul per element (61 in fp32), an addcmul 284 (91), a rank-16 product 94 (21); LoHa r16 on
# 3072-wide layers at 1280 tokens: rebuilt W' 1.46-1.71x the base product, its Khatri-Rao chain
# 1.23-1.26x (fp32: 1.10-1.28x vs 1.11-1.22x). fp16 matmuls were not accelerated here (6.75 ps per
# multiply-add, as fp32): it keeps the fp32 value. GPUs: not measured.
_PASS_MACS_BY_DTYPE = {torch.bfloat16: 256.0}


def pass_cost(dtype: torch.dtype) -> float:
    """PASS_MACS for tensors of `dtype` (the cost model's price of one elementwise pass)."""
    return _PASS_MACS_BY_DTYPE.get(dtype, PASS_MACS)


class AdapterError(ValueError):
    """A module's saved tensors cannot be used on its layer; the message names the key."""


def _spatial(name: str, value, n: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * n
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) == 1 and n > 1:
        value = value * n
    if len(value) != n:
        raise AdapterError(f"LayerSpec.{name}: expected {n} values for a {n}-d conv, got {value}")
    return value


@dataclass(frozen=True)
class LayerSpec:
    """Shape facts of the diffusers layer an adapter module sits on.

    `weight_shape` is the layer's weight shape: (out_features, in_features) for 'linear',
    (out, in / groups, *kernel) for 'conv' (1-d, 2-d or 3-d).
    """

    kind: str
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...] | None = None
    padding: tuple[int, ...] | str | None = None
    dilation: tuple[int, ...] | None = None
    groups: int = 1

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.weight_shape)
        object.__setattr__(self, "weight_shape", shape)
        if self.kind not in ("linear", "conv"):
            raise AdapterError(f"LayerSpec.kind: must be 'linear' or 'conv', got {self.kind!r}")
        if self.kind == "linear" and len(shape) != 2:
            raise AdapterError(f"LayerSpec.weight_shape: a linear weight is 2-d, got {shape}")
        if self.kind == "conv" and len(shape) not in (3, 4, 5):
            raise AdapterError(f"LayerSpec.weight_shape: a conv weight is 3-d to 5-d, got {shape}")
        if self.kind == "linear":
            return
        n = len(shape) - 2
        object.__setattr__(self, "stride", _spatial("stride", self.stride, n, 1))
        if not isinstance(self.padding, str):
            object.__setattr__(self, "padding", _spatial("padding", self.padding, n, 0))
        object.__setattr__(self, "dilation", _spatial("dilation", self.dilation, n, 1))
        if int(self.groups) < 1 or shape[0] % int(self.groups):
            raise AdapterError(f"LayerSpec.groups: {self.groups} does not divide out channels {shape[0]}")
        object.__setattr__(self, "groups", int(self.groups))

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> LayerSpec:
        """The spec of a torch Linear / Conv1d-3d (ComfyUI's ops subclass these)."""
        if isinstance(module, torch.nn.Linear):
            return cls("linear", tuple(module.weight.shape))
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            if module.padding_mode != "zeros":
                raise AdapterError(f"conv padding_mode {module.padding_mode!r} is not supported (only 'zeros')")
            return cls("conv", tuple(module.weight.shape), module.stride, module.padding, module.dilation,
                       module.groups)
        raise AdapterError(f"{type(module).__name__}: only Linear and Conv1d/2d/3d layers take adapters")

    @property
    def is_conv(self) -> bool:
        return self.kind == "conv"

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """Input size of the weight (in / groups for a conv)."""
        return self.weight_shape[1]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.weight_shape[2:]

    @property
    def ones(self) -> tuple[int, ...]:
        """Trailing 1s that make a 2-d factor a 1x1 conv weight of this layer's rank."""
        return (1,) * len(self.kernel_size)

    @cached_property
    def conv_kwargs(self) -> dict:
        """stride / padding / dilation / groups for the layer's op ({} for a linear layer)."""
        if not self.is_conv:
            return {}
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups}

    @cached_property
    def op(self):
        return F.linear if not self.is_conv else _CONV_OPS[len(self.kernel_size)]

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's own op with `weight` (full layer shape), e.g. x through a ΔW."""
        return self.op(x, weight, bias, **self.conv_kwargs)

    def pointwise(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A 1x1 (channel-mixing) step: F.linear, or the layer's conv with a 1x1 kernel and no geometry."""
        return self.op(x, weight)


def grads_through(outputs: list[torch.Tensor], grads: list[torch.Tensor], leaves: list[torch.Tensor]) -> tuple:
    """Gradients of `leaves` given gradients of `outputs` built from them (None for a leaf not reached)."""
    pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if o.requires_grad]
    if not pairs:
        return (None,) * len(leaves)
    with torch.enable_grad():
        return torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)


# -- validation helpers: each raises AdapterError naming `lora_name.key` --

def fail(lora_name: str, key: str, message: str) -> None:
    raise AdapterError(f"{lora_name}.{key}: {message}")


def require(lora_name: str, params: dict[str, torch.Tensor], key: str, why: str = "") -> torch.Tensor:
    if key not in params:
        fail(lora_name, key, f"missing{f' ({why})' if why else ''}; keys present: {sorted(params)}")
    return params[key]


def expect_shape(lora_name: str, key: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    got = tuple(tensor.shape)
    if got != tuple(expected):
        fail(lora_name, key, f"expected shape {tuple(expected)}, got {got}")


def check_finite(lora_name: str, params: dict[str, torch.Tensor]) -> None:
    for key, tensor in params.items():
        if not isinstance(tensor, torch.Tensor):
            fail(lora_name, key, f"expected a tensor, got {type(tensor).__name__}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            fail(lora_name, key, "contains NaN or infinite values")


def scalar_value(lora_name: str, key: str, tensor: torch.Tensor) -> float:
    if tensor.numel() != 1:
        fail(lora_name, key, f"expected a single number, got shape {tuple(tensor.shape)}")
    value = float(tensor.detach().float().cpu().item())
    if not math.isfinite(value):
        fail(lora_name, key, f"must be finite, got {value}")
    return value


def alpha_scale(lora_name: str, params: dict[str, torch.Tensor], dim: int, warnings: list[str]) -> float:
    """alpha / dim as LyCORIS computes it (alpha 0 means alpha = dim); a missing alpha means scale 1."""
    if "alpha" not in params:
        warnings.append(f"{lora_name}: no alpha saved; using alpha = rank ({dim}), i.e. scale 1")
        return 1.0
    alpha = scalar_value(lora_name, "alpha", params["alpha"])
    return (alpha if alpha != 0 else dim) / dim


class ModuleAdapter:
    """One adapter module's math on one layer; one subclass per LyCORIS algorithm.

    Subclasses set `algo`, `KEYS` (every key LyCORIS may save for it) and implement
    `_delta_weight` (and `_delta_output` when the effect is linear in the strength).
    """

    algo: ClassVar[str] = ""
    KEYS: ClassVar[tuple[str, ...]] = ()
    _KEEP_DTYPE: ClassVar[frozenset[str]] = frozenset({"alpha", "on_input"})
    # The factors LyCORIS multiplies by the module's `scalar` (use_scalar) when it saves them
    # (`custom_state_dict`). A trainable module holds them unscaled plus a `scalar` tensor, and every
    # read through `_p` / `_p32` gives factor * scalar, so its math is LyCORIS's training forward.
    SCALED_KEYS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, lora_name: str, layer: LayerSpec, params: dict[str, torch.Tensor]):
        self.lora_name = lora_name
        self.layer = layer
        self.params: dict[str, torch.Tensor] = dict(params)
        self.warnings: list[str] = []
        self.linear_in_strength = True
        self.needs_base_weight = False
        self._placements: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}
        ignored = sorted(set(params) - set(self.KEYS))
        if ignored:
            self.warnings.append(f"{lora_name}: ignored keys {ignored} (LyCORIS does not read them for {self.algo})")
            for key in ignored:
                self.params.pop(key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.lora_name!r}, {self.layer.kind} {self.layer.weight_shape})"

    # -- public API --

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The module's tensors under LyCORIS's names (what a file stores), alpha included."""
        return dict(self.params)

    def add_output_(self, x: torch.Tensor, output: torch.Tensor, blocks, strength: float) -> bool:
        """Optional fast path: add strength * delta(x) into `output` in place, at the route's rows.

        `blocks` is the route's row blocks (None: all rows in order). Returns False when this
        module has no fast path for the call (the runtime then uses `delta_output`).
        """
        return False

    def to(self, device=None, dtype: torch.dtype | None = None) -> ModuleAdapter:
        """Move (and cast floating) the master tensors; alpha and on_input keep their dtype. Returns self.

        The runtime never calls this (it reads placed copies, see `placed`); without arguments it
        only drops every derived copy and cache (call it after changing the tensors in place).
        """
        for key, tensor in self.params.items():
            cast = dtype if (tensor.is_floating_point() and key not in self._KEEP_DTYPE) else None
            self.params[key] = tensor.to(device=device, dtype=cast)
        self._placements = {}
        self._moved()
        return self

    def placed(self, device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors on `device`, floating ones (but alpha / on_input) in `dtype`: derived copies, cached.

        A tensor already there is returned as is (no copy). Tensors that require grad are not
        cached: they are cast on every call by `_p`, and appear here as their masters.
        """
        key = (torch.device(device), dtype)
        placed = self._placements.get(key)
        if placed is None:
            placed = {}
            for name, tensor in self.params.items():
                if tensor.requires_grad:
                    placed[name] = tensor
                    continue
                cast = dtype if (tensor.is_floating_point() and name not in self._KEEP_DTYPE) else None
                placed[name] = tensor.detach().to(device=key[0], dtype=cast)
            self._placements[key] = placed
        return placed

    def release_placements(self) -> None:
        """Drop the cached placed copies (the masters are kept)."""
        self._placements = {}
        self._moved()

    # -- the rebuilt-weight path (see core.runtime) --

    def delta_macs(self, tokens: int, pass_macs: float = PASS_MACS) -> float:
        """Multiply-adds of `delta_output` for `tokens` input rows (default: one full-size product);
        `pass_macs`: what an elementwise pass over one element costs (`pass_cost`)."""
        return float(tokens) * self._weight_numel()

    def rebuild_macs(self) -> float:
        """Multiply-adds to build ΔW once, beyond the weight-sized passes (`rebuild_passes`)."""
        return 0.0

    def rebuild_passes(self) -> float:
        """Weight-sized elementwise passes of `weight_writer` (the generic float32 route takes several;
        the runtime charges `pass_cost(dtype)` per element and pass)."""
        return 4.0

    def rebuild_blocks(self) -> int:
        """Scratch blocks, each as large as the window of W' it writes, that `weight_writer` takes:
        the runtime shrinks its windows so that all fit its budget (`scratch.window_rows`)."""
        return 0

    def grad_macs(self, tokens: int) -> float:
        """Multiply-adds of `leaf_grads` for `tokens` rows (default: grad_W' = g^T x, one full-size product)."""
        return float(tokens) * self._weight_numel()

    @property
    def can_rebuild(self) -> bool:
        """Whether the runtime may fold this module into the layer's weight (T-LoRA's per-sample masks cannot)."""
        return True

    def weight_writer(self, like: torch.Tensor, strength: float, base_weight: torch.Tensor | None = None):
        """(write, Δbias or None) for W' = W + ΔW(strength), in like's dtype and device, without autograd.

        `write(dst, src, d, n)` sets dst = src + ΔW[d : d + n] (diffusers rows d..d+n of the layer):
        dst is a contiguous row block of the rebuilt weight, src the base's same rows, or None to
        add in place (dst += ΔW rows).
        `base_weight` (the layer's rows of the base, in like's dtype) is needed when
        `needs_base_weight` or when the module is not linear in the strength. This generic version
        builds the exact ΔW once with `delta_weight`.
        """
        base = base_weight if base_weight is not None else like.new_zeros(()).expand(self.layer.weight_shape)
        dw, db = self.delta_weight(base, strength)
        dw = dw.to(device=like.device, dtype=like.dtype)

        def write(dst, src, d, n):
            rows = dw[d : d + n].reshape(dst.shape)
            if src is None:
                dst.add_(rows)
            else:
                torch.add(src, rows, out=dst)

        return write, (None if db is None else db.to(device=like.device, dtype=like.dtype))

    def leaf_grads(self, grad_out: torch.Tensor, x: torch.Tensor, strength: float,
                   base_weight: torch.Tensor | None, leaves: list[torch.Tensor]) -> tuple:
        """Gradients of `leaves` (tensors of `params`) for a linear layer run with W + strength * ΔW.

        `grad_out` [tokens, out] is the gradient of the layer's output at this module's rows
        (diffusers order), `x` [tokens, in] its input. Default: grad_W' = grad_out^T x, mapped onto
        the leaves by autograd through ΔW's own construction (cheap next to the product).
        """
        grad_w = grad_out.t().matmul(x)
        if strength != 1.0:
            grad_w.mul_(strength)
        with torch.enable_grad():
            w32 = (base_weight.detach().float() if base_weight is not None
                   else grad_w.new_zeros((), dtype=torch.float32).expand(self.layer.weight_shape))
            dw, db = self._delta_weight(w32, 1.0, None)
        outputs, grads = [dw], [grad_w.reshape(dw.shape).to(dw.dtype)]
        if db is not None:
            outputs.append(db)
            grads.append((grad_out.sum(0) * strength).to(db.dtype))
        return grads_through(outputs, grads, leaves)

    def _weight_numel(self) -> int:
        return math.prod(self.layer.weight_shape)

    def delta_output(self, x: torch.Tensor, base_weight: torch.Tensor | None = None,
                     rank_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Output delta at strength 1 (no base output, no bias of the layer), in x's dtype.

        Only for `linear_in_strength` modules: the layer at strength s gives base + s * this.
        `rank_mask` ([B, rank] or [1, rank]) is T-LoRA's; other algorithms ignore it.
        """
        if not self.linear_in_strength:
            raise RuntimeError(f"{self.lora_name}: {self.algo} is not linear in the strength; use delta_weight")
        if self.needs_base_weight and base_weight is None:
            raise ValueError(f"{self.lora_name}: {self.algo} needs the layer's base weight")
        return self._delta_output(x, base_weight, rank_mask)

    def delta_weight(self, base_weight: torch.Tensor, strength: float,
                     rank_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ΔW, Δbias or None) with layer(W + ΔW, b + Δb) == LyCORIS's rebuild forward at `strength`.

        Computed in float32 on base_weight's device; returned in base_weight's dtype.
        """
        if tuple(base_weight.shape) != self.layer.weight_shape:
            raise ValueError(f"{self.lora_name}: base weight shape {tuple(base_weight.shape)} is not the "
                             f"layer's {self.layer.weight_shape}")
        w32 = base_weight.detach().to(torch.float32)
        dw, db = self._delta_weight(w32, float(strength), rank_mask)
        dtype = base_weight.dtype
        return dw.to(dtype), (None if db is None else db.to(device=base_weight.device, dtype=dtype))

    # -- for subclasses --

    def _moved(self) -> None:
        """Hook: drop caches derived from the params after `to`."""

    def _p(self, key: str, like: torch.Tensor) -> torch.Tensor | None:
        """Param `key` on like's device and dtype (from the placement cache), or None.

        A tensor that requires grad is cast here, on every call: differentiable, nothing kept.
        """
        tensor = self.params.get(key)
        if tensor is None:
            return None
        if tensor.requires_grad:
            cast = like.dtype if (tensor.is_floating_point() and key not in self._KEEP_DTYPE) else None
            return self._scaled(key, tensor.to(device=like.device, dtype=cast))
        return self._scaled(key, self.placed(like.device, like.dtype)[key])

    def _p32(self, key: str, like: torch.Tensor) -> torch.Tensor | None:
        """Param `key` as float32 on like's device, or None."""
        tensor = self.params.get(key)
        if tensor is None:
            return None
        if tensor.requires_grad:
            return self._scaled(key, tensor.to(device=like.device, dtype=torch.float32))
        placed = self.placed(like.device, torch.float32)[key]
        return self._scaled(key, placed if placed.dtype == torch.float32 else placed.float())

    def _scaled(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """`value` (param `key`, placed) times the module's `scalar` when it has one and `key` is scaled by it."""
        scalar = self.params.get("scalar")
        if scalar is None or key not in self.SCALED_KEYS:
            return value
        return value * scalar.to(device=value.device, dtype=value.dtype)

    def _delta_output(self, x, base_weight, rank_mask) -> torch.Tensor:
        raise NotImplementedError

    def _delta_weight(self, w32: torch.Tensor, strength: float, rank_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError
