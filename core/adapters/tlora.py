"""T-LoRA (`q_layer.weight`, `p_layer.weight`, `lambda_layer`, `alpha`, optional frozen base).

ΔW = scale * s * (P diag(λ ⊙ m) Q - P_b diag(λ_b ⊙ m) Q_b), scale = alpha / rank, m the rank mask
(1 for every rank when None). Exactly LyCORIS's rebuild (`get_diff_weight`) and bypass, except
that the mask here may differ per sample ([B, rank]); LyCORIS keeps one process-global mask.

The frozen base (P_b, Q_b, λ_b) is what LyCORIS's SVD init gave at training time. LyCORIS saves
only q/p/lambda/alpha and re-derives the base at load by an SVD of the layer's weight
(sig_type 'principal', data init); files this pack writes store `base_q/base_p/base_lambda`.
Without them the base is re-derived here the same way, on the first call that passes the base
weight. T-LoRA works on Linear and 1x1 convs only: on a larger kernel LyCORIS's bypass crashes
and its merge places the 1x1 delta at a kernel corner.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lycoris.functional.locon import diff_weight as lora_diff_weight

from .base import KERNEL_BACKEND, PASS_MACS, LayerSpec, ModuleAdapter, alpha_scale, expect_shape, fail, require

_BASE = ("base_q", "base_p", "base_lambda")


def svd_base(weight: torch.Tensor, rank: int, layer: LayerSpec) -> dict[str, torch.Tensor]:
    """LyCORIS's `_initialize_from_svd` (principal, data init): the top-`rank` SVD triplets of W."""
    out = layer.out_features
    u, s, vh = torch.linalg.svd(weight.detach().float().reshape(out, -1), full_matrices=False)
    q, p, lam = vh[:rank], u[:, :rank], s[:rank]
    if q.shape[0] < rank:  # fewer singular values than the rank: LyCORIS pads
        pad = rank - q.shape[0]
        q, p, lam = F.pad(q, (0, 0, 0, pad)), F.pad(p, (0, pad)), F.pad(lam, (0, pad), value=1e-6)
    q = q[:, : layer.in_features].reshape(rank, layer.in_features, *layer.ones).contiguous()
    p = p[:out].reshape(out, rank, *layer.ones).contiguous()
    return {"base_q": q, "base_p": p, "base_lambda": lam.unsqueeze(0).contiguous()}


class TLoRAAdapter(ModuleAdapter):
    algo = "tlora"
    KEYS = ("q_layer.weight", "p_layer.weight", "lambda_layer", "alpha", *_BASE)

    def __init__(self, lora_name: str, layer: LayerSpec, params: dict[str, torch.Tensor]):
        super().__init__(lora_name, layer, params)
        if layer.is_conv and (layer.groups != 1 or any(k != 1 for k in layer.kernel_size)):
            fail(lora_name, "q_layer.weight", f"T-LoRA works on Linear and 1x1 convs only, not on a conv with "
                                              f"kernel {layer.kernel_size} and groups {layer.groups}")
        q = require(lora_name, self.params, "q_layer.weight")
        if q.ndim < 2:
            fail(lora_name, "q_layer.weight", f"expected a 2-d or conv weight, got shape {tuple(q.shape)}")
        self.rank = int(q.shape[0])
        self.scale = alpha_scale(lora_name, self.params, self.rank, self.warnings)
        self._check("q_layer.weight", "p_layer.weight", "lambda_layer")
        stored = [k for k in _BASE if k in self.params]
        if stored and len(stored) < len(_BASE):
            require(lora_name, self.params, next(k for k in _BASE if k not in self.params),
                    "base_q, base_p and base_lambda are stored together")
        if stored:
            self._check(*_BASE)
        else:
            self.needs_base_weight = True
            self.warnings.append(f"{lora_name}: T-LoRA base (base_q/base_p/base_lambda) not stored; re-derived "
                                 "by an SVD of the layer's base weight, as LyCORIS does at load (right only if "
                                 "training used sig_type 'principal' with data init on the same weights)")
        self._cat: dict = {}  # (device, dtype) -> concatenated factors, only while none requires grad

    def _check(self, q_key: str, p_key: str, lam_key: str) -> None:
        L, r, name, p = self.layer, self.rank, self.lora_name, self.params
        expect_shape(name, q_key, require(name, p, q_key), (r, L.in_features, *L.ones))
        expect_shape(name, p_key, require(name, p, p_key), (L.out_features, r, *L.ones))
        expect_shape(name, lam_key, require(name, p, lam_key), (1, r))

    def _moved(self) -> None:
        self._cat = {}

    @property
    def can_rebuild(self) -> bool:
        return False  # the rank mask differs per sample: always the bypass chain

    def delta_macs(self, tokens, pass_macs=PASS_MACS):
        return float(tokens) * 2 * self.rank * (self.layer.in_features + self.layer.out_features)

    def _ensure_base(self, base_weight: torch.Tensor | None) -> None:
        if not self.needs_base_weight:
            return
        if base_weight is None:
            raise ValueError(f"{self.lora_name}: T-LoRA without a stored base needs the layer's base weight")
        like = self.params["q_layer.weight"]
        for key, tensor in svd_base(base_weight, self.rank, self.layer).items():
            self.params[key] = tensor.to(device=like.device, dtype=like.dtype)
        self.needs_base_weight = False
        self.release_placements()

    def _mask(self, rank_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        if rank_mask is None:
            return None
        mask = rank_mask.to(device=like.device, dtype=like.dtype)
        mask = mask.unsqueeze(0) if mask.ndim == 1 else mask
        if mask.ndim != 2 or mask.shape[1] != self.rank:
            raise ValueError(f"{self.lora_name}: rank_mask must be [batch, {self.rank}], got {tuple(rank_mask.shape)}")
        return mask

    def _concat(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[Q; Q_b], [P, P_b] and scale * [λ, -λ_b]: current and base paths as one rank-2r chain.

        Cached per (device, dtype) unless a tensor requires grad (then built per call, in the graph).
        """
        key = (x.device, x.dtype)
        cached = self._cat.get(key)
        if cached is not None:
            return cached
        q = torch.cat([self._p("q_layer.weight", x), self._p("base_q", x)])
        p = torch.cat([self._p("p_layer.weight", x), self._p("base_p", x)], dim=1)
        lam = torch.cat([self._p("lambda_layer", x), -self._p("base_lambda", x)], dim=1) * self.scale
        if not any(t.requires_grad for t in self.params.values()):
            self._cat[key] = (q, p, lam)
        return q, p, lam

    def delta_output(self, x, base_weight=None, rank_mask=None):
        self._ensure_base(base_weight)
        return super().delta_output(x, base_weight, rank_mask)

    def _delta_output(self, x, base_weight, rank_mask):
        q, p, lam = self._concat(x)
        mask = self._mask(rank_mask, x)
        if mask is not None:
            if mask.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"{self.lora_name}: rank_mask has {mask.shape[0]} rows for a batch of {x.shape[0]}")
            lam = lam * torch.cat([mask, mask], dim=1)  # (B or 1, 2r)
        h = self.layer.apply(x, q)  # conv: the layer's geometry on the 1x1 down step, as LyCORIS
        shape = (lam.shape[0], -1, *[1] * (h.ndim - 2)) if self.layer.is_conv else \
            (lam.shape[0], *[1] * (h.ndim - 2), -1)
        h = h * lam.reshape(shape) if h.ndim > 1 else h * lam[0]
        return self.layer.pointwise(h, p)

    def _product(self, q_key: str, p_key: str, lam_key: str, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """P diag(λ ⊙ mask) Q as LyCORIS's get_diff_weight builds it (float32, 2-d)."""
        r = self.rank
        lam = self._p32(lam_key, like) * mask
        return lora_diff_weight(lam.T * self._p32(q_key, like).reshape(r, -1), self._p32(p_key, like).reshape(-1, r),
                                None, backend=KERNEL_BACKEND)

    def _delta_weight(self, w32, strength, rank_mask):
        self._ensure_base(w32)
        mask = self._mask(rank_mask, w32)
        if mask is not None and mask.shape[0] != 1:
            raise ValueError(f"{self.lora_name}: a weight takes one rank mask row, got {tuple(mask.shape)}")
        mask = torch.ones(1, self.rank, device=w32.device) if mask is None else mask
        curr = self._product("q_layer.weight", "p_layer.weight", "lambda_layer", mask, w32)
        base = self._product("base_q", "base_p", "base_lambda", mask, w32)
        return ((curr - base) * (self.scale * strength)).reshape(self.layer.weight_shape), None
