"""The pack's Python API, for scripts and other tools (the nodes call exactly these).

    from <pack>.core import api
    adapter = api.load_adapter("my_lokr.safetensors", model)      # model: a ComfyUI MODEL (ModelPatcher)
    half = api.apply(model, adapter, 0.5)                          # bypass, base weights untouched
    merged, warnings = api.merge(model, adapter, 1.0)              # exact ΔW through ComfyUI patches
    api.save_adapter(adapter, "/path/to/loras", "copy_of_my_lokr")  # LyCORIS/SimpleTuner file
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

from . import host
from .adapter_file import adapter_metadata, free_adapter_name, write_adapter
from .adapter_set import AdapterMismatchError, LoadedAdapter, architecture_key, load
from .merge import merge_patches
from .strength_shape import BlockSpec, Schedule, StrengthShapeError, resolve_blocks


def load_adapter(path: str | Path, model: Any, strict: bool = False, tlora_min_rank: int | None = None,
                 tlora_alpha: float | None = None) -> LoadedAdapter:
    """Read an adapter file and bind it to `model`'s family and layers.

    `tlora_min_rank` / `tlora_alpha`: the T-LoRA schedule, when the file does not say it (SimpleTuner's
    final file without its lycoris_config.json) or to override it; None = from the file."""
    return load(path, host.model_unet_config(model), strict=strict, tlora_min_rank=tlora_min_rank,
                tlora_alpha=tlora_alpha)


def _check_fits(model: Any, adapter: LoadedAdapter) -> None:
    architecture = getattr(adapter, "architecture", None)
    if architecture is not None and architecture != architecture_key(host.model_unet_config(model)):
        raise AdapterMismatchError(
            f"adapter '{adapter.name}' was loaded for another {adapter.family} architecture than this model; "
            "load it against this model")


class StrengthError(ValueError):
    """A strength that is not a finite number; the message starts with the input's name."""


def check_strength(value: Any, input_name: str = "strength") -> float:
    """`value` as a float, or StrengthError: NaN and infinities are refused (ComfyUI's range check lets NaN by)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise StrengthError(f"{input_name}: must be a finite number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise StrengthError(f"{input_name}: must be a finite number, got {float(value)}")
    return float(value)


def apply(model: Any, adapter: LoadedAdapter, strength: float, blocks: BlockSpec | None = None,
          schedule: Sequence[tuple[float, float]] | None = None) -> Any:
    """A clone of `model` running `adapter` at `strength` (bypass).

    `blocks`: ordered {fnmatch pattern over the ComfyUI module path: multiplier}; a module takes the
    first match's multiplier (none: 1.0); a pattern matching no adapted module is an error.
    `schedule`: keyframes [(percent, multiplier), ...] over ComfyUI's sampling percent (0 = start,
    highest noise; 1 = end), linear in between, constant outside, evaluated per sample from its
    sigma. Effective strength per module and sample: strength x block multiplier x schedule multiplier.
    """
    return apply_sweep(model, adapter, (check_strength(strength),), blocks=blocks, schedule=schedule)


def apply_sweep(model: Any, adapter: LoadedAdapter, strengths: Sequence[float], blocks: BlockSpec | None = None,
                schedule: Sequence[tuple[float, float]] | None = None) -> Any:
    """A clone where latent sample i (of each CFG chunk) uses strengths[i % len(strengths)]; `blocks` and
    `schedule` as in `apply`."""
    values = tuple(check_strength(s, "strengths" if len(strengths) > 1 else "strength") for s in strengths)
    if not values:
        raise StrengthError("strengths: give at least one strength")
    _check_fits(model, adapter)
    return host.attach_application(model, adapter.application(values, *_shape(model, adapter, blocks, schedule)))


def _shape(model: Any, adapter: LoadedAdapter, blocks: BlockSpec | None,
           schedule: Sequence[tuple[float, float]] | None) -> tuple[dict[str, float] | None, Any]:
    """(multiplier per adapted ComfyUI module or None, the schedule bound to `model`'s sampling or None)."""
    multipliers = resolve_blocks(blocks, adapter.by_comfy_module()) or None
    bound = None if schedule is None else Schedule.of(schedule).bind(host.percent_to_sigma(model))
    return multipliers, bound


@dataclass(frozen=True)
class Variant:
    """One look of an adapter for `apply_variants`: a strength, block multipliers and a schedule."""

    name: str
    strength: float = 1.0
    blocks: BlockSpec | None = None
    schedule: Sequence[tuple[float, float]] | None = None


def apply_variants(model: Any, adapter: LoadedAdapter, variants: Sequence[Variant]) -> Any:
    """A clone where latent sample i (of each CFG chunk) runs variants[i % len(variants)]: several looks in one
    sampler run, each exactly as `apply` would give it, at no weight work."""
    if not variants:
        raise StrengthError("variants: give at least one variant")
    _check_fits(model, adapter)
    names = [variant.name for variant in variants]
    for name in names:
        if names.count(name) > 1:
            raise StrengthError(f"variants: two variants are named '{name}'; give each its own name")
    clone = model
    for i, variant in enumerate(variants):
        strength = check_strength(variant.strength, f"variants: '{variant.name}' strength")
        try:
            shape = _shape(model, adapter, variant.blocks, variant.schedule)
        except StrengthShapeError as err:
            raise StrengthShapeError(f"variants: '{variant.name}': {err}") from None
        strengths = tuple(strength if j == i else 0.0 for j in range(len(variants)))
        clone = host.attach_application(clone, adapter.application(strengths, *shape))
    return clone


def merge(model: Any, adapter: LoadedAdapter, strength: float, tlora_timestep: int | None = None,
          blocks: BlockSpec | None = None, schedule: object = None) -> tuple[Any, list[str]]:
    """A clone of `model` with strength x block multiplier x ΔW patched in (ComfyUI restores the base on
    unpatch). `blocks` as in `apply`; a schedule cannot be merged (its strength changes during sampling)."""
    strength = check_strength(strength)
    if schedule is not None:
        raise StrengthShapeError("schedule: a strength schedule cannot be merged into weights (it changes during "
                                 "sampling); use Apply LyCORIS, or merge at one strength")
    _check_fits(model, adapter)
    params = dict(model.model.diffusion_model.named_parameters())
    multipliers = resolve_blocks(blocks, adapter.by_comfy_module())
    patches, warnings = merge_patches(adapter, strength, lambda key: host.comfy_weight(model, key),
                                      tlora_timestep, has_param=lambda key: key in params, multipliers=multipliers)
    return host.merge_patches(model, patches), warnings


def adapter_tensors(adapter: LoadedAdapter) -> dict:
    """The adapter as a LyCORIS state dict: lycoris_<path>.<param> -> tensor."""
    out = {}
    for binding in adapter.bindings.values():
        for param, tensor in binding.adapter.state_dict().items():
            out[f"{binding.adapter.lora_name}.{param}"] = tensor.detach().to("cpu").contiguous()
    return out


def save_adapter(adapter: LoadedAdapter, folder: str | Path, name: str, overwrite: bool = False,
                 input_name: str = "name") -> Path:
    """Write `adapter` as a LyCORIS/SimpleTuner .safetensors file inside `folder` (atomic).

    An existing file is replaced only with `overwrite`; otherwise the next free `name_00001` is used.
    An unsafe `name` (core.paths) raises an error starting with `input_name` before anything is written.
    """
    if not overwrite:
        name = free_adapter_name(folder, name, input_name)
    config_json = adapter.config.to_json() if adapter.config is not None else adapter.metadata.get("lycoris_config", "{}")
    extra = {}
    settings = getattr(adapter, "tlora_settings", None)
    if adapter.tlora is not None and (settings is None or settings.known):  # never record a guessed schedule
        extra.update(tlora_min_rank=adapter.tlora.min_rank, tlora_alpha=adapter.tlora.alpha)
    metadata = adapter_metadata(config_json, adapter.family, ",".join(adapter.algos), extra)
    return write_adapter(Path(folder), name, adapter_tensors(adapter), metadata, overwrite=overwrite,
                         input_name=input_name)


def describe(adapter: LoadedAdapter) -> str:
    """Text for the Load node: what matched, algorithms, warnings."""
    lines = [f"{adapter.name}: {adapter.report}", f"family {adapter.family}; algorithms: {', '.join(adapter.algos)}"]
    if adapter.tlora is not None:
        settings = getattr(adapter, "tlora_settings", None)
        if settings is not None and not settings.known:
            lines.append(f"T-LoRA schedule unknown: sampling with min rank {adapter.tlora.min_rank}, alpha "
                         f"{adapter.tlora.alpha:g} (SimpleTuner's defaults); set tlora_min_rank / tlora_alpha")
        else:
            where = f" ({settings.source})" if settings is not None else ""
            width = f"; mask width linear_dim {settings.linear_dim}" if settings and settings.linear_dim else ""
            lines.append(f"T-LoRA: min rank {adapter.tlora.min_rank}, alpha {adapter.tlora.alpha:g}{where}{width}")
    lines += [f"warning: {w}" for w in adapter.warnings]
    return "\n".join(lines)
