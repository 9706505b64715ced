"""Model-family profiles: Flux 2, Flux 1, SDXL. See `base.py` for what a profile says."""

from __future__ import annotations

from .base import FamilyProfile, Route, RowBlock
from .flux1 import PROFILE as FLUX1
from .flux2 import PROFILE as FLUX2
from .sdxl import PROFILE as SDXL

PROFILES: tuple[FamilyProfile, ...] = (FLUX2, FLUX1, SDXL)


def profile_for(unet_config: dict) -> FamilyProfile:
    """The profile of a ComfyUI model's `unet_config`; ValueError naming what it looks like."""
    for profile in PROFILES:
        if profile.matches(unet_config):
            return profile
    kind = unet_config.get("image_model") or f"UNet (context_dim={unet_config.get('context_dim')})"
    names = ", ".join(p.display_name for p in PROFILES)
    raise ValueError(f"model: a {kind} model is not supported; supported families: {names}")


def profile_named(name: str) -> FamilyProfile:
    for profile in PROFILES:
        if profile.name == name:
            return profile
    raise ValueError(f"family: '{name}' is not one of {', '.join(p.name for p in PROFILES)}")


__all__ = ["FamilyProfile", "Route", "RowBlock", "PROFILES", "profile_for", "profile_named"]
