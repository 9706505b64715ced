"""Full (`diff`, `diff_b`) and IA3 (`weight`, `on_input`): adapters shaped like the layer itself.

IA3 follows LyCORIS's rebuild forward: W' = W * (1 + strength * w) along the input or output
channel axis, with the bias untouched (its bypass scales the layer's whole output, bias included,
which the rebuild does not). Both are linear in the strength; IA3 needs the base weight.
"""

from __future__ import annotations

import torch
from lycoris.modules.ia3 import _ia3_weight

from .base import LayerSpec, ModuleAdapter, expect_shape, fail, require, scalar_value


class FullAdapter(ModuleAdapter):
    algo = "full"
    KEYS = ("diff", "diff_b")

    def __init__(self, lora_name: str, layer: LayerSpec, params: dict[str, torch.Tensor]):
        super().__init__(lora_name, layer, params)
        expect_shape(lora_name, "diff", require(lora_name, self.params, "diff"), layer.weight_shape)
        if "diff_b" in self.params:
            expect_shape(lora_name, "diff_b", self.params["diff_b"], (layer.out_features,))

    def _delta_output(self, x, base_weight, rank_mask):
        return self.layer.apply(x, self._p("diff", x), self._p("diff_b", x))

    def _delta_weight(self, w32, strength, rank_mask):
        db = self._p32("diff_b", w32)
        return self._p32("diff", w32) * strength, (None if db is None else db * strength)

    def rebuild_passes(self):
        return 1.0

    def weight_writer(self, like, strength, base_weight=None):
        """dst = src + strength * diff rows (and Δbias = strength * diff_b)."""
        diff, diff_b = self._p("diff", like), self._p("diff_b", like)
        strength = float(strength)

        def write(dst, src, d, n):
            rows = diff[d : d + n]
            if src is None:
                dst.add_(rows, alpha=strength)
            else:
                torch.add(src, rows, alpha=strength, out=dst)

        return write, (None if diff_b is None else diff_b * strength)


class IA3Adapter(ModuleAdapter):
    algo = "ia3"
    KEYS = ("weight", "on_input")

    def __init__(self, lora_name: str, layer: LayerSpec, params: dict[str, torch.Tensor]):
        super().__init__(lora_name, layer, params)
        weight = require(lora_name, self.params, "weight")
        self.on_input = False
        if "on_input" in self.params:
            self.on_input = bool(scalar_value(lora_name, "on_input", self.params["on_input"]))
        if self.on_input and layer.groups != 1:
            fail(lora_name, "on_input", "IA3 on the input of a grouped conv is not supported (LyCORIS neither)")
        channels = layer.in_features * layer.groups if self.on_input else layer.out_features
        expected = (1, channels, *layer.ones) if layer.is_conv else (channels,)
        expect_shape(lora_name, "weight", weight, expected)
        self.needs_base_weight = True

    def _delta_output(self, x, base_weight, rank_mask):
        w, weight = self._p("weight", x), base_weight.to(device=x.device, dtype=x.dtype)
        if self.on_input:
            return self.layer.apply(x * w, weight)
        return self.layer.apply(x, weight) * w

    def _delta_weight(self, w32, strength, rank_mask):
        merged = _ia3_weight(w32, self._p32("weight", w32), self.on_input, strength, False)
        return merged - w32, None
