"""The models and inputs every benchmark runs: Flux 2-layout tiny models, 256 image + 32 text tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comfyui_lycoris.core import host
from comfyui_lycoris.core.tiny import TinySizes

# FACTS.md §6: "hidden 512, 2+4 blocks, 33 M params" and "hidden 1024, 4+8 blocks, 239 M params".
MODELS = {
    "flux2-33M": TinySizes(family="flux2", width=512, heads=4, depth=2, single_depth=4, context_dim=512, seed=0),
    "flux2-239M": TinySizes(family="flux2", width=1024, heads=8, depth=4, single_depth=8, context_dim=512, seed=0),
}
LATENT = (128, 16, 16)  # a 16x16 Flux 2 latent with 128 channels: 256 image tokens (patch size 1)
TEXT_TOKENS = 32
SIGMA, GUIDANCE = 0.7, 3.5


@dataclass
class Workload:
    name: str
    patcher: object  # the base ComfyUI ModelPatcher
    unet_config: dict
    params: int

    def inputs(self, batch: int) -> dict:
        """Seeded inputs for a batch (the same first sample at any batch size)."""
        gen = torch.Generator().manual_seed(1234)
        x = torch.randn(1, *LATENT, generator=gen).repeat(batch, 1, 1, 1)
        context = torch.randn(1, TEXT_TOKENS, self.unet_config["context_in_dim"], generator=gen).repeat(batch, 1, 1)
        return dict(x=x, context=context, sigma=torch.full((batch,), SIGMA), guidance=torch.full((batch,), GUIDANCE))


def build(name: str) -> Workload:
    patcher = host.build_tiny_model(MODELS[name])
    patcher.model.diffusion_model.eval()
    params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    return Workload(name, patcher, dict(host.model_unet_config(patcher)), params)


def forward(patcher, inputs: dict, chunks: int = 1) -> torch.Tensor:
    """ComfyUI's apply_model of `patcher` with its wrappers, as a sampler calls it.

    The same call as tests/model_pairs.py `Pair.comfy_denoised`: the patcher's transformer
    options plus its wrappers, `cond_or_uncond` naming the CFG chunks of the batch.
    """
    options = dict(patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = patcher.wrappers
    options["cond_or_uncond"] = list(range(chunks))
    with torch.no_grad():
        return patcher.model.apply_model(inputs["x"], inputs["sigma"], c_crossattn=inputs["context"],
                                         guidance=inputs["guidance"], transformer_options=options)
