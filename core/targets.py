"""Target resolution with SimpleTuner/LyCORIS semantics, on a weightless diffusers skeleton.

`resolve` reproduces what `LycorisNetwork.apply_preset(apply_preset)` followed by
`create_lycoris(model, multiplier, linear_dim, linear_alpha, **config)` selects (class names,
regex/fnmatch names, module_algo_map / name_algo_map overrides, exclusions, per-module dim /
alpha / algorithm keywords), without touching LyCORIS's process-global class state. Each
selected diffusers module is paired with its ComfyUI route from the family profile.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import ConfigError, LycorisConfig
from .families import FamilyProfile, Route, profile_for

# Config keyword -> the module keyword create_lycoris passes it as (LycorisNetwork root kwargs).
_ROOT_KWARGS = {"decompose_both": "decompose_both", "factor": "factor", "block_size": "block_size",
                "constraint": "constraint", "rescaled": "rescaled", "dora_wd": "weight_decompose",
                "wd_on_output": "wd_on_out", "full_matrix": "full_matrix", "bypass_mode": "bypass_mode",
                "unbalanced_factorization": "unbalanced_factorization", "use_scalar": "use_scalar"}
_ROOT_DEFAULTS = {"factor": -1, "decompose_both": False, "block_size": 4, "constraint": 0.0, "rescaled": False,
                  "weight_decompose": False, "wd_on_out": True, "full_matrix": False, "bypass_mode": False,
                  "unbalanced_factorization": False, "use_scalar": False}


@dataclass(frozen=True)
class PlannedTarget:
    """One adapter module: where it is in diffusers and in ComfyUI, and how it is built."""

    path: str  # diffusers module path, e.g. transformer_blocks.0.attn.to_q
    lora_name: str  # key prefix in adapter files, e.g. lycoris_transformer_blocks_0_attn_to_q
    layer: str  # 'Linear' or 'Conv2d'
    owner_class: str  # the class that selected it (target_module / module_algo_map), or 'name'
    weight_shape: tuple[int, ...]
    route: Route
    algo: str
    dim: int
    alpha: float
    use_tucker: bool
    module_kwargs: Mapping[str, Any] = field(default_factory=dict)  # as LyCORIS's module receives them


@dataclass(frozen=True)
class Plan:
    family: str
    targets: tuple[PlannedTarget, ...]
    warnings: tuple[str, ...] = ()

    def by_path(self) -> dict[str, PlannedTarget]:
        return {t.path: t for t in self.targets}


class _Matcher:
    """LyCORIS's name matching: exact name, or regex `re.match` / `fnmatch` per `use_fnmatch`."""

    def __init__(self, use_fnmatch: bool):
        self.use_fnmatch = use_fnmatch

    def match(self, pattern: str, name: str) -> bool:
        return fnmatch.fnmatch(name, pattern) if self.use_fnmatch else bool(re.match(pattern, name))

    def any(self, patterns, name: str) -> bool:
        return name in patterns or any(self.match(p, name) for p in patterns)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


class _Selector:
    """The selection walk of `LycorisNetwork.__init__` (create_modules / create_modules_)."""

    def __init__(self, config: LycorisConfig):
        self.config = config
        self.preset = config.preset
        self.m = _Matcher(config.preset.use_fnmatch)
        self.root_kwargs = {**_ROOT_DEFAULTS, **{_ROOT_KWARGS[k]: v for k, v in config.keywords.items()
                                                 if k in _ROOT_KWARGS}}
        self.use_tucker = bool(config.keywords.get("use_tucker", False))
        enable_conv = config.enable_conv  # after create_lycoris's own `preset` (built-in or file): core.config
        conv_dim = config.keywords.get("conv_dim") or config.linear_dim
        self.conv_dim = int(conv_dim) if enable_conv else 0
        self.conv_alpha = float(config.keywords.get("conv_alpha") or config.linear_alpha)
        self.selected: dict[str, tuple] = {}  # lora_name -> (path, module, algo, dim, alpha, configs, owner)

    def lora_name(self, path: str) -> str:
        return f"{self.preset.lora_prefix}_{path}".replace(".", "_")

    def run(self, root: torch.nn.Module) -> None:
        target_modules = set(self.preset.target_module) | set(self.preset.module_algo_map)
        target_names = list(dict.fromkeys([*self.preset.target_name, *self.preset.name_algo_map]))
        for name, module in root.named_modules():
            if self.m.any(self.preset.exclude_name, name) and name:
                continue
            cls = type(module).__name__
            if cls in target_modules and not any(self.m.match(t, name) for t in target_names):
                configs = self.preset.module_algo_map.get(cls, {})
                self.walk(name, module, configs.get("algo", self.config.algo), configs, cls)
            elif self.m.any(target_names, name):
                configs = self._name_config(name) or self.preset.module_algo_map.get(cls) or {}
                if self.lora_name(name) not in self.selected:
                    self.single(name, module, configs.get("algo", self.config.algo), configs, "name")

    def _name_config(self, name: str) -> Mapping[str, Any] | None:
        if name in self.preset.name_algo_map:
            return self.preset.name_algo_map[name]
        return next((v for k, v in self.preset.name_algo_map.items() if self.m.match(k, name)), None)

    def walk(self, path: str, root: torch.nn.Module, algo: str, configs: Mapping, owner: str) -> None:
        for sub, module in root.named_modules():
            full = _join(path, sub)
            if full and self.m.any(self.preset.exclude_name, full):
                continue
            cls = type(module).__name__
            if cls in self.preset.module_algo_map and module is not root:
                nested = self.preset.module_algo_map[cls]
                self.walk(full, module, nested.get("algo", algo), nested, cls)
                continue
            if self.lora_name(full) not in self.selected:
                self.single(full, module, algo, configs, owner)

    def single(self, path: str, module: torch.nn.Module, algo: str, configs: Mapping, owner: str) -> None:
        """create_single_module: which layers get an adapter, with which dim and alpha."""
        if self.config.keywords.get("train_norm") and "Norm" in type(module).__name__:
            raise ConfigError("train_norm: adapting norm layers is not supported by this pack")
        dim, alpha = configs.get("dim"), configs.get("alpha")
        if isinstance(module, torch.nn.Linear) and self.config.linear_dim > 0:
            dim, alpha = dim or self.config.linear_dim, alpha or self.config.linear_alpha
        elif isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            if module.kernel_size[0] == 1 and self.config.linear_dim > 0:
                dim, alpha = dim or self.config.linear_dim, alpha or self.config.linear_alpha
            elif self.conv_dim > 0 or dim:
                dim, alpha = dim or self.conv_dim, alpha or self.conv_alpha
            else:
                return
        else:
            return
        self.selected[self.lora_name(path)] = (path, module, algo, dim, alpha, configs, owner)


def _layer_classes(skeleton: torch.nn.Module) -> list[str]:
    """Classes in the model that contain a Linear/Conv, i.e. names a target_module can use."""
    names = set()
    for _, module in skeleton.named_modules():
        if module is skeleton:
            continue
        if any(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in module.modules()):
            names.add(type(module).__name__)
    return sorted(names - {"ModuleList", "Sequential"})


def _no_match_error(config: LycorisConfig, skeleton: torch.nn.Module, profile: FamilyProfile) -> ConfigError:
    wanted = [*config.preset.target_module, *config.preset.module_algo_map, *config.preset.target_name,
              *config.preset.name_algo_map]
    message = (f"apply_preset: {', '.join(wanted) or '(no targets)'} matched no layer of this "
               f"{profile.display_name} model; its classes are: {', '.join(_layer_classes(skeleton))}")
    if profile.suggested_targets:
        message += f". For {profile.display_name} use target_module {list(profile.suggested_targets)}"
    return ConfigError(message)


def resolve(config: LycorisConfig, skeleton: torch.nn.Module, profile: FamilyProfile, unet_config: dict) -> Plan:
    """The adapter plan of `config` on a model of `profile`'s family (skeleton from `build_skeleton`)."""
    routes = profile.routes(unet_config)
    selector = _Selector(config)
    selector.run(skeleton)
    targets = []
    for lora_name, (path, module, algo, dim, alpha, configs, owner) in selector.selected.items():
        if path not in routes:
            raise ConfigError(f"apply_preset: {path} has no ComfyUI counterpart in {profile.display_name}")
        kwargs = {**selector.root_kwargs, **{k: v for k, v in configs.items() if k not in ("dim", "alpha", "algo")}}
        use_tucker = bool(kwargs.pop("use_tucker", selector.use_tucker))
        targets.append(PlannedTarget(
            path=path, lora_name=lora_name, layer=type(module).__name__, owner_class=owner,
            weight_shape=tuple(module.weight.shape), route=routes[path], algo=algo, dim=int(dim),
            alpha=float(alpha or dim), use_tucker=use_tucker, module_kwargs=kwargs,  # LyCORIS: alpha 0 = dim
        ))
    if not targets:
        raise _no_match_error(config, skeleton, profile)
    warnings = target_warnings(config, skeleton, profile, targets)
    return Plan(family=profile.name, targets=tuple(targets), warnings=(*config.warnings, *warnings))


# -- warnings: targets that resolve, but probably not as their author meant ------------------

# Kinds of target classes. A multi-family config lists each kind's class under every family's
# name (Flux2Attention, FluxAttention, Attention): a class that matches nothing is only worth a
# warning when no class of its kind matched, i.e. the model gets none of the layers it names.
_KINDS = (
    ("layer", ("Linear", "Conv1d", "Conv2d", "Conv3d", "LayerNorm", "GroupNorm", "RMSNorm")),
    ("attention", ("Attention", "Attn")),
    ("feed-forward", ("FeedForward", "MLP", "GEGLU", "SwiGLU", "GELU")),
    ("transformer block", ("TransformerBlock",)),
)


def class_kind(name: str) -> str | None:
    """'attention', 'feed-forward', 'transformer block', 'layer' (torch layers), or None."""
    for kind, words in _KINDS:
        found = name in words if kind == "layer" else any(w in name for w in words)
        if found:
            return kind
    return None


def _owner_counts(targets: list[PlannedTarget]) -> str:
    counts: dict[str, int] = {}
    for t in targets:
        counts[t.owner_class] = counts.get(t.owner_class, 0) + 1
    return ", ".join(f"{cls}: {n} modules" for cls, n in counts.items())


def _class_warnings(config: LycorisConfig, skeleton: torch.nn.Module, profile: FamilyProfile,
                    targets: list[PlannedTarget]) -> list[str]:
    present = {type(m).__name__ for m in skeleton.modules()}
    preset = config.preset
    wanted = list(dict.fromkeys([*preset.target_module, *preset.module_algo_map]))
    covered = {class_kind(cls) for cls in wanted if cls in present}
    layer_classes = _layer_classes(skeleton)
    out = []
    for cls in wanted:
        kind = class_kind(cls)
        if cls in present or (kind is not None and kind in covered):
            continue
        field_name = "target_module" if cls in preset.target_module else "module_algo_map"
        same_kind = [c for c in layer_classes if kind is not None and class_kind(c) == kind]
        what = f"no {kind} layer" if kind else f"no {cls} layer"
        has = (f"this model's {kind} classes: {', '.join(same_kind)}" if same_kind
               else f"this model's classes: {', '.join(layer_classes)}")
        out.append(f"apply_preset.{field_name}: '{cls}' matched no module of this {profile.display_name} model, "
                   f"so {what} is adapted (only {_owner_counts(targets)}); {has}")
    return out


def _name_warnings(config: LycorisConfig, skeleton: torch.nn.Module, profile: FamilyProfile,
                   targets: list[PlannedTarget]) -> list[str]:
    preset = config.preset
    matcher = _Matcher(preset.use_fnmatch)
    names = [name for name, _ in skeleton.named_modules() if name]
    fields = [(f"target_name[{i}]", p) for i, p in enumerate(preset.target_name)]
    fields += [(f"name_algo_map['{p}']", p) for p in preset.name_algo_map if p not in preset.target_name]
    fields += [(f"exclude_name[{i}]", p) for i, p in enumerate(preset.exclude_name)]
    out = []
    for field_name, pattern in fields:
        if any(matcher.any([pattern], name) for name in names):
            continue
        effect = "excludes nothing" if field_name.startswith("exclude") else "adapts nothing"
        style = "fnmatch patterns" if preset.use_fnmatch else "regular expressions (re.match from the start)"
        out.append(f"apply_preset.{field_name}: '{pattern}' matched no module of this {profile.display_name} "
                   f"model, so it {effect}; names are diffusers module paths such as '{targets[0].path}', "
                   f"written as {style}")
    return out


def _sdxl_feedforward_warning(skeleton: torch.nn.Module, profile: FamilyProfile,
                              targets: list[PlannedTarget]) -> list[str]:
    if profile.name != "sdxl":
        return []
    blocks = tuple(f"{name}." for name, m in skeleton.named_modules() if type(m).__name__ == "FeedForward")
    inside = [t for t in targets if t.path.startswith(blocks)]
    if not inside:
        return []
    owners = sorted({t.owner_class for t in inside})
    return [f"FeedForward: {len(inside)} adapted layers are inside SDXL's FeedForward blocks (selected by "
            f"{', '.join(owners)}, e.g. {inside[0].path}); SimpleTuner's LyCORIS guide reports that training "
            "them can send SDXL's loss to NaN. Train attention only (the sdxl_lokr_attention preset: "
            "target_module ['Attention']) unless you mean to"]


def target_warnings(config: LycorisConfig, skeleton: torch.nn.Module, profile: FamilyProfile,
                    targets: list[PlannedTarget]) -> list[str]:
    """Selections that resolve but probably not as meant: a preset written for other families, a
    target class or name pattern that matches nothing (while others match), FeedForward on SDXL."""
    out = []
    if config.families and profile.name not in config.families:
        out.append(f"families: this config is written for {', '.join(config.families)}, not for this "
                   f"{profile.display_name} model")
    if "apply_preset" in config.source:  # LyCORIS's defaults list every layer class, for any model
        out += _class_warnings(config, skeleton, profile, targets)
        out += _name_warnings(config, skeleton, profile, targets)
    return out + _sdxl_feedforward_warning(skeleton, profile, targets)


@functools.lru_cache(maxsize=8)
def _skeleton(family: str, unet_config_json: str) -> torch.nn.Module:
    from .families import profile_named

    return profile_named(family).build_skeleton(json.loads(unet_config_json))


def skeleton_for(unet_config: dict) -> torch.nn.Module:
    """The (cached, shared, read-only) meta-device diffusers skeleton of a ComfyUI model's config."""
    return _skeleton(profile_for(unet_config).name, json.dumps(unet_config, sort_keys=True, default=str))


def plan_for(config: LycorisConfig, unet_config: dict) -> Plan:
    """Resolve a config against a ComfyUI model's `unet_config`."""
    return resolve(config, skeleton_for(unet_config), profile_for(unet_config), unet_config)
