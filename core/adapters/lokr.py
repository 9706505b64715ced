"""LoKr: ΔW = scale * kron(w1, w2), each half full or low-rank (w2 possibly Tucker on convs).

Scale, as LyCORIS's training module and rebuild forward use it: alpha / rank when either half is
factorised (rank = w1_a's columns, else w2_a's columns, else the Tucker core's size), and exactly
1 when both halves are full matrices (alpha is then ignored). LyCORIS's `get_diff_weight` applies
the scale twice, and `create_lycoris_from_weights` misreads Tucker-conv files; neither is copied.
"""

from __future__ import annotations

import math

import torch
from lycoris.functional.lokr import kron_bypass, kron_weight

from .base import KERNEL_BACKEND, PASS_MACS, LayerSpec, alpha_scale, expect_shape, fail, grads_through, require
from .lowrank import LowRankAdapter

_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


class LoKrAdapter(LowRankAdapter):
    algo = "lokr"
    SCALED_KEYS = ("lokr_w1", "lokr_w1_a")
    # lokr_t1 is listed by LyCORIS but never written nor read: it is reported as ignored.
    KEYS = (*_FACTORS, "alpha", "dora_scale")

    def __init__(self, lora_name: str, layer: LayerSpec, params: dict[str, torch.Tensor]):
        super().__init__(lora_name, layer, params)
        p = self.params
        if "lokr_w1" not in p:
            for key in ("lokr_w1_a", "lokr_w1_b"):
                require(lora_name, p, key, "lokr_w1 is absent")
        if "lokr_w2" not in p:
            for key in ("lokr_w2_a", "lokr_w2_b"):
                require(lora_name, p, key, "lokr_w2 is absent")
        self.tucker = "lokr_t2" in p and "lokr_w2" not in p
        self._check_ndims()
        self.dim = self._rank()
        a, c = self._w1_shape()
        b, d = self._check_w1(a, c)
        self._check_w2(b, d)
        if self.dim is None:
            self.scale = 1.0  # both halves full: LyCORIS forces alpha = dim, scale 1
        else:
            self.scale = alpha_scale(lora_name, p, self.dim, self.warnings)
        self._init_dora()

    def _rank(self) -> int | None:
        p = self.params
        if "lokr_w1_a" in p and "lokr_w1" not in p:
            return int(p["lokr_w1_a"].shape[1])
        if self.tucker:
            return int(p["lokr_t2"].shape[0])
        if "lokr_w2" not in p:
            return int(p["lokr_w2_a"].shape[1])
        return None

    def _check_ndims(self) -> None:
        spatial = len(self.layer.kernel_size)
        for key, tensor in self.params.items():
            want = 2 + spatial if key in ("lokr_w2", "lokr_t2") else 2 if key in _FACTORS else tensor.ndim
            if tensor.ndim != want:
                fail(self.lora_name, key, f"expected a {want}-d tensor, got shape {tuple(tensor.shape)}")

    def _w1_shape(self) -> tuple[int, int]:
        p = self.params
        if "lokr_w1" in p:
            return int(p["lokr_w1"].shape[0]), int(p["lokr_w1"].shape[1])
        w1a, w1b = p["lokr_w1_a"], p["lokr_w1_b"]
        if w1b.shape[0] != self.dim:
            fail(self.lora_name, "lokr_w1_b", f"expected {self.dim} rows (lokr_w1_a's rank), got shape "
                                              f"{tuple(w1b.shape)}")
        return int(w1a.shape[0]), int(w1b.shape[1])

    def _check_w1(self, a: int, c: int) -> tuple[int, int]:
        L, key = self.layer, "lokr_w1" if "lokr_w1" in self.params else "lokr_w1_a"
        if a < 1 or c < 1 or L.out_features % a or L.in_features % c:
            fail(self.lora_name, key, f"Kronecker factor ({a}, {c}) does not divide the layer's "
                                      f"(out, in) = ({L.out_features}, {L.in_features})")
        return L.out_features // a, L.in_features // c

    def _check_w2(self, b: int, d: int) -> None:
        L, p, name, r = self.layer, self.params, self.lora_name, self.dim
        if "lokr_w2" in p:
            expect_shape(name, "lokr_w2", p["lokr_w2"], (b, d, *L.kernel_size))
            return
        if self.tucker:
            if not L.is_conv or all(k == 1 for k in L.kernel_size):
                fail(name, "lokr_t2", "a Tucker core only exists for convs with a kernel larger than 1")
            expect_shape(name, "lokr_t2", p["lokr_t2"], (r, r, *L.kernel_size))
            expect_shape(name, "lokr_w2_a", p["lokr_w2_a"], (r, b))
            expect_shape(name, "lokr_w2_b", p["lokr_w2_b"], (r, d))
            return
        expect_shape(name, "lokr_w2_a", p["lokr_w2_a"], (b, r))
        expect_shape(name, "lokr_w2_b", p["lokr_w2_b"], (r, d * math.prod(L.kernel_size)))

    def _factors(self, like) -> list[torch.Tensor | None]:
        factors = [self._p(k, like) for k in _FACTORS]
        if "lokr_w1" in self.params:
            factors[1] = factors[2] = None
        if "lokr_w2" in self.params:
            factors[4] = factors[5] = factors[6] = None
        return factors

    # -- the rebuilt-weight path --

    def _fast_rebuild(self) -> bool:
        return self.wd_on_out is None and not self.tucker

    def _halves(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w1 (a, c) and w2 as a matrix (b, d x kernel), each rebuilt from its factors (not Tucker)."""
        w1, w1a, w1b, w2, w2a, w2b, _ = self._factors(like)
        w1 = w1 if w1 is not None else w1a @ w1b
        w2 = w2 if w2 is not None else w2a @ w2b.reshape(w2b.shape[0], -1)
        return w1, w2.reshape(w2.shape[0], -1)

    def delta_macs(self, tokens, pass_macs=PASS_MACS):
        a, c = self._w1_shape()
        b, d_flat = self.layer.out_features // a, self._flat_in // c
        if "lokr_w2" in self.params:
            per_token = c * d_flat * b
        else:
            per_token = c * d_flat * self.dim + c * self.dim * b
        # LyCORIS's chain also transposes the activations twice: about half as much again.
        return 1.5 * float(tokens) * (per_token + a * c * b)

    def rebuild_macs(self):
        if "lokr_w2" in self.params or self.dim is None:
            return 0.0
        a, c = self._w1_shape()
        return float(self.dim) * self._weight_numel() / (a * c)  # w2 = w2_a w2_b

    def grad_macs(self, tokens):
        if self._factored_grads():
            return 2.0 * float(tokens) * self._weight_numel() / self._w1_shape()[0]
        return super().grad_macs(tokens)

    def _factored_grads(self) -> bool:
        """Gradients of w1 and w2 straight from (grad_out, x): two products of 1/a of a full one each,
        with large inner dimensions and no weight-sized gradient, instead of grad_W' = gᵀ x."""
        return self._fast_rebuild() and not self.layer.is_conv and self._w1_shape()[0] >= 2

    def weight_writer(self, like, strength, base_weight=None):
        """dst = src + (strength * scale) kron(w1, w2) rows: one broadcast addcmul, no ΔW materialised."""
        if not self._fast_rebuild():
            return super().weight_writer(like, strength, base_weight)
        w1, w2 = self._halves(like)
        c, (b, dk) = w1.shape[1], w2.shape
        value = float(strength) * self.scale

        def write(dst, src, d, n):
            # Row r of kron(w1, w2) is w1[r // b] ⊗ w2[r % b]: whole w2 blocks in one 4-d addcmul,
            # a partial block (a window or slice not aligned to b) as a 3-d one.
            pos, end = d, d + n
            while pos < end:
                i, j = divmod(pos, b)
                if j == 0 and end - pos >= b:
                    m = (end - pos) // b
                    rows, w1v, w2v = m * b, w1[i : i + m].view(m, 1, c, 1), w2.view(1, b, 1, dk)
                    shape = (m, b, c, dk)
                else:
                    rows = min(b - j, end - pos)
                    w1v, w2v, shape = w1[i].view(1, c, 1), w2[j : j + rows].view(rows, 1, dk), (rows, c, dk)
                out = dst[pos - d : pos - d + rows].view(shape)
                if src is None:
                    out.addcmul_(w1v, w2v, value=value)
                else:
                    torch.addcmul(src[pos - d : pos - d + rows].reshape(shape), w1v, w2v, value=value, out=out)
                pos += rows

        return write, None

    def leaf_grads(self, grad_out, x, strength, base_weight, leaves):
        """grad w2 = Σ_t (g_t w1)ᵀ x_t and grad w1 = Σ_t g_t (x_t w2ᵀ)ᵀ on the (a, b) x (c, d) blocks of g and x."""
        if not self._factored_grads():
            return super().leaf_grads(grad_out, x, strength, base_weight, leaves)
        with torch.enable_grad():
            w1, w2 = self._halves(x)
        (a, c), (b, d) = w1.shape, w2.shape
        t = grad_out.shape[0]
        g3, x2 = grad_out.reshape(t, a, b), x.reshape(t * c, d)
        h = torch.matmul(w1.detach().t(), g3)  # (t, c, b): h[t, k, j] = Σ_i w1[i, k] g[t, i, j]
        grad_w2 = h.reshape(t * c, b).t().matmul(x2)
        u = x2.matmul(w2.detach().t()).reshape(t, c, b)  # u[t, k, j] = Σ_l x[t, k, l] w2[j, l]
        grad_w1 = torch.bmm(g3, u.transpose(1, 2)).sum(0)  # Σ_t g[t] u[t]ᵀ
        coef = float(strength) * self.scale
        return grads_through([w1, w2], [grad_w1 * coef, grad_w2 * coef], leaves)

    def _unit_delta_weight(self, like):
        dw = kron_weight(*self._factors(like), scale=self.scale, backend=KERNEL_BACKEND)
        return dw.reshape(self.layer.weight_shape)

    def _delta_output(self, x, base_weight, rank_mask):
        L = self.layer
        if L.groups != 1:  # the grouped Kronecker chain cannot also carry conv groups; go through ΔW
            return L.apply(x, self._unit_delta_weight(x))
        w1, w1a, w1b, w2, w2a, w2b, t2 = self._factors(x)
        if L.is_conv and w2 is None:
            if t2 is not None:
                # LyCORIS's functional kron_bypass uses w2_a as the closing 1x1 conv as stored, (rank, b);
                # the conv needs (b, rank), which its own module passes (transposed) too.
                w2a = w2a.t().contiguous()
            else:
                # w2_b is saved flattened as (rank, d * k...); the functional op wants it as a conv weight.
                w2b = w2b.reshape(w2b.shape[0], -1, *L.kernel_size)
        return kron_bypass(x, w1, w1a, w1b, w2, w2a, w2b, t2, scale=self.scale, extra_args=L.conv_kwargs,
                           backend=KERNEL_BACKEND)
