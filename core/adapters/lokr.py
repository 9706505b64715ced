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

from .base import KERNEL_BACKEND, LayerSpec, alpha_scale, expect_shape, fail, require
from .lowrank import LowRankAdapter

_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


class LoKrAdapter(LowRankAdapter):
    algo = "lokr"
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
