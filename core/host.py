"""The one boundary between the core and ComfyUI.

Every `comfy.*` import of the core lives here, imported lazily inside functions, so the rest of
the core (and its unit tests) runs without a ComfyUI on the path.
"""

from __future__ import annotations

from typing import Any

import torch

from .tiny import TINY_POOLED_DIM, TinySizes, seed_parameters, text_embedding, unet_config

_SUPPORTED_CLASS = {"flux2": "Flux2", "flux1": "Flux", "sdxl": "SDXL"}


def comfyui_version() -> str:
    """The version string of the ComfyUI this process runs in."""
    import comfyui_version  # ComfyUI's root module

    return comfyui_version.__version__


def build_tiny_model(sizes: TinySizes, dtype: torch.dtype = torch.float32) -> Any:
    """A tiny seeded model of `sizes.family` as a ComfyUI ModelPatcher (a `MODEL`).

    Built through `comfy.supported_models` directly: model detection cannot load small models.
    """
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = getattr(comfy.supported_models, _SUPPORTED_CLASS[sizes.family])(unet_config(sizes))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    seed_parameters(model.diffusion_model, sizes.seed)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def model_family(model: Any) -> str:
    """'flux2', 'flux1' or 'sdxl' for a ComfyUI MODEL; ValueError naming the model otherwise."""
    cfg = model.model.model_config.unet_config
    image_model = cfg.get("image_model")
    if image_model == "flux2":
        return "flux2"
    if image_model == "flux":
        return "flux1"
    if cfg.get("adm_in_channels") == 2816 and cfg.get("context_dim") is not None:
        return "sdxl"
    raise ValueError(f"model: {type(model.model).__name__} is not a Flux 1, Flux 2 or SDXL model")


def tiny_conditioning(model: Any, text: str, tokens: int) -> list:
    """CONDITIONING for `model` from the deterministic tiny text embedding of `text`."""
    family = model_family(model)
    cfg = model.model.model_config.unet_config
    dim = cfg["context_dim"] if family == "sdxl" else cfg["context_in_dim"]
    cond, pooled = text_embedding(text, tokens, dim, TINY_POOLED_DIM[family])
    return [[cond, {"pooled_output": pooled}]]
