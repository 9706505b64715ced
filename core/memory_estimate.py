"""What training will need: the peak memory of one training step, as a sum of named terms.

ComfyUI-free: computed from the model's `unet_config`, the adapter `Plan`, the dtypes, the image
size, the batch, the checkpointing flag and the optimizer name. Nothing is allocated (parameter
counts come from the diffusers skeleton on the `meta` device), so the figure for a 32 B-parameter
Flux 2 costs what the one for a tiny test model costs. The diffusion model only: text encoders
and VAE are used once, before the steps (the trainer caches latents and conditioning).

Sizes. `width` x `height` are pixels of the training image. Image tokens: Flux 2 (H/16)(W/16)
(its 128-channel latent is /16), Flux 1 (H/16)(W/16) (2x2 patches of the /8 latent): 4096 at
1024². SDXL: (H/8)(W/8) latent cells on its first level, a quarter per level below. Text tokens:
Flux 2 512 (ComfyUI left-pads to 512), Flux 1 256 (T5's minimum; longer prompts more), SDXL 77.

    peak = max(weights + adapter + optimizer state + activations at their highest moment,
               weights + adapter + optimizer state + gradients + the optimizer step's temporary)

- weights: every parameter of the diffusion model x bytes of its stored dtype.
- adapter: trainable parameters of the Plan x bytes of the training dtype; gradients the same.
- optimizer state: adamw 2 x adapter (torch keeps exp_avg and exp_avg_sq in the parameter's
  dtype; its step needs one more adapter-sized temporary), adamw8bit 2 bytes per parameter (+ a
  float32 absmax per 256), adafactor the factored second moment (rows + columns), prodigy 4 x.

Activations follow the trainer (`trainer.checkpointing`, `core.runtime`). A *unit* is a top-level
block: each Flux double / single block, each SDXL input / middle / output block (the trainer
checkpoints the layers of an SDXL block, whose extra input copies are the block's own
intermediates and stay within the tolerance below). Per unit a
ledger lists what autograd saves for backward, read off ComfyUI's block code, each save at the
size the trainer's copy of it costs (a view costs its view; module parameters and views of them,
such as a Linear's transposed weight, are not copied),
for e compute bytes, B batch, n tokens of a stream, N = image + text tokens, H hidden, M MLP
width, h heads:

- Flux double block, per stream: hidden n·H (LayerNorm 1 and 2 input: one storage updated in
  place, saved twice), fused qkv output (q and k views for the QK RMSNorm, four saves of n·H),
  MLP hidden (Flux 2: gate/up 2 x n·M views + SiLU output n·M; Flux 1: GELU input n·M); joint:
  rotated q and k, v (3N·H), rotary views (4 x N·d, float32), attention state (below).
- Flux single block: hidden N·H, linear1 output (four n·H views), q, k, v, attention state, the
  activation (Flux 2: SiLU output N·M + two N·M views; Flux 1: one N·M view).
- SDXL: ResBlock 3·C_in·T + 3·C_out·T (GroupNorm, SiLU and conv inputs); transformer block three
  LayerNorm inputs, self-attention q, k, v (3T·C), cross-attention q (T·C) and k, v (2L·C), GEGLU
  (two 4T·C views of the 8T·C projection, GELU output 4T·C); down/upsampling conv inputs.
- attention state: fused kernels (PyTorch SDPA: flash / memory-efficient; xformers, sage: what
  ComfyUI uses on CUDA) its output N·H and log-sum-exp h·N (float32); ComfyUI's sub-quadratic,
  split and basic attention (its CPU default) the probabilities h·N², saved twice (softmax, bmm).
- adapters, per adapted layer, as `core.runtime` picks the path for these tokens: rebuilt weight
  (LoKr, LoHa, full, ... when it pays): the layer's input and the adapter's own tensors; delta
  path: the input (once per distinct input) + the product's intermediate (LoKr tokens·c·b for w1
  (a, c), w2 (b, d); LoRA tokens·rank) and the factors cast to the compute dtype.
- units upstream of the first adapted layer save nothing without checkpointing.

Besides its saves, each unit has a working set: its output and the output's gradient (2 x its
outputs) plus the highest moment of its forward (e.g. Flux's linear1 output and the activation
while both live; attention's scores and probabilities) or of its backward (the saves still held
when an op's backward runs + its gradients: input and output gradients of a layer, the rebuilt
weight W' or the LoKr factored gradients 2·t·c·b; attention's q, k, v, output gradients and, for
non-fused attention, the probabilities' gradient h·N²).

With checkpointing (default), the forward keeps a private copy of each unit's tensor inputs (the
inputs shared by all units, Flux's rotary table and modulation vectors, SDXL's time embedding and
text, once per step); backward recomputes one unit at a time, copying what it saves:

    checkpointed(u) = copies of units 1..u + shared inputs + unit u's saves + its working set
                      + adapter gradients of units u..last (+ SDXL: skip-connection gradients
                      waiting for the encoder, and the encoder outputs the decoder still needs)

Without checkpointing every saved tensor is copied when saved (in-place updates cannot reach
it) and everything stays until backward reaches it:

    uncheckpointed(u) = saves of units 1..u-1 + unit u's saves + its working set + gradients

The activation peak is the largest of these over u and the end of the forward (all copies /
saves + the head: final layer and loss). Calibrated on the tiny Flux 2, Flux 1 and SDXL models
and the bench's 33 M Flux 2 (CPU, float32): within 8% of the trainer's measured step
(tests/unit/test_memory_estimate.py, bench/memory_estimate.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .families import profile_for
from .lycoris_modules import adapter_param_shapes
from .targets import Plan, PlannedTarget, skeleton_for

GIB = 2**30

DTYPE_BYTES = {
    "float64": 8, "fp64": 8,
    "float32": 4, "fp32": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8": 1, "fp8_e4m3fn": 1, "fp8_e5m2": 1,
}
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")
ATTENTION = ("sdpa", "sub_quad")
# ComfyUI attention function names -> what they save for backward.
ATTENTION_OF_COMFY = {"attention_pytorch": "sdpa", "attention_flash": "sdpa", "attention_xformers": "sdpa",
                      "attention_sage": "sdpa", "attention_sub_quad": "sub_quad", "attention_split": "sub_quad",
                      "attention_basic": "sub_quad"}
DEFAULT_TEXT_TOKENS = {"flux2": 512, "flux1": 256, "sdxl": 77}
PIXELS_PER_LATENT = {"flux2": 16, "flux1": 8, "sdxl": 8}
STATS = 4  # LayerNorm / GroupNorm / RMSNorm statistics are float32 (accumulation dtype)


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element of a dtype given as a torch dtype or a name ('bf16', 'float32', 'fp8'...)."""
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype, device="meta").element_size()
    name = str(dtype).removeprefix("torch.").lower()
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype: unknown '{dtype}' (one of {', '.join(sorted(DTYPE_BYTES))})")
    return DTYPE_BYTES[name]


def pixels_for_latent(unet_config: dict, latent_height: int, latent_width: int) -> tuple[int, int]:
    """(width, height) in pixels of a LATENT of latent_height x latent_width cells for this model."""
    scale = PIXELS_PER_LATENT[profile_for(unet_config).name]
    return latent_width * scale, latent_height * scale


def attention_kind(comfy_function_name: str) -> str:
    """'sdpa' or 'sub_quad' for ComfyUI's `optimized_attention.__name__` (unknown names: 'sdpa')."""
    return ATTENTION_OF_COMFY.get(comfy_function_name, "sdpa")


@dataclass(frozen=True)
class Term:
    """One named contribution to the peak, in bytes."""

    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimate: `peak_bytes`, the named terms at the peak (`terms()`), and `summary()` text."""

    family: str
    width: int  # pixels
    height: int
    batch: int
    checkpointing: bool
    attention: str
    image_tokens: int
    text_tokens: int
    resident: tuple[Term, ...]  # weights, adapter, optimizer state (alive for the whole job)
    activations: tuple[Term, ...]  # the activation terms at the peak moment
    peak_phase: str  # where the peak falls (e.g. "backward of single_blocks.47")
    optimizer_step: int  # bytes at the optimizer step (weights + adapter + grads + state + temporaries)
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def resident_bytes(self) -> int:
        return sum(t.bytes for t in self.resident)

    @property
    def activation_bytes(self) -> int:
        return sum(t.bytes for t in self.activations)

    @property
    def peak_bytes(self) -> int:
        return max(self.resident_bytes + self.activation_bytes, self.optimizer_step)

    def fits(self, device_bytes: int, reserve: float = 0.9) -> bool:
        """Whether the peak fits in `reserve` of a device's memory (the rest: CUDA context, allocator slack)."""
        return self.peak_bytes <= reserve * device_bytes

    def terms(self) -> list[Term]:
        return [*self.resident, *self.activations]

    def summary(self) -> str:
        """Multi-line text for a node: the peak, then every term."""
        mode = "gradient checkpointing on" if self.checkpointing else "gradient checkpointing off"
        lines = [f"Estimated training peak: {_gib(self.peak_bytes)} ({self.width}x{self.height} px, batch "
                 f"{self.batch}, {mode}; {self.image_tokens} image + {self.text_tokens} text tokens)"]
        for term in self.terms():
            if term.bytes:
                lines.append(f"  {term.name}: {_gib(term.bytes)}" + (f" ({term.note})" if term.note else ""))
        lines.append(f"  peak at: {self.peak_phase}")
        if self.optimizer_step > self.resident_bytes + self.activation_bytes:
            lines.append(f"  the optimizer step is the peak: {_gib(self.optimizer_step)}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "family": self.family, "width": self.width, "height": self.height,
                "batch": self.batch, "checkpointing": self.checkpointing, "attention": self.attention,
                "image_tokens": self.image_tokens, "text_tokens": self.text_tokens, "peak_phase": self.peak_phase,
                "optimizer_step_bytes": self.optimizer_step, **dict(self.settings),
                "terms": {t.name: t.bytes for t in self.terms()}}


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# -- parameters ---------------------------------------------------------------------------------

def model_parameter_count(unet_config: dict) -> int:
    """Parameters of the diffusion model (exact: the diffusers skeleton of the same architecture, on meta)."""
    return sum(p.numel() for p in skeleton_for(unet_config).parameters())


def _adapter_shapes(target: PlannedTarget) -> dict[str, tuple[int, ...]]:
    return adapter_param_shapes(target)


_FROZEN = ("alpha", "on_input", "base_q", "base_p", "base_lambda")


def _trainable_shapes(plan: Plan) -> list[tuple[int, ...]]:
    return [shape for t in plan.targets for key, shape in _adapter_shapes(t).items() if key not in _FROZEN]


def optimizer_state_bytes(optimizer: str, shapes: Sequence[tuple[int, ...]], train_bytes: int) -> int:
    """Bytes of optimizer state for trainable tensors of `shapes` held in a dtype of `train_bytes`."""
    numel = sum(math.prod(s) for s in shapes)
    if optimizer == "adamw":
        return 2 * numel * train_bytes
    if optimizer == "adamw8bit":
        # bitsandbytes: two 8-bit states with a float32 absmax per 256-element block; tensors under
        # 4096 elements keep 32-bit states.
        small = sum(math.prod(s) for s in shapes if math.prod(s) < 4096)
        big = numel - small
        return 2 * big + 2 * 4 * math.ceil(big / 256) + 2 * 4 * small
    if optimizer == "adafactor":
        # transformers' Adafactor without momentum: factored second moment (rows + columns) for
        # matrices, a full one for vectors, in the parameter's dtype.
        total = 0
        for s in shapes:
            total += (math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1]) if len(s) >= 2 else math.prod(s)
        return total * train_bytes
    if optimizer == "prodigy":
        return 4 * numel * train_bytes  # exp_avg, exp_avg_sq, s, p0
    raise ValueError(f"optimizer: unknown '{optimizer}' (one of {', '.join(OPTIMIZERS)})")


# -- per-adapter saved tensors ------------------------------------------------------------------

_DELTA_ALGOS = ("lokr", "lora", "locon", "tlora", "dylora")


@dataclass
class _AdapterCost:
    """One adapter module bound to a ComfyUI module: its sizes and how the runtime runs it."""

    target: PlannedTarget
    shapes: Mapping[str, tuple[int, ...]]
    params: int  # trainable elements
    runtime_adapter: Any = None  # a core.adapters module on meta, for the runtime's path rule

    def intermediate_per_token(self) -> int:
        """Elements per token the delta (bypass) product saves beyond its input (see the module docstring)."""
        s = self.shapes
        if self.target.algo == "lokr":
            c = s["lokr_w1"][1] if "lokr_w1" in s else s["lokr_w1_b"][1]
            b = s["lokr_w2"][0] if "lokr_w2" in s else s["lokr_w2_a"][0]
            return c * b + (0 if "lokr_w2" in s else c * s["lokr_w2_b"][0])
        if self.target.algo in _DELTA_ALGOS:
            return int(self.target.dim)
        return 0

    def delta_weight_elements(self) -> int:
        """Algorithms whose delta goes through ΔW (LoHa, full, OFT, ...): weight-sized saved tensors."""
        if self.target.algo in _DELTA_ALGOS:
            return 0
        numel = math.prod(self.target.weight_shape)
        return 3 * numel if self.target.algo == "loha" else numel

    def grad_temporaries_per_token(self) -> int:
        """Elements per token of the rebuilt path's gradient products.

        LoKr's factored gradients: h = w1ᵀ·g and u = x·w2ᵀ (t·c·b each), plus the layer's output
        gradient cut to this adapter's rows when it sits on a slice of a fused layer. Others: none
        per token (their gradient is one weight-sized product, `grad_weight_bytes`).
        """
        if self.target.algo == "lokr" and self.factored_grads():
            s = self.shapes
            c = s["lokr_w1"][1] if "lokr_w1" in s else s["lokr_w1_b"][1]
            b = s["lokr_w2"][0] if "lokr_w2" in s else s["lokr_w2_a"][0]
            return 2 * c * b + (self.target.weight_shape[0] if self.target.route.blocks else 0)
        return 0

    def factored_grads(self) -> bool:
        """Whether the LoKr module takes its gradients from (grad_out, x) in factored form (its own rule)."""
        adapter = self.runtime_adapter
        try:
            return bool(adapter._factored_grads())
        except AttributeError:
            return False

    def grad_weight_bytes(self, e: int) -> int:
        """The generic rebuilt-path gradient: grad W' = gᵀx and its scaled copy (compute dtype), ΔW and its
        gradient through the adapter's construction (float32)."""
        if self.target.algo == "lokr" and self.factored_grads():
            return 0
        return math.prod(self.target.weight_shape) * (2 * e + 2 * STATS)

    def rebuilt(self, tokens: int) -> bool:
        """Whether the runtime folds this adapter into a rebuilt weight while training at `tokens` rows."""
        if self.runtime_adapter is None:
            return False
        try:
            from . import runtime

            adapter = self.runtime_adapter
            if not adapter.linear_in_strength:
                return False
            if not adapter.can_rebuild or self.target.layer != "Linear":
                return False
            return bool(runtime._rebuild_pays(adapter, tokens, True))
        except (AttributeError, ImportError, TypeError, ValueError):
            return False  # a runtime without the rebuilt-weight path


def _runtime_adapter(target: PlannedTarget, shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """The runtime's adapter object for `target`, with weightless (meta) tensors: only its cost rules are used."""
    try:
        from .adapters import LayerSpec
        from .adapters.parse import _DETECT, detect_algo

        if target.layer != "Linear":
            return None
        params = {k: torch.empty(v, device="meta").requires_grad_(k not in _FROZEN) for k, v in shapes.items()}
        params["alpha"] = torch.tensor(float(target.alpha))
        algo = detect_algo(params)
        cls = next(c for name, _, c in _DETECT if name == algo)
        return cls(target.lora_name, LayerSpec("linear", tuple(target.weight_shape)), params) if cls else None
    except Exception:  # noqa: BLE001 - any failure means: assume the delta path
        return None


def _adapter_costs(plan: Plan) -> dict[str, list[_AdapterCost]]:
    """ComfyUI module path -> the adapters bound to it."""
    costs: dict[str, list[_AdapterCost]] = {}
    for target in plan.targets:
        shapes = _adapter_shapes(target)
        params = sum(math.prod(v) for k, v in shapes.items() if k not in _FROZEN)
        cost = _AdapterCost(target, shapes, params, _runtime_adapter(target, shapes))
        costs.setdefault(target.route.comfy_module, []).append(cost)
    return costs


# -- the unit ledger ----------------------------------------------------------------------------

@dataclass
class _Ledger:
    """Saved-for-backward tensors of one unit: distinct storages (recompute) and per-save copies (snapshot)."""

    unique: float = 0.0  # bytes of distinct storages
    per_save: float = 0.0  # bytes if every save is copied (views at their own size)
    weights: float = 0.0  # bytes of frozen weights saved (in the compute dtype), per save
    params: float = 0.0  # trainable adapter elements of the unit
    backward_peak: float = 0.0  # the largest (still saved + one backward step's gradients) during backward
    forward_peak: float = 0.0  # the largest (saved so far + live working tensors) during the forward

    def backward_step(self, nbytes: float) -> None:
        """An op's backward: what the ops up to it saved is still held (later ops' saves are freed by then)."""
        self.backward_peak = max(self.backward_peak, self.per_save + self.weights + nbytes)

    def forward_point(self, live: float) -> None:
        """A moment of the forward: copies saved so far plus `live` bytes of working tensors."""
        self.forward_peak = max(self.forward_peak, self.per_save + self.weights + live)

    def add(self, storage: float, saves: Iterable[float] = ()) -> None:
        """A saved storage of `storage` bytes, saved as views of the given sizes (default: once, whole)."""
        saves = list(saves) or [storage]
        self.unique += storage
        self.per_save += sum(saves)

    def again(self, *saves: float) -> None:
        """More saves of a storage already counted (per-save only)."""
        self.per_save += sum(saves)


@dataclass
class _Unit:
    name: str
    inputs: float  # bytes of its tensor inputs (the private copy), shared ones excluded
    outputs: float  # bytes of its outputs
    ledger: _Ledger
    ledger_no_grad_inputs: _Ledger  # the same unit when its inputs need no gradient
    pending: float = 0.0  # SDXL: gradients of skip connections produced earlier in backward, not yet consumed
    alive_after: float = 0.0  # SDXL: encoder outputs kept for the decoder's skip connections after this unit


@dataclass
class _Sizes:
    B: int
    e: int  # compute dtype bytes
    train_bytes: int
    attention: str
    cast_weights: bool  # stored dtype != compute dtype


def _attention(led: _Ledger, z: _Sizes, heads: int, nq: int, nk: int, dim: int, v_new: bool, dim_k: int | None = None,
               rope: int = 0, live: float = 0.0):
    """Saves of one attention call: q (nq·dim) and k (nk·dim) copies, v, and the kernel's own state."""
    B, e = z.B, z.e
    dim_k = dim if dim_k is None else dim_k
    led.add(B * nq * dim * e)  # q (rotated / reshaped copy)
    led.add(B * nk * dim_k * e)  # k
    if v_new:
        led.add(B * nk * dim_k * e)
    else:
        led.again(B * nk * dim_k * e)
    if rope:
        led.again(*[B * nq * rope * STATS] * 4)  # rotary table views (float32), two per q and k
    qk_live = live + B * (nq * dim + nk * dim_k) * e  # q and k themselves (and the caller's), while it runs
    if z.attention == "sub_quad":
        probs = B * heads * nq * nk * e
        led.forward_point(qk_live + probs)  # the softmax's output (its saved copies are counted)
        led.add(probs, [probs, probs])  # softmax output, also the bmm's input
        # backward: the bmm's copy of the probabilities is released once their gradient exists; the
        # softmax then turns it into the scores' gradient (two more h·N²); q, k, v gradients follow
        led.backward_step(probs + 2 * B * nq * dim * e + 2 * B * nk * dim_k * e)
    else:
        led.add(B * nq * dim * e)  # the kernel's output
        led.add(B * heads * nq * STATS)  # log-sum-exp
        led.forward_point(qk_live + B * nq * dim * e)
        led.backward_step(2 * B * nq * dim * e + 2 * B * nk * dim_k * e)  # gradients of output, q, k, v


def _adapters_on(led: _Ledger, z: _Sizes, costs: Mapping[str, list[_AdapterCost]], module: str, tokens: int,
                 input_bytes: float, input_saved: bool, view_bytes: float | None = None,
                 input_needs_grad: bool = True, weight_elements: int = 0) -> bool:
    """Add the adapters bound to `module` (input of `input_bytes`, already saved or not). Returns saved-ness.

    Delta path: each adapter saves the input and its intermediate product (w2 cast to the compute
    dtype when the input needs a gradient). Rebuilt-weight path: the layer saves its input and the
    adapters' own tensors; backward rebuilds W' (the module's whole weight) and forms the factored
    gradients, both transient.
    """
    bound = costs.get(module, [])
    rows = z.B * tokens
    rebuilt = [c for c in bound if c.rebuilt(rows)]
    if not rebuilt:
        _weight(led, z, weight_elements, input_needs_grad)  # the base op saves its weight
    if not bound:
        return input_saved
    view = input_bytes if view_bytes is None else view_bytes
    delta = [c for c in bound if c not in rebuilt]
    groups = ([rebuilt] if rebuilt else []) + [[c] for c in delta]
    for group in groups:
        if not input_saved:
            led.add(input_bytes, [view])
            input_saved = True
        else:
            led.again(view)
        for cost in group:
            led.params += cost.params
        out_rows = sum(c.target.weight_shape[0] for c in group)
        grads = rows * (math.prod(group[0].target.weight_shape[1:]) + out_rows) * z.e  # grad of input and output
        if group is rebuilt:
            led.again(*[cost.params * z.train_bytes for cost in group])  # the leaves, copied when saved
            rebuilt_weight = weight_elements * z.e * (2 if z.cast_weights else 1)  # W' (and the base's cast)
            temp = max(rebuilt_weight, max(rows * c.grad_temporaries_per_token() * z.e
                                                  + c.grad_weight_bytes(z.e) for c in group))
            led.backward_step(grads + temp)
            continue
        cost = group[0]
        led.again(cost.params * z.e)  # its factors (cast to the compute dtype), copied when saved
        led.add(rows * cost.intermediate_per_token() * z.e)
        led.backward_step(grads + 2 * rows * cost.intermediate_per_token() * z.e)
        led.add(cost.delta_weight_elements() * z.e)
    return input_saved


# The trainer copies every tensor autograd saves except module parameters and views of them (a
# Linear saves its weight as a transposed view): True would count those views as copies.
LINEAR_WEIGHT_VIEWS_COPIED = False


def _weight(led: _Ledger, z: _Sizes, elements: int, input_needs_grad: bool = True, conv: bool = False) -> None:
    """A frozen Linear/conv weight its op saves for the input gradient, as the trainer's copy costs it.

    Copied (compute dtype) when it is a cast of the stored weight (fp8 weights, bf16 compute) and
    for Linear layers (see LINEAR_WEIGHT_VIEWS_COPIED); a conv's own Parameter costs nothing.
    """
    if input_needs_grad and (z.cast_weights or (LINEAR_WEIGHT_VIEWS_COPIED and not conv)):
        led.weights += elements * z.e


# -- Flux (both generations) ---------------------------------------------------------------------

@dataclass(frozen=True)
class _FluxShape:
    H: int
    heads: int
    M: int  # MLP hidden
    M1: int  # MLP first projection width (2M gated, M plain)
    gated: bool
    depth: int
    single: int
    n_img: int
    n_txt: int
    mod_grad: bool  # modulation / embedders adapted: the modulation tensors need gradients

    @property
    def N(self) -> int:
        return self.n_img + self.n_txt


def _flux_double(z: _Sizes, f: _FluxShape, costs, prefix: str, inputs_grad: bool) -> _Ledger:
    B, e, H = z.B, z.e, f.H
    led = _Ledger()
    attn_out_saved = False
    attn_out = B * f.N * H * e
    for stream, n in (("img", f.n_img), ("txt", f.n_txt)):
        x = B * n * H * e
        # hidden state: LayerNorm 1 input (if it needs grad) and LayerNorm 2 input, one storage (in place)
        led.add(x, [x, x] if inputs_grad else [x])
        led.add(B * n * STATS * (4 if inputs_grad else 2))
        if f.mod_grad:
            led.add(x)  # normalised input, saved by addcmul for the scale's gradient
        _adapters_on(led, z, costs, f"{prefix}.{stream}_attn.qkv", n, x, False, input_needs_grad=inputs_grad,
                     weight_elements=3 * H * H)
        # QK RMSNorm: the fused qkv output (q, k views, twice each) and two rstd
        led.add(3 * x, [x] * 4)
        led.add(2 * B * n * f.heads * STATS, [B * n * f.heads * STATS] * 4)
        # proj: adapters read the attention output (one storage for both streams)
        if not costs.get(f"{prefix}.{stream}_attn.proj"):
            _weight(led, z, H * H)
        else:
            if not attn_out_saved:
                led.add(attn_out, [])
                led.per_save -= attn_out
                attn_out_saved = True
            _adapters_on(led, z, costs, f"{prefix}.{stream}_attn.proj", n, 0, True, view_bytes=x, weight_elements=H * H)
        if f.mod_grad:
            led.add(x)  # proj output, saved by the gate multiply
            led.add(x)  # normalised input of the MLP
        # MLP
        _adapters_on(led, z, costs, f"{prefix}.{stream}_mlp.0", n, x, False, weight_elements=H * f.M1)
        hidden = B * n * f.M * e
        if f.gated:
            led.add(2 * hidden, [hidden, hidden])  # gate / up halves (SiLU input, multiply operand)
            led.add(hidden)  # SiLU output
            led.forward_point(attn_out + 4 * hidden)  # attention output, MLP input, SiLU output, product
        else:
            led.add(hidden)  # GELU input
            led.forward_point(attn_out + 2 * hidden)
        _adapters_on(led, z, costs, f"{prefix}.{stream}_mlp.2", n, hidden, False, weight_elements=f.M * H)
        if f.mod_grad:
            led.add(x)  # MLP output, saved by the gate multiply
    _attention(led, z, f.heads, f.N, f.N, H, v_new=True, rope=H // f.heads, live=3 * B * f.N * H * e)
    return led


def _flux_single(z: _Sizes, f: _FluxShape, costs, prefix: str) -> _Ledger:
    B, e, H, N = z.B, z.e, f.H, f.N
    led = _Ledger()
    x = B * N * H * e
    led.add(x)
    led.add(2 * B * N * STATS)
    if f.mod_grad:
        led.add(x)
    out1 = 3 * H + f.M1
    _adapters_on(led, z, costs, f"{prefix}.linear1", N, x, False, weight_elements=H * out1)
    led.add(B * N * out1 * e, [x] * 4)  # linear1 output: QK RMSNorm reads q and k views of it, twice each
    led.add(2 * B * N * f.heads * STATS, [B * N * f.heads * STATS] * 4)
    linear1_out = B * N * out1 * e
    _attention(led, z, f.heads, N, N, H, v_new=False, rope=H // f.heads, live=linear1_out)  # v: a view of it
    hidden = B * N * f.M * e
    if f.gated:
        led.again(hidden, hidden)  # SiLU input and multiply operand: views of linear1's output
        led.add(hidden)  # SiLU output
        led.forward_point(linear1_out + x + 2 * hidden)  # linear1's output, attention output, SiLU, product
    else:
        led.again(hidden)  # GELU input: a view of linear1's output
        led.forward_point(linear1_out + x + hidden)
    _adapters_on(led, z, costs, f"{prefix}.linear2", N, B * N * (H + f.M) * e, False,  # the concatenation
                 weight_elements=(H + f.M) * H)
    if f.mod_grad:
        led.add(x)  # linear2 output, saved by the gate multiply
    return led


def _flux_units(unet_config: dict, z: _Sizes, costs, n_img: int, n_txt: int) -> tuple[list[_Unit], float, float, float]:
    """Units, the shared inputs copied once per step, the head's saved bytes (unique, per save)."""
    H = int(unet_config["hidden_size"])
    heads = int(unet_config["num_heads"])
    M = int(H * unet_config["mlp_ratio"])
    gated = bool(unet_config.get("mlp_silu_act", False))
    mod_paths = ("double_stream_modulation", "single_stream_modulation", "time_in", "guidance_in", "vector_in",
                 ".img_mod.", ".txt_mod.", ".modulation.", "final_layer.adaLN_modulation")
    mod_grad = any(any(p in m for p in mod_paths) for m in costs)
    f = _FluxShape(H, heads, M, 2 * M if gated else M, gated, int(unet_config["depth"]),
                   int(unet_config["depth_single_blocks"]), n_img, n_txt, mod_grad)
    B, e = z.B, z.e
    stem_grad = any(m in costs for m in ("img_in", "txt_in"))
    units = []
    for i in range(f.depth):
        prefix = f"double_blocks.{i}"
        grad = i > 0 or stem_grad
        led = _flux_double(z, f, costs, prefix, True)
        led0 = _flux_double(z, f, costs, prefix, grad)
        io = B * f.N * H * e
        units.append(_Unit(prefix, io, io, led, led0))
    for i in range(f.single):
        prefix = f"single_blocks.{i}"
        led = _flux_single(z, f, costs, prefix)
        io = B * f.N * H * e
        units.append(_Unit(prefix, io, io, led, led if (i > 0 or f.depth > 0 or stem_grad) else led))
    head_dim = H // heads
    shared = B * f.N * 2 * head_dim * STATS  # rotary table (float32)
    shared += B * 9 * H * e if unet_config.get("global_modulation") else B * H * e  # modulation vectors
    # head: final LayerNorm input (a view of the last unit's output: its whole storage stays), stats
    # head: the final LayerNorm reads a view of the last unit's output (its storage is that output),
    # its statistics, and the loss's difference (float32, latent-sized)
    p2 = int(unet_config.get("patch_size", 1)) ** 2
    loss = B * n_img * int(unet_config["out_channels"]) * p2 * STATS
    head_unique = 2 * B * n_img * STATS + loss
    head_per_save = B * n_img * H * e + head_unique  # a copy of the view when saves are copied
    return units, shared, head_unique, head_per_save


# -- SDXL ---------------------------------------------------------------------------------------

def _sdxl_units(unet_config: dict, z: _Sizes, costs, cells: int, text: int) -> tuple[list[_Unit], float, float, float]:
    from .families.sdxl import _layout

    lay = _layout(unet_config)
    B, e = z.B, z.e
    ctx_dim = int(unet_config["context_dim"])
    head_ch = int(unet_config.get("num_head_channels", 64) or 64)
    fixed_heads = lay.heads if isinstance(lay.heads, int) else None
    context = B * text * ctx_dim * e

    def heads_of(level: int, ch: int) -> int:
        return fixed_heads if fixed_heads is not None else max(1, ch // head_ch)

    def resblock(led: _Ledger, cin: int, cout: int, T: int, grad: bool) -> None:
        if not grad:
            return
        xin, xout = B * cin * T * e, B * cout * T * e
        led.add(xin, [xin] * (2 if cin != cout else 1))  # GroupNorm input (and the 1x1 skip conv's)
        led.add(2 * B * 32 * STATS)
        led.add(xin)  # SiLU input
        led.add(xin)  # conv1 input
        led.add(xout)  # GroupNorm 2 input (h + emb)
        led.add(2 * B * 32 * STATS)
        led.add(xout)  # SiLU input
        led.add(xout)  # conv2 input
        _weight(led, z, cin * cout * 9 + cout * cout * 9 + (cin * cout if cin != cout else 0), conv=True)

    def transformer(led: _Ledger, prefix: str, C: int, T: int, depth: int, heads: int, grad: bool) -> bool:
        """A SpatialTransformer; returns whether its output needs a gradient."""
        x = B * T * C * e
        if grad:
            led.add(x)  # GroupNorm input
            led.add(2 * B * 32 * STATS)
            _weight(led, z, C * C)  # proj_in
        for t in range(depth):
            p = f"{prefix}.transformer_blocks.{t}"
            adapted = any(m.startswith(p + ".") for m in costs)
            if not grad and not adapted:
                continue
            # self-attention
            if grad:
                led.add(x)  # norm1 input
                led.add(2 * B * T * STATS)
            saved = False
            for w in ("to_q", "to_k", "to_v"):
                saved = _adapters_on(led, z, costs, f"{p}.attn1.{w}", T, x, saved, input_needs_grad=grad,
                                     weight_elements=C * C)
            grad = True
            _attention(led, z, heads, T, T, C, v_new=True)
            _adapters_on(led, z, costs, f"{p}.attn1.to_out.0", T, x, False, weight_elements=C * C)
            # cross-attention: keys and values from the text (shared, never needing a gradient)
            led.add(x)  # norm2 input
            led.add(2 * B * T * STATS)
            _adapters_on(led, z, costs, f"{p}.attn2.to_q", T, x, False, weight_elements=C * C)
            for w in ("to_k", "to_v"):
                _adapters_on(led, z, costs, f"{p}.attn2.{w}", text, context, True,
                             input_needs_grad=False, weight_elements=C * ctx_dim)
            _attention(led, z, heads, T, text, C, v_new=True)
            _adapters_on(led, z, costs, f"{p}.attn2.to_out.0", T, x, False, weight_elements=C * C)
            # feed-forward (GEGLU)
            led.add(x)  # norm3 input
            led.add(2 * B * T * STATS)
            _adapters_on(led, z, costs, f"{p}.ff.net.0.proj", T, x, False, weight_elements=8 * C * C)
            led.add(8 * x, [4 * x, 4 * x])  # projection output: GELU input and multiply operand
            led.add(4 * x)  # GELU output
            led.forward_point(12 * x)  # the projection output and the product
            _adapters_on(led, z, costs, f"{p}.ff.net.2", T, 4 * x, False, weight_elements=4 * C * C)
        if grad:
            _weight(led, z, C * C)  # proj_out
        return grad

    units: list[_Unit] = []
    T0 = cells
    first_grad = False  # whether anything upstream needs a gradient (an adapter before this point)

    def make(name: str, inputs: float, outputs: float, build) -> None:
        nonlocal first_grad
        led, led0 = _Ledger(), _Ledger()
        build(led, True)
        build(led0, first_grad)
        if any(m == name or m.startswith(name + ".") for m in costs):
            first_grad = True
        units.append(_Unit(name, inputs, outputs, led, led0))

    n = 0
    ch = lay.channels[0]
    in_ch = int(unet_config["in_channels"])
    make("input_blocks.0", B * in_ch * T0 * e, B * ch * T0 * e,
         lambda led, grad: _weight(led, z, in_ch * ch * 9, grad, conv=True) or (led.add(B * in_ch * T0 * e) if grad else None))
    skips = [(ch, T0, 0)]  # encoder outputs the decoder concatenates: (channels, cells, unit index)
    uses: list[tuple[int, int, float]] = []  # (decoder unit index, encoder unit index, bytes)
    n = 1
    T = T0
    for level, out in enumerate(lay.channels):
        for i in range(lay.res_blocks[level]):
            depth = lay.down_depths[level][i]
            name = f"input_blocks.{n}"
            cin, heads, Tl = ch, heads_of(level, out), T

            def build(led, grad, cin=cin, out=out, Tl=Tl, depth=depth, name=name, heads=heads):
                resblock(led, cin, out, Tl, grad)
                if depth:
                    transformer(led, f"{name}.1", out, Tl, depth, heads, grad)

            make(name, B * cin * T * e, B * out * T * e, build)
            ch = out
            skips.append((ch, T, len(units) - 1))
            n += 1
        if level < len(lay.channels) - 1:
            name = f"input_blocks.{n}"

            def build(led, grad, ch=ch, Tl=T):
                if grad:
                    led.add(B * ch * Tl * e)
                    _weight(led, z, ch * ch * 9, conv=True)

            make(name, B * ch * T * e, B * ch * (T // 4) * e, build)
            T //= 4
            skips.append((ch, T, len(units) - 1))
            n += 1
    if lay.mid_depth >= -1:
        mid_heads = heads_of(len(lay.channels) - 1, ch)

        def build(led, grad, ch=ch, Tl=T):
            resblock(led, ch, ch, Tl, grad)
            if lay.mid_depth >= 0:
                g = transformer(led, "middle_block.1", ch, Tl, lay.mid_depth, mid_heads, grad)
                resblock(led, ch, ch, Tl, g)

        make("middle_block", B * ch * T * e, B * ch * T * e, build)
    n = 0
    for x_level, level in enumerate(reversed(range(len(lay.channels)))):
        out = lay.channels[level]
        for i, depth in enumerate(lay.up_depths[x_level]):
            name = f"output_blocks.{n}"
            skip_ch, skip_cells, source = skips.pop()
            uses.append((len(units), source, B * skip_ch * skip_cells * e))
            cin = ch + skip_ch
            heads = heads_of(level, out)
            up = level > 0 and i == len(lay.up_depths[x_level]) - 1

            def build(led, grad, cin=cin, out=out, Tl=T, depth=depth, name=name, heads=heads, up=up):
                resblock(led, cin, out, Tl, grad)
                g = grad
                if depth:
                    g = transformer(led, f"{name}.1", out, Tl, depth, heads, grad)
                if up and g:
                    led.add(B * out * 4 * Tl * e)  # the upsampling conv's (4x) input
                    _weight(led, z, out * out * 9, conv=True)

            make(name, B * cin * T * e, B * out * (4 * T if up else T) * e, build)
            ch = out
            if up:
                T *= 4
            n += 1
    for i, unit in enumerate(units):
        # backward reaches unit i after the decoder units above it: the gradients they sent down the
        # skips wait until their encoder unit is reached; in the forward, encoder outputs wait for the decoder
        unit.pending = sum(b for user, source, b in uses if user > i and source < i)
        unit.alive_after = sum(b for user, source, b in uses if source <= i < user)
    shared = B * 1280 * e + context  # time embedding, text (copied once per step)
    C0 = lay.channels[0]
    # out: GroupNorm (its input is the last unit's output), SiLU and conv inputs; the loss's difference
    head = 2 * B * C0 * T0 * e + 2 * B * 32 * STATS + B * int(unet_config["out_channels"]) * T0 * STATS
    return units, shared, head, head + B * C0 * T0 * e


# -- the estimate -------------------------------------------------------------------------------

def _tokens(family: str, unet_config: dict, width: int, height: int) -> int:
    """Image tokens (Flux) or first-level latent cells (SDXL) of a width x height pixel image."""
    if family == "sdxl":
        return (height // 8) * (width // 8)
    if family == "flux2":
        patch = int(unet_config.get("patch_size", 1))
        return ((height // 16 + patch // 2) // patch) * ((width // 16 + patch // 2) // patch)
    patch = int(unet_config.get("patch_size", 2))
    return ((height // 8 + patch // 2) // patch) * ((width // 8 + patch // 2) // patch)


def estimate_training_memory(unet_config: dict, plan: Plan, *, width: int, height: int, batch: int = 1,
                             checkpointing: bool = True, optimizer: str = "adamw",
                             weight_dtype: str | torch.dtype = "bfloat16",
                             compute_dtype: str | torch.dtype | None = None,
                             train_dtype: str | torch.dtype = "float32", text_tokens: int | None = None,
                             attention: str = "sdpa") -> MemoryEstimate:
    """Peak bytes of one training step (batch `batch` of `width` x `height` pixel images); see the module docstring.

    `weight_dtype`: how the diffusion model's weights are stored; `compute_dtype`: the dtype
    activations run in (default: the weight dtype, or bfloat16 for 8-bit weights); `train_dtype`:
    the adapter's (the job's dtype). `attention`: 'sdpa' (fused kernels, ComfyUI's CUDA default) or
    'sub_quad' (ComfyUI's CPU default); `attention_kind` maps ComfyUI's function names.
    """
    profile = profile_for(unet_config)
    family = profile.name
    if attention not in ATTENTION:
        raise ValueError(f"attention: unknown '{attention}' (one of {', '.join(ATTENTION)})")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown '{optimizer}' (one of {', '.join(OPTIMIZERS)})")
    if width < 1 or height < 1 or batch < 1:
        raise ValueError(f"size: width, height and batch must be positive (got {width}x{height}, batch {batch})")
    w_bytes = dtype_bytes(weight_dtype)
    if compute_dtype is None:
        compute_dtype = "bfloat16" if w_bytes == 1 else weight_dtype
    e = dtype_bytes(compute_dtype)
    t_bytes = dtype_bytes(train_dtype)
    text = DEFAULT_TEXT_TOKENS[family] if text_tokens is None else int(text_tokens)
    z = _Sizes(batch, e, t_bytes, attention, cast_weights=w_bytes != e)
    costs = _adapter_costs(plan)
    tokens = _tokens(family, unet_config, width, height)
    if family == "sdxl":
        units, shared, head_unique, head_per_save = _sdxl_units(unet_config, z, costs, tokens, text)
    else:
        units, shared, head_unique, head_per_save = _flux_units(unet_config, z, costs, tokens, text)

    n_params = model_parameter_count(unet_config)
    shapes = _trainable_shapes(plan)
    n_adapter = sum(math.prod(s) for s in shapes)
    adapter = n_adapter * t_bytes
    state = optimizer_state_bytes(optimizer, shapes, t_bytes)
    resident = (
        Term("weights", n_params * w_bytes, f"{n_params / 1e9:.2f} B parameters at {w_bytes} bytes"),
        Term("adapter", adapter, f"{n_adapter / 1e6:.1f} M trainable parameters at {t_bytes} bytes"),
        Term("optimizer state", state, optimizer),
    )
    in_units = sum(u.ledger.params for u in units) * t_bytes
    outside = max(0.0, adapter - in_units)  # adapters outside the units (embedders, final layer)
    activations, phase = _activation_peak(units, shared, head_unique if checkpointing else head_per_save,
                                          checkpointing, t_bytes, outside)
    step_temp = adapter if optimizer in ("adamw", "prodigy") else 0  # AdamW's sqrt(exp_avg_sq), Prodigy's likewise
    optimizer_step = sum(t.bytes for t in resident) + adapter + step_temp  # + every gradient
    settings = dict(optimizer=optimizer, weight_bytes=w_bytes, compute_bytes=e, train_bytes=t_bytes,
                    model_parameters=n_params, adapter_parameters=n_adapter)
    return MemoryEstimate(family, width, height, batch, checkpointing, attention, tokens, text, resident,
                          tuple(activations), phase, optimizer_step, settings)


def _activation_peak(units: list[_Unit], shared: float, head: float, checkpointing: bool, t_bytes: int,
                     outside: float) -> tuple[list[Term], str]:
    """The activation terms at the highest moment: the end of the forward, or one unit's backward."""
    if checkpointing:
        held = [u.inputs for u in units]  # private input copies
        ledgers = [u.ledger if i > 0 else u.ledger_no_grad_inputs for i, u in enumerate(units)]
        held_name, held_note = "checkpoint input copies", "private input copies of {n} units + shared inputs"
        base = shared
    else:
        ledgers = [u.ledger_no_grad_inputs for u in units]  # nothing upstream of the first adapter needs grad
        held = [led.per_save + led.weights for led in ledgers]
        held_name, held_note = "saved activations (copied when saved)", "everything {n} units saved for backward"
        base = 0.0
    end = [Term(held_name, int(base + sum(held)), held_note.format(n=len(units))),
           Term("head activations", int(head + units[-1].outputs), "final layer / output block and loss")]
    best, best_terms, best_phase = sum(t.bytes for t in end), end, "end of the forward"
    for i, u in enumerate(units):
        if u.alive_after:  # SDXL's forward: encoder outputs wait for the decoder
            upto = sum(held[: i + 1])
            terms = [Term(held_name, int(base + upto), held_note.format(n=i + 1)),
                     Term("skip connections", int(u.alive_after), "encoder outputs kept for the decoder")]
            if sum(t.bytes for t in terms) > best:
                best, best_terms, best_phase = sum(t.bytes for t in terms), terms, f"forward after {u.name}"
    grads = outside
    for i in reversed(range(len(units))):
        u, led = units[i], ledgers[i]
        grads += led.params * t_bytes
        saved = led.per_save + led.weights
        working = max(led.forward_peak, led.backward_peak, saved) - saved
        before = sum(held[: i + 1]) if checkpointing else sum(held[:i])
        terms = [
            Term(held_name, int(base + before), held_note.format(n=i + 1 if checkpointing else i)),
            Term("unit activations" if not checkpointing else "recomputed unit activations", int(saved),
                 f"{u.name}: what it saves for backward" + (", copied when saved" if checkpointing else "")),
            Term("unit working set", int(2 * u.outputs + working),
                 "its output and output gradient, plus the largest forward / backward step's temporaries"),
            Term("adapter gradients", int(grads), "of the units backward has reached"),
            Term("skip-connection gradients", int(u.pending), "sent down the skips, waiting for the encoder"),
        ]
        total = sum(t.bytes for t in terms)
        if total > best:
            best, best_terms, best_phase = total, terms, f"backward of {u.name}"
    return best_terms, best_phase


# -- the real models ------------------------------------------------------------------------------

# ComfyUI `unet_config`s of the released models (what model detection produces from their
# checkpoints; Flux 2 Klein 4B: 5 double + 20 single blocks, hidden 3072, 24 heads, Qwen3-4B text of
# 3 x 2560 channels, no guidance embedder).
_FLUX2_DEV = dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=15360,
                  hidden_size=6144, mlp_ratio=3.0, num_heads=48, depth=8, depth_single_blocks=48,
                  axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=True,
                  global_modulation=True, mlp_silu_act=True, ops_bias=False, default_ref_method="index",
                  ref_index_scale=10.0)
REFERENCE_MODELS: dict[str, tuple[dict, str]] = {
    "Flux 2 dev": (_FLUX2_DEV, "flux2_lokr"),
    "Flux 2 Klein 4B": (dict(_FLUX2_DEV, context_in_dim=7680, hidden_size=3072, num_heads=24, depth=5,
                             depth_single_blocks=20, guidance_embed=False), "flux2_lokr"),
    "Flux 1 dev": (dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                        hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                        axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True),
                   "flux1_lokr"),
    "SDXL": ({"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
              "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
              "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
              "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
              "context_dim": 2048, "num_head_channels": 64, "num_heads": -1,
              "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
              "use_temporal_resblock": False}, "sdxl_lokr_attention"),
}


def preset_plan(unet_config: dict, preset: str) -> Plan:
    """The Plan of one of the pack's preset configs (configs/<preset>.json) on a model."""
    from pathlib import Path

    from .config import parse_config
    from .targets import plan_for

    text = (Path(__file__).resolve().parents[1] / "configs" / f"{preset}.json").read_text()
    return plan_for(parse_config(text), unet_config)


def reference_estimates(size: int = 1024, weight_dtype: str = "bfloat16", **options: Any) -> list[dict]:
    """Estimates for the real models at size x size: per model and preset, checkpointing on and off,
    with the adapter trained in float32 (the job default) and in bfloat16."""
    rows = []
    for name, (unet_config, preset) in REFERENCE_MODELS.items():
        plan = preset_plan(unet_config, preset)
        row: dict[str, Any] = {"model": name, "preset": preset}
        for key, checkpointing, train in (("on_fp32", True, "float32"), ("off_fp32", False, "float32"),
                                          ("on_bf16", True, "bfloat16")):
            est = estimate_training_memory(unet_config, plan, width=size, height=size, checkpointing=checkpointing,
                                           weight_dtype=weight_dtype, train_dtype=train, **options)
            row[key] = est
        rows.append(row)
    return rows


def reference_table(size: int = 1024, weight_dtype: str = "bfloat16", device_gib: float = 24.0) -> str:
    """A Markdown table of `reference_estimates` (GiB), with whether each fits a `device_gib` card."""
    rows = reference_estimates(size, weight_dtype)
    card = device_gib * GIB
    head = (f"| model ({size}², {weight_dtype} weights, batch 1, AdamW, fused attention) | preset | weights | "
            "adapter params | checkpointing on | checkpointing off | on, bf16 adapter | "
            f"fits {device_gib:g} GB (on / on bf16) |")
    lines = [head, "|" + "---|" * 8]
    for row in rows:
        on, off, bf = row["on_fp32"], row["off_fp32"], row["on_bf16"]
        weights = on.resident[0].bytes
        lines.append(f"| {row['model']} | {row['preset']} | {weights / GIB:.1f} GiB | "
                     f"{on.settings['adapter_parameters'] / 1e6:,.0f} M | {on.peak_bytes / GIB:.1f} GiB | "
                     f"{off.peak_bytes / GIB:.1f} GiB | {bf.peak_bytes / GIB:.1f} GiB | "
                     f"{'yes' if on.fits(card) else 'no'} / {'yes' if bf.fits(card) else 'no'} |")
    return "\n".join(lines)
