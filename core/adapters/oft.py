"""Diag-OFT and BOFT (`oft_blocks` 3-d / 4-d, optional `rescale`, `alpha` = constraint).

Both rotate the base weight's output rows: W' = R^T W block-wise (BOFT: a product of butterfly
stages), with R the Cayley transform of the skew part of each block, the norm of the skew part
capped at constraint * out_features when the constraint is > 0. Strength follows LyCORIS's
rebuild forward:
- diag-OFT: W' = rescale * (W + s (R^T - I) W), linear in s without `rescale` (with it, s = 0
  still leaves W * rescale);
- BOFT: every stage is interpolated, B_i(s) = s R_i + (1 - s) I, so W' is a polynomial in s
  (linear only with a single stage and no rescale).
The delta never touches the bias (LyCORIS's bypass rotates the bias too; its rebuild does not).
"""

from __future__ import annotations

import torch
from lycoris.functional import boft, diag_oft

from .base import KERNEL_BACKEND, LayerSpec, ModuleAdapter, expect_shape, fail, require, scalar_value


class _OFTBase(ModuleAdapter):
    KEYS = ("oft_blocks", "rescale", "alpha")

    def __init__(self, lora_name: str, layer: LayerSpec, params: dict[str, torch.Tensor]):
        super().__init__(lora_name, layer, params)
        require(lora_name, self.params, "oft_blocks")
        constraint = 0.0
        if "alpha" in self.params:
            constraint = scalar_value(lora_name, "alpha", self.params["alpha"])
        self.constraint = constraint * layer.out_features  # LyCORIS saves the per-row constraint as alpha
        if "rescale" in self.params:
            expect_shape(lora_name, "rescale", self.params["rescale"], (layer.out_features, 1, *layer.ones))
        self.rescaled = "rescale" in self.params
        self.needs_base_weight = True

    def _base_output(self, x, base_weight):
        """The layer's output without its bias, in x's dtype."""
        return self.layer.apply(x, base_weight.to(device=x.device, dtype=x.dtype))


class DiagOFTAdapter(_OFTBase):
    algo = "diag-oft"

    def __init__(self, lora_name: str, layer: LayerSpec, params: dict[str, torch.Tensor]):
        super().__init__(lora_name, layer, params)
        blocks = self.params["oft_blocks"]
        if blocks.ndim != 3 or blocks.shape[1] != blocks.shape[2]:
            fail(lora_name, "oft_blocks", f"expected (blocks, size, size), got shape {tuple(blocks.shape)}")
        n, s = int(blocks.shape[0]), int(blocks.shape[1])
        if n * s != layer.out_features:
            fail(lora_name, "oft_blocks", f"expected blocks x size = {layer.out_features} out features, "
                                          f"got shape {tuple(blocks.shape)}")
        self.linear_in_strength = not self.rescaled

    def _delta_output(self, x, base_weight, rank_mask):
        y = self._base_output(x, base_weight)
        delta = diag_oft.bypass_forward_diff(x, y, self._p("oft_blocks", x), None, constraint=self.constraint,
                                             need_transpose=self.layer.is_conv, backend=KERNEL_BACKEND)
        return delta.to(x.dtype)

    def _delta_weight(self, w32, strength, rank_mask):
        d = diag_oft.diff_weight(w32, self._p32("oft_blocks", w32), None, constraint=self.constraint,
                                 backend=KERNEL_BACKEND)  # (R^T - I) W, block-wise
        if not self.rescaled:
            return d * strength, None
        return self._p32("rescale", w32) * (w32 + d * strength) - w32, None


class BOFTAdapter(_OFTBase):
    algo = "boft"

    def __init__(self, lora_name: str, layer: LayerSpec, params: dict[str, torch.Tensor]):
        super().__init__(lora_name, layer, params)
        blocks = self.params["oft_blocks"]
        if blocks.ndim != 4 or blocks.shape[2] != blocks.shape[3]:
            fail(lora_name, "oft_blocks", f"expected (stages, blocks, size, size), got shape {tuple(blocks.shape)}")
        m, n, b = (int(v) for v in blocks.shape[:3])
        span = b * 2 ** (m - 1)  # the widest butterfly stage mixes rows within spans of this size
        if n * b != layer.out_features or b % 2 or layer.out_features % span:
            fail(lora_name, "oft_blocks", f"shape {tuple(blocks.shape)} is not a butterfly of "
                                          f"{layer.out_features} out features (blocks x size = out, size even, "
                                          f"size * 2^(stages-1) dividing out)")
        self.linear_in_strength = m == 1 and not self.rescaled

    def _delta_output(self, x, base_weight, rank_mask):
        y = self._base_output(x, base_weight)
        delta = boft.bypass_forward_diff(y, self._p("oft_blocks", x), None, constraint=self.constraint,
                                         need_transpose=self.layer.is_conv, scale=1, backend=KERNEL_BACKEND)
        return delta.to(x.dtype)

    def _delta_weight(self, w32, strength, rank_mask):
        dw = boft.diff_weight(w32, self._p32("oft_blocks", w32), self._p32("rescale", w32),
                              constraint=self.constraint, scale=strength, backend=KERNEL_BACKEND)
        return dw, None
