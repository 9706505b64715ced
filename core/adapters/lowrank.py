"""LoRA / LoCon (`lora_up/down[/mid]`) and LoHa (`hada_*`), each optionally with DoRA (`dora_scale`).

Scale = alpha / rank, applied once (LyCORIS's `get_diff_weight` applies it twice for LoHa; its
rebuild forward applies it once, which is what is reproduced here). DoRA follows the rebuild
forward: W' = weight_decompose(W + ΔW, dora_scale, strength), normalised by the merged weight's
norm, so it is not linear in the strength (and strength 0 is W + ΔW renormalised, not W).
"""

from __future__ import annotations

import math

import torch
from lycoris.functional import locon, loha
from lycoris.functional.general import weight_decompose

from .. import scratch
from .base import (
    KERNEL_BACKEND,
    PASS_MACS,
    LayerSpec,
    ModuleAdapter,
    alpha_scale,
    expect_shape,
    fail,
    pass_cost,
    require,
)


def dora_orientation(lora_name: str, params: dict[str, torch.Tensor], layer: LayerSpec) -> bool | None:
    """wd_on_out (norm per output row: True, per input column: False) from dora_scale's shape; None without DoRA."""
    scale = params.get("dora_scale")
    if scale is None:
        return None
    out_row = (layer.out_features, 1, *layer.ones)
    in_col = (1, layer.in_features, *layer.ones)
    if tuple(scale.shape) == out_row:
        return True
    if tuple(scale.shape) == in_col:
        return False
    fail(lora_name, "dora_scale", f"expected shape {out_row} (or {in_col} for a per-input norm), "
                                  f"got {tuple(scale.shape)}")


class LowRankAdapter(ModuleAdapter):
    """Shared by LoRA, LoHa and LoKr: ΔW(s) = s * ΔW(1), or the DoRA rebuild when dora_scale is saved."""

    scale: float

    def _init_dora(self) -> None:
        self.wd_on_out = dora_orientation(self.lora_name, self.params, self.layer)
        if self.wd_on_out is not None:
            self.linear_in_strength = False
            self.needs_base_weight = True

    def _unit_delta_weight(self, like: torch.Tensor) -> torch.Tensor:
        """ΔW at strength 1 (scale applied), in like's dtype and device, shaped as the layer weight."""
        raise NotImplementedError

    def _delta_weight(self, w32, strength, rank_mask):
        dw = self._unit_delta_weight(w32)
        if self.wd_on_out is None:
            return (dw if strength == 1.0 else dw * strength), None
        merged = weight_decompose(w32 + dw, self._p32("dora_scale", w32), strength, self.wd_on_out,
                                  backend=KERNEL_BACKEND)
        return merged - w32, None

    @property
    def _flat_in(self) -> int:
        """Columns of the layer weight flattened to 2-d (in / groups x kernel)."""
        return self.layer.in_features * math.prod(self.layer.kernel_size)

    def _fast_rebuild(self) -> bool:
        """Whether `weight_writer` has its own in-place route (else the generic float32 one)."""
        return False

    def rebuild_passes(self) -> float:
        return 1.0 if self._fast_rebuild() else super().rebuild_passes()


def _rows_writer(dst: torch.Tensor, src: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dst and src (None: in place) as 2-d (n, -1) views."""
    return dst.view(n, -1), (None if src is None else src.reshape(n, -1))


def _add_chain_(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, output: torch.Tensor, blocks,
                alpha: float) -> None:
    """output[rows] += alpha (x downᵀ) upᵀ for a linear rank chain: one addmm per row block of the route
    (`blocks`, None: all rows in order) into the contiguous output, no output-sized temporaries."""
    hidden = torch.nn.functional.linear(x, down).reshape(-1, down.shape[0])
    flat = output.view(-1, output.shape[-1])
    for c, d, n in blocks if blocks is not None else ((0, 0, up.shape[0]),):
        flat[:, c : c + n].addmm_(hidden, up[d : d + n].t(), alpha=alpha)


class LoRAAdapter(LowRankAdapter):
    algo = "lora"
    SCALED_KEYS = ("lora_up.weight",)
    KEYS = ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale")

    def __init__(self, lora_name: str, layer: LayerSpec, params: dict[str, torch.Tensor]):
        super().__init__(lora_name, layer, params)
        up = require(lora_name, self.params, "lora_up.weight")
        down = require(lora_name, self.params, "lora_down.weight")
        mid = self.params.get("lora_mid.weight")
        if down.ndim < 2:
            fail(lora_name, "lora_down.weight", f"expected a 2-d or conv weight, got shape {tuple(down.shape)}")
        self.dim = int(down.shape[0])
        self._check(up, down, mid)
        self.scale = alpha_scale(lora_name, self.params, self.dim, self.warnings)
        self._init_dora()

    def _check(self, up, down, mid) -> None:
        L, r, name = self.layer, self.dim, self.lora_name
        if mid is not None:
            if not L.is_conv or all(k == 1 for k in L.kernel_size):
                fail(name, "lora_mid.weight", "a Tucker mid only exists for convs with a kernel larger than 1")
            expect_shape(name, "lora_down.weight", down, (r, L.in_features, *L.ones))
            expect_shape(name, "lora_mid.weight", mid, (r, r, *L.kernel_size))
        else:
            expect_shape(name, "lora_down.weight", down, (r, L.in_features, *L.kernel_size))
        expect_shape(name, "lora_up.weight", up, (L.out_features, r, *L.ones))

    def _factors(self, like):
        return self._p("lora_down.weight", like), self._p("lora_up.weight", like), self._p("lora_mid.weight", like)

    def _unit_delta_weight(self, like):
        down, up, mid = self._factors(like)
        dw = locon.diff_weight(down, up, mid, gamma=self.scale, backend=KERNEL_BACKEND)
        return dw.reshape(self.layer.weight_shape)

    def _fast_rebuild(self) -> bool:
        return self.wd_on_out is None and "lora_mid.weight" not in self.params

    def delta_macs(self, tokens, pass_macs=PASS_MACS):
        return float(tokens) * self.dim * (self._flat_in + self.layer.out_features)

    def rebuild_macs(self):
        return float(self.dim) * self._weight_numel() if self._fast_rebuild() else 0.0

    def weight_writer(self, like, strength, base_weight=None):
        """dst = src + (strength * scale) up[rows] down: one addmm per row block."""
        if not self._fast_rebuild():
            return super().weight_writer(like, strength, base_weight)
        down, up, _ = self._factors(like)
        down2, up2 = down.reshape(self.dim, -1), up.reshape(-1, self.dim)
        alpha = float(strength) * self.scale

        def write(dst, src, d, n):
            dst2, src2 = _rows_writer(dst, src, n)
            if src2 is None:
                dst2.addmm_(up2[d : d + n], down2, alpha=alpha)
            else:
                torch.addmm(src2, up2[d : d + n], down2, alpha=alpha, out=dst2)

        return write, None

    def add_output_(self, x, output, blocks, strength):
        """Plain linear LoRA: output += (strength*scale) * (x down^T) up^T with one addmm per row block.

        The same product LyCORIS's bypass computes, without its two output-sized temporaries
        (up * gamma and the delta): the bypass overhead and peak memory of a LoRA stay at its rank.
        """
        if self.layer.is_conv or self.wd_on_out is not None or not output.is_contiguous():
            return False
        down, up, _ = self._factors(x)
        _add_chain_(x, down, up, output, blocks, self.scale * strength)
        return True

    def _delta_output(self, x, base_weight, rank_mask):
        if self.layer.groups != 1:  # the rank-space chain cannot be grouped; go through ΔW
            return self.layer.apply(x, self._unit_delta_weight(x))
        down, up, mid = self._factors(x)
        return locon.bypass_forward_diff(x, None, down, up, mid, gamma=self.scale,
                                         extra_args=self.layer.conv_kwargs, backend=KERNEL_BACKEND)

    def delta_output_ranks(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The delta with the rank-r hidden multiplied by `keep` ([dim]) between down and up: LyCORIS's
        bypass forward under rank dropout (LoConModule.bypass_forward_diff). Training only."""
        L = self.layer
        if self.wd_on_out is not None or L.groups != 1:
            raise RuntimeError(f"{self.lora_name}: rank dropout in bypass mode needs a plain LoRA/LoCon "
                               "(no DoRA, no conv groups)")
        down, up, mid = self._factors(x)
        if not L.is_conv:
            return torch.nn.functional.linear(torch.nn.functional.linear(x, down) * keep, up) * self.scale
        hidden = L.apply(x, down) if mid is None else L.apply(L.pointwise(x, down), mid)
        hidden = hidden * keep.view(1, -1, *[1] * (hidden.ndim - 2))
        return L.pointwise(hidden, up) * self.scale


class LoHaAdapter(LowRankAdapter):
    algo = "loha"
    SCALED_KEYS = ("hada_w1_a",)
    KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale")

    def __init__(self, lora_name: str, layer: LayerSpec, params: dict[str, torch.Tensor]):
        super().__init__(lora_name, layer, params)
        for key in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            require(lora_name, self.params, key)
        w1b = self.params["hada_w1_b"]
        if w1b.ndim != 2:
            fail(lora_name, "hada_w1_b", f"expected a 2-d tensor, got shape {tuple(w1b.shape)}")
        self.dim = int(w1b.shape[0])  # LyCORIS: lora_dim = w1b.size(0)
        self.tucker = "hada_t1" in self.params or "hada_t2" in self.params
        self._check()
        self.scale = alpha_scale(lora_name, self.params, self.dim, self.warnings)
        # HadaWeight saves its scale for backward, so it must be a tensor; a 0-d CPU tensor
        # multiplies tensors on any device without a transfer or a sync.
        self._gamma = torch.tensor(self.scale, dtype=torch.float32)
        self._init_dora()

    def _check(self) -> None:
        L, r, name, p = self.layer, self.dim, self.lora_name, self.params
        if self.tucker:
            if not L.is_conv or all(k == 1 for k in L.kernel_size):
                fail(name, "hada_t1", "Tucker factors only exist for convs with a kernel larger than 1")
            for i in (1, 2):
                expect_shape(name, f"hada_t{i}", require(name, p, f"hada_t{i}"), (r, r, *L.kernel_size))
                expect_shape(name, f"hada_w{i}_a", p[f"hada_w{i}_a"], (r, L.out_features))
                expect_shape(name, f"hada_w{i}_b", p[f"hada_w{i}_b"], (r, L.in_features))
            return
        flat_in = L.in_features * math.prod(L.kernel_size)
        for i in (1, 2):
            expect_shape(name, f"hada_w{i}_a", p[f"hada_w{i}_a"], (L.out_features, r))
            expect_shape(name, f"hada_w{i}_b", p[f"hada_w{i}_b"], (r, flat_in))

    def _factors(self, like):
        keys = ("hada_w1_b", "hada_w1_a", "hada_w2_b", "hada_w2_a", "hada_t1", "hada_t2")
        return tuple(self._p(k, like) for k in keys)  # LyCORIS order: (w1d, w1u, w2d, w2u, t1, t2)

    def _unit_delta_weight(self, like):
        dw = loha.diff_weight(*self._factors(like), gamma=self._gamma, backend=KERNEL_BACKEND)
        return dw.reshape(self.layer.weight_shape)

    def _fast_rebuild(self) -> bool:
        return self.wd_on_out is None and not self.tucker

    def _khatri_rao_macs(self, tokens: int, pass_macs: float) -> float:
        """Cost of the delta as a rank-r² chain (its factors built per call too); inf where it cannot run."""
        L = self.layer
        if self.tucker or L.groups != 1:
            return math.inf
        return (float(tokens) + pass_macs) * self.dim**2 * (L.out_features + self._flat_in)

    def _delta_weight_macs(self, tokens: int, pass_macs: float) -> float:
        return (2.0 * self.dim + pass_macs) * self._weight_numel() + float(tokens) * self._weight_numel()

    def _khatri_rao_pays(self, x: torch.Tensor) -> bool:
        """Whether, for input x, the rank-r² chain beats building ΔW and multiplying by it (LyCORIS's bypass)."""
        tokens = x.numel() // max(1, x.shape[1] if self.layer.is_conv else x.shape[-1])
        passes = pass_cost(x.dtype)
        return self._khatri_rao_macs(tokens, passes) < self._delta_weight_macs(tokens, passes)

    def delta_macs(self, tokens, pass_macs=PASS_MACS):
        return min(self._khatri_rao_macs(tokens, pass_macs), self._delta_weight_macs(tokens, pass_macs))

    def rebuild_macs(self):
        return 2.0 * self.dim * self._weight_numel()

    def rebuild_blocks(self) -> int:
        return 1 if self._fast_rebuild() else 0  # (w2a w2b) rows beside the window they multiply into

    def weight_writer(self, like, strength, base_weight=None):
        """dst = src + (strength * scale) (w1a w1b) ⊙ (w2a w2b), (w2a w2b) built in a scratch block of rows."""
        if not self._fast_rebuild():
            return super().weight_writer(like, strength, base_weight)
        w1a, w1b, w2a, w2b = (self._p(k, like) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        w1b, w2b = w1b.reshape(self.dim, -1), w2b.reshape(self.dim, -1)
        value = float(strength) * self.scale
        row_bytes = w1b.shape[1] * w1b.element_size()

        def write(dst, src, d, n):
            # ΔW in blocks as large as the runtime's windows of W' (`scratch.window_rows`): a window
            # is one block, two rank-r products and one addcmul (each block's products pay a fixed
            # cost: 256 KiB blocks cost 1.5-3x more than 4 MiB ones on CPU).
            dst2, src2 = _rows_writer(dst, src, n)
            chunk = scratch.window_rows(n, row_bytes, 2)
            q = scratch.take("block", (chunk, dst2.shape[1]), dst2)
            for s0 in range(0, n, chunk):
                e0 = min(n, s0 + chunk)
                rows, qs = dst2[s0:e0], q[: e0 - s0]
                torch.mm(w2a[d + s0 : d + e0], w2b, out=qs)
                if src2 is None:
                    rows.addcmul_(w1a[d + s0 : d + e0] @ w1b, qs, value=value)
                else:  # (w1a w1b) straight into the rows of W', then W' = W + value * W' ⊙ (w2a w2b)
                    torch.mm(w1a[d + s0 : d + e0], w1b, out=rows)
                    torch.addcmul(src2[s0:e0], rows, qs, value=value, out=rows)

        return write, None

    def _khatri_rao(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW/scale = (w1a w1b) ⊙ (w2a w2b) = U V, U[:, i r + j] = w1a[:, i] w2a[:, j], V[i r + j] = w1b[i] w2b[j].

        A rank-r² LoRA with the same ΔW. Building it costs r² (out + in) products, far less than the
        matmuls it feeds, so it is rebuilt per call rather than cached (no memory kept).
        """
        w1a, w1b, w2a, w2b = (self._p(k, like) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        r, L = self.dim, self.layer
        up = (w1a[:, :, None] * w2a[:, None, :]).reshape(L.out_features, r * r, *L.ones)
        down = (w1b[:, None, :] * w2b[None, :, :]).reshape(r * r, L.in_features, *L.kernel_size)
        return up, down

    def add_output_(self, x, output, blocks, strength):
        """Linear LoHa through the Khatri-Rao chain, added in place: output[rows] += (strength*scale) (x Vᵀ) Uᵀ.

        One addmm per row block with the scale as its alpha: no output-sized temporaries (the
        delta, its scaled copy) and no separate add, as LoRA's `add_output_`.
        """
        if self.layer.is_conv or self.wd_on_out is not None or not output.is_contiguous() \
                or not self._khatri_rao_pays(x):
            return False
        up, down = self._khatri_rao(x)
        _add_chain_(x, down, up, output, blocks, self.scale * strength)
        return True

    def _delta_output(self, x, base_weight, rank_mask):
        L = self.layer
        if self._khatri_rao_pays(x):
            # Cheaper than LyCORIS's bypass (which builds ΔW every call): the same ΔW as a rank-r² chain.
            up, down = self._khatri_rao(x)
            return locon.bypass_forward_diff(x, None, down, up, None, gamma=self.scale, extra_args=L.conv_kwargs,
                                             backend=KERNEL_BACKEND)
        if L.is_conv:  # LyCORIS builds ΔW here too (its functional bypass assumes a linear op)
            return L.apply(x, self._unit_delta_weight(x))
        return loha.bypass_forward_diff(x, None, *self._factors(x), gamma=self._gamma, extra_args={},
                                        backend=KERNEL_BACKEND)
