"""GLoRA (`a1/a2/b1/b2.weight`, optional Tucker `bm.weight`, `alpha`): ΔW = scale * (W a1 a2 + b1 b2).

Linear in the strength; needs the base weight (the W a1 a2 term). The bypass computes W a1 once
per call (out x rank) and runs the input through a2 then (W a1): no full-size product with x
beyond the rank. LyCORIS's own bypass diff runs `org_forward(A x)`, which adds the layer's bias a
second time; the rebuild (reproduced here) has no bias term.
"""

from __future__ import annotations

import torch
from lycoris.functional import locon
from lycoris.modules.glora import _glora_weight

from .base import KERNEL_BACKEND, PASS_MACS, LayerSpec, ModuleAdapter, alpha_scale, expect_shape, fail, require


class GLoRAAdapter(ModuleAdapter):
    algo = "glora"
    SCALED_KEYS = ("a2.weight", "b2.weight")
    KEYS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight", "alpha")

    def __init__(self, lora_name: str, layer: LayerSpec, params: dict[str, torch.Tensor]):
        super().__init__(lora_name, layer, params)
        for key in ("a1.weight", "a2.weight", "b1.weight", "b2.weight"):
            require(lora_name, self.params, key)
        if layer.groups != 1:
            fail(lora_name, "a1.weight", "GLoRA on a grouped conv is not supported (LyCORIS neither)")
        a2 = self.params["a2.weight"]
        if a2.ndim < 2:
            fail(lora_name, "a2.weight", f"expected a 2-d or conv weight, got shape {tuple(a2.shape)}")
        self.dim = int(a2.shape[0])  # LyCORIS: lora_dim = a2.size(0)
        self._check()
        self.scale = alpha_scale(lora_name, self.params, self.dim, self.warnings)
        self.needs_base_weight = True

    def _check(self) -> None:
        L, r, name, p = self.layer, self.dim, self.lora_name, self.params
        expect_shape(name, "a1.weight", p["a1.weight"], (L.in_features, r, *L.ones))
        expect_shape(name, "a2.weight", p["a2.weight"], (r, L.in_features, *L.ones))
        expect_shape(name, "b1.weight", p["b1.weight"], (L.out_features, r, *L.ones))
        if "bm.weight" in p:
            if not L.is_conv or all(k == 1 for k in L.kernel_size):
                fail(name, "bm.weight", "a Tucker mid only exists for convs with a kernel larger than 1")
            expect_shape(name, "b2.weight", p["b2.weight"], (r, L.in_features, *L.ones))
            expect_shape(name, "bm.weight", p["bm.weight"], (r, r, *L.kernel_size))
        else:
            expect_shape(name, "b2.weight", p["b2.weight"], (r, L.in_features, *L.kernel_size))

    def delta_macs(self, tokens, pass_macs=PASS_MACS):
        L = self.layer
        # W a1 once per call, then x through a2, (W a1) and the b chain: rank-sized products.
        return float(self.dim) * self._weight_numel() + float(tokens) * self.dim * 2 * (L.in_features + L.out_features)

    def rebuild_macs(self):
        return 2.0 * self.dim * self._weight_numel()

    def _delta_output(self, x, base_weight, rank_mask):
        L = self.layer
        weight = base_weight.to(device=x.device, dtype=x.dtype)
        a1 = self._p("a1.weight", x).reshape(L.in_features, self.dim)
        w_a1 = torch.einsum("o i ..., i j -> o j ...", weight, a1) if L.is_conv else weight @ a1
        a_path = L.apply(L.pointwise(x, self._p("a2.weight", x)), w_a1)
        b_path = locon.bypass_forward_diff(x, None, self._p("b2.weight", x), self._p("b1.weight", x),
                                           self._p("bm.weight", x), gamma=1.0, extra_args=L.conv_kwargs,
                                           backend=KERNEL_BACKEND)
        return (a_path + b_path) * self.scale

    def _delta_weight(self, w32, strength, rank_mask):
        keys = ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight")
        dw = _glora_weight(w32, *(self._p32(k, w32) for k in keys), self.scale)
        return dw.reshape(self.layer.weight_shape) * strength, None
