"""Checks at submit time: does this config, on this model, with this data, train what its author meant?

`preflight` is what Train LyCORIS and Export LyCORIS Job run before they queue or write anything:
it raises `PreflightError` (a ValueError whose message starts with the input or field at fault)
for what cannot work, and returns warnings for what probably does not do what was meant. The
LyCORIS Plan node shows the same findings without raising (`review`). Everything here takes
plain values (a `unet_config`, a latent channel count), so it stays ComfyUI-free.

Errors:
- the config adapts no layer of the model (`plan_for`'s error, naming the model's classes);
- latents with another channel count than the model's (e.g. 4-channel SDXL latents for Flux 2),
  conditioning of another width than the model's text input or pooled vector;
- a low-rank adapter whose rank exceeds a targeted layer's width (rank <= min(in, out));
- an adapter bigger than `MAX_MODEL_MULTIPLE` x the model or `MAX_ADAPTER_BYTES` (e.g. linear_dim
  99999999999), with the size it would take.
Warnings: the plan's (config keys, target classes or names that match nothing, FeedForward on
SDXL), LoKr ranks that LyCORIS silently turns into full matrices, an adapter bigger than the
model, a batch size no size bucket can fill.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..core.config import ConfigError, LycorisConfig, parse_config
from ..core.dropout import DropoutError, DropoutSettings
from ..core.families import profile_for
from ..core.lycoris_modules import adapter_param_shapes
from ..core.plan_report import size_text
from ..core.targets import Plan, PlannedTarget, plan_for, skeleton_for

MAX_ADAPTER_BYTES = 1 << 40  # 1 TiB
MAX_MODEL_MULTIPLE = 4  # an adapter may be at most this many times the model's parameter count

# Channels of the ComfyUI LATENT each family takes (its latent_format.latent_channels).
LATENT_CHANNELS = {"flux2": 128, "flux1": 16, "sdxl": 4}
_LATENT_NAMES = {4: "an SDXL / SD 1.x latent", 16: "a Flux 1 / SD3 latent", 128: "a Flux 2 latent"}

# Algorithms whose `dim` is a matrix rank: more than min(in, out) only adds redundant parameters.
LOW_RANK_ALGOS = ("lora", "locon", "loha", "tlora", "dylora", "glora")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PreflightError(ValueError):
    """Model, data and config cannot train together; the message starts with the input or field."""


@dataclass(frozen=True)
class Review:
    """Everything preflight finds, without raising (for display)."""

    plan: Plan
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    adapter_params: int
    adapter_bytes: int
    model_params: int


def _config(config: LycorisConfig | str | Mapping[str, Any]) -> LycorisConfig:
    return config if isinstance(config, LycorisConfig) else parse_config(config)


# -- which field set a target's dim ---------------------------------------------------------

def _matches(pattern: str, name: str, use_fnmatch: bool) -> bool:
    return name == pattern or (fnmatch.fnmatch(name, pattern) if use_fnmatch else bool(re.match(pattern, name)))


def dim_field(target: PlannedTarget, config: LycorisConfig) -> str:
    """The config field that gave `target` its dim (an override's `dim`, conv_dim or linear_dim)."""
    preset = config.preset
    if target.owner_class == "name":
        for key, entry in preset.name_algo_map.items():
            if "dim" in entry and _matches(key, target.path, preset.use_fnmatch):
                return f"apply_preset.name_algo_map['{key}'].dim"
    if "dim" in preset.module_algo_map.get(target.owner_class, {}):
        return f"apply_preset.module_algo_map.{target.owner_class}.dim"
    if len(target.weight_shape) > 2 and math.prod(target.weight_shape[2:]) > 1 and "conv_dim" in config.keywords:
        return "conv_dim"
    return "linear_dim"


def layer_rank_limit(target: PlannedTarget) -> int:
    """The largest useful rank of the target's layer: min(out, in x kernel)."""
    out_dim, *rest = target.weight_shape
    return min(out_dim, math.prod(rest))


# -- checks ---------------------------------------------------------------------------------

def _grouped(targets: list[PlannedTarget], config: LycorisConfig) -> dict[str, list[PlannedTarget]]:
    out: dict[str, list[PlannedTarget]] = {}
    for t in targets:
        out.setdefault(dim_field(t, config), []).append(t)
    return out


def _rank_findings(plan: Plan, config: LycorisConfig) -> tuple[list[str], list[str]]:
    """Low-rank ranks beyond a layer's width: an error when no layer of that field can hold the rank,
    a warning when only some cannot (LyCORIS and SimpleTuner train them, with parameters that add nothing:
    e.g. SDXL's 4-channel conv_out under a config without apply_preset)."""
    over = [t for t in plan.targets if t.algo in LOW_RANK_ALGOS and t.dim > layer_rank_limit(t)]
    errors, warnings = [], []
    by_field = _grouped(plan.targets, config)
    for field_name, targets in _grouped(over, config).items():
        limit = min(layer_rank_limit(t) for t in targets)
        shown = ", ".join(f"{t.path} ({'x'.join(map(str, t.weight_shape))}: rank at most {layer_rank_limit(t)})"
                          for t in targets[:3])
        more = f" and {len(targets) - 3} more" if len(targets) > 3 else ""
        every = len(targets) == len(by_field[field_name])
        (errors if every else warnings).append(
            f"{field_name}: rank {targets[0].dim} is more than {len(targets)} of the {len(plan.targets)} adapted "
            f"layers can hold (a {targets[0].algo} rank is at most min(out, in) of its layer): {shown}{more}. "
            f"Use {field_name} {limit} or less, give those layers their own dim (apply_preset.module_algo_map / "
            "name_algo_map), or leave them out (apply_preset.exclude_name)")
    return errors, warnings


def _lokr_clamp_warnings(plan: Plan, config: LycorisConfig, shapes: dict[str, dict]) -> list[str]:
    """LyCORIS makes LoKr's w2 full when dim >= half its size (only logging it); alpha then stops counting."""
    lokr = [t for t in plan.targets if t.algo == "lokr" and not t.module_kwargs.get("full_matrix")]
    clamped = [t for t in lokr if "lokr_w2" in shapes[t.lora_name]]
    warnings = []
    for field_name, targets in _grouped(clamped, config).items():
        t = targets[0]
        w2 = "x".join(map(str, shapes[t.lora_name]["lokr_w2"]))
        scale_one = all("lokr_w1" in shapes[x.lora_name] for x in targets)
        alpha = " and ignores the alpha (scale 1)" if scale_one else ""
        rest = len(lokr) - len(clamped)
        mixed = (f"; the other {rest} LoKr layers keep a low-rank w2 scaled by alpha / dim, so layers train at "
                 "different scales") if rest else ""
        warnings.append(
            f"{field_name}: {t.dim} is at least half of the LoKr w2 factor on {len(targets)} of the "
            f"{len(plan.targets)} adapted layers (e.g. {t.path}: w2 {w2}), so LyCORIS makes w2 a full matrix there "
            f"(as full_matrix: true would){alpha}{mixed}. Set full_matrix: true to say so, or a smaller "
            f"{field_name} for a low-rank w2")
    return warnings


def _size_key(target: PlannedTarget, config: LycorisConfig) -> str:
    return dim_field(target, config) if target.algo in (*LOW_RANK_ALGOS, "lokr") else "algo"


def _size_findings(plan: Plan, config: LycorisConfig, shapes: dict[str, dict], model_params: int,
                   bytes_per_param: int, family: str) -> tuple[list[str], list[str], int]:
    """(errors, warnings, parameter count) of the adapter's size against the model and the byte limit."""
    by_field: dict[str, int] = {}
    values: dict[str, Any] = {}
    for t in plan.targets:
        key = _size_key(t, config)
        by_field[key] = by_field.get(key, 0) + sum(math.prod(s) for s in shapes[t.lora_name].values())
        values.setdefault(key, t.algo if key == "algo" else t.dim)
    params = sum(by_field.values())
    n_bytes = params * bytes_per_param
    culprit = max(by_field, key=by_field.get)
    ratio = params / max(model_params, 1)
    what = (f"a {size_text(n_bytes)} adapter ({params:,} parameters, {ratio:,.1f}x this {family} model's "
            f"{model_params:,})")
    if n_bytes > MAX_ADAPTER_BYTES or ratio > MAX_MODEL_MULTIPLE:
        return [f"{culprit}: {values[culprit]} would make {what}; the limit is {MAX_MODEL_MULTIPLE}x the model or "
                f"{size_text(MAX_ADAPTER_BYTES)}. Ranks of 4 to 128 are usual"], [], params
    if ratio > 1:
        return [], [f"{culprit}: {values[culprit]} makes {what}: the adapter is bigger than the model it adapts"], params
    return [], [], params


def _cond_widths(conditioning: Any) -> list[tuple[int, int | None]]:
    """(text width, pooled width or None) of each entry of a ComfyUI CONDITIONING."""
    out = []
    for entry in conditioning or []:
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not isinstance(entry[0], torch.Tensor):
            continue
        pooled = entry[1].get("pooled_output") if isinstance(entry[1], dict) else None
        out.append((int(entry[0].shape[-1]), int(pooled.shape[-1]) if isinstance(pooled, torch.Tensor) else None))
    return out


def _items(indices: list[int], total: int) -> str:
    shown = ", ".join(map(str, indices[:5])) + (", ..." if len(indices) > 5 else "")
    return f"item {indices[0]}" if len(indices) == 1 else f"items {shown} ({len(indices)} of {total})"


def _data_errors(data: Any, unet_config: dict, family: str, display: str, latent_channels: int) -> list[str]:
    errors = []
    latents = list(data.latents)
    by_channels: dict[int, list[int]] = {}
    for i, latent in enumerate(latents):
        if latent.shape[0] != latent_channels:
            by_channels.setdefault(int(latent.shape[0]), []).append(i)
    for channels, indices in by_channels.items():
        kind = f" ({_LATENT_NAMES[channels]})" if channels in _LATENT_NAMES else ""
        verb = "has" if len(indices) == 1 else "have"
        errors.append(f"dataset: {_items(indices, len(latents))} {verb} {channels}-channel latents{kind}, but this "
                      f"{display} model takes {latent_channels}-channel latents; encode the images with this "
                      "model's VAE")
    text_width = int(unet_config["context_dim"] if family == "sdxl" else unet_config["context_in_dim"])
    pooled_width = {"sdxl": int(unet_config.get("adm_in_channels", 2816)) - 1536,
                    "flux1": unet_config.get("vec_in_dim")}.get(family)
    conds = list(data.conditionings)
    named = [(f"conditioning of {_items([i], len(conds))}" if len(conds) > 1 else "conditioning", c) for i, c in
             enumerate(conds)]
    if getattr(data, "empty_conditioning", None) is not None:
        named.append(("empty_conditioning", data.empty_conditioning))
    for name, cond in named:
        for width, pooled in _cond_widths(cond):
            if width != text_width:
                errors.append(f"dataset: the {name} is {width} wide, but this {display} model's text input is "
                              f"{text_width} wide; encode the captions with this model's text encoder")
                break
            if pooled_width and pooled is not None and pooled != int(pooled_width):
                errors.append(f"dataset: the {name} has a {pooled} wide pooled_output, but this {display} model "
                              f"takes {pooled_width}; encode the captions with this model's text encoder")
                break
    return errors


def _batch_warnings(data: Any, spec: Any) -> list[str]:
    buckets = data.buckets() if hasattr(data, "buckets") else {}
    largest = max((len(v) for v in buckets.values()), default=0) * int(getattr(data, "repeats", 1))
    batch = int(getattr(spec, "batch_size", 1))
    if largest and batch > largest:
        return [f"batch_size: {batch}, but the largest size bucket holds {largest} items (with repeats), so no "
                f"batch holds more than {largest}"]
    return []


def _train_option_errors(plan: Plan, config: LycorisConfig, shapes: dict[str, dict], spec: Any) -> list[str]:
    """Train options the plan cannot take: init_lokr_norm on a module without full lokr_w1 / lokr_w2
    (SimpleTuner's init fails there too), dropouts LyCORIS or this trainer cannot apply to a module."""
    errors = []
    scale = float(getattr(spec, "init_lokr_norm", 0.0) or 0.0)
    if scale:
        wrong = [t for t in plan.targets if t.algo != "lokr"]
        if wrong:
            errors.append(f"init_lokr_norm: LoKr's perturbed-normal init needs algo 'lokr'; {wrong[0].lora_name} "
                          f"is '{wrong[0].algo}' ({len(wrong)} such modules)")
        else:
            split = [t for t in plan.targets if not {"lokr_w1", "lokr_w2"} <= set(shapes[t.lora_name])]
            if split:
                errors.append(f"init_lokr_norm: {split[0].lora_name} has a factorised LoKr half; the perturbed-"
                              "normal init sets full lokr_w1 and lokr_w2: use full_matrix true")
    names = ("dropout", "rank_dropout", "module_dropout")
    values = [float(config.keywords.get(k) or 0.0) for k in names]
    for target in plan.targets:
        own = [k for k in names if k in target.module_kwargs]
        if own:
            errors.append(f"apply_preset ({target.owner_class}).{own[0]}: LyCORIS takes dropouts at the top level "
                          "of the config only (create_lycoris fails on a per-target value)")
            break
        try:
            DropoutSettings(target.algo, *values)
        except DropoutError as err:
            errors.append(f"{err} ({target.lora_name})")
            break
    return errors


def review(config: LycorisConfig | str | Mapping[str, Any], unet_config: dict, data: Any = None, spec: Any = None,
           latent_channels: int | None = None, plan: Plan | None = None) -> Review:
    """All findings of `preflight`, as lists. Raises PreflightError only when no plan can be made
    (unsupported model, a config adapting no layer, a config that does not parse)."""
    try:
        config = _config(config)
        profile = profile_for(unet_config)
        plan = plan or plan_for(config, unet_config)
    except ConfigError as err:
        raise PreflightError(str(err)) from None
    except ValueError as err:  # profile_for / skeleton: an unsupported or inconsistent model
        raise PreflightError(str(err) if str(err).startswith("model:") else f"model: {err}") from None
    shapes = {t.lora_name: adapter_param_shapes(t) for t in plan.targets}
    model_params = sum(p.numel() for p in skeleton_for(unet_config).parameters())
    bytes_per_param = _DTYPE_BYTES.get(getattr(spec, "dtype", "float32"), 4)
    errors, warnings, params = _size_findings(plan, config, shapes, model_params, bytes_per_param,
                                               profile.display_name)
    rank_errors, rank_warnings = _rank_findings(plan, config)
    errors += rank_errors + _train_option_errors(plan, config, shapes, spec)
    warnings = [*plan.warnings, *rank_warnings, *_lokr_clamp_warnings(plan, config, shapes), *warnings]
    if data is not None:
        channels = int(latent_channels or LATENT_CHANNELS[profile.name])
        errors += _data_errors(data, unet_config, profile.name, profile.display_name, channels)
        if spec is not None:
            warnings += _batch_warnings(data, spec)
    return Review(plan, tuple(errors), tuple(warnings), params, params * bytes_per_param, model_params)


def preflight(config: LycorisConfig | str | Mapping[str, Any], unet_config: dict, data: Any = None,
              spec: Any = None, latent_channels: int | None = None) -> list[str]:
    """Check a training submission; return its warnings, or raise PreflightError naming the field.

    `config`: a LycorisConfig (or its JSON text / dict); `unet_config`: the ComfyUI model's
    (`host.model_unet_config(model)`); `data`: a TrainingSet (or None to check only config vs
    model); `spec`: the JobSpec (batch size, dtype), optional; `latent_channels`: the model's
    LATENT channels (`host.latent_layout(model)[0]`), default the family's. Every error is in the
    message, one per line, each starting with the input or field at fault.
    """
    found = review(config, unet_config, data, spec, latent_channels)
    if found.errors:
        raise PreflightError("\n".join(found.errors))
    return list(found.warnings)
