"""SimpleTuner-format LyCORIS configs: parsed once, validated with errors that name the field.

A config is the JSON SimpleTuner reads (`--lycoris_config`): `algo`, `multiplier`, `linear_dim`,
`linear_alpha`, algorithm keywords (`factor`, `full_matrix`, ...), an `apply_preset` block with
target selection, and T-LoRA's `tlora_min_rank` / `tlora_alpha`. `parse_config` turns it into a
frozen `LycorisConfig`; nothing here touches LyCORIS's process-global preset state.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

ALGOS = ("lora", "locon", "loha", "lokr", "dylora", "glora", "full", "diag-oft", "boft", "ia3", "tlora")

# LyCORIS 4.1.3's own defaults when a config has no `apply_preset` (LycorisNetwork class state in
# a fresh process): every Linear, Conv and norm layer, convolutions enabled.
DEFAULT_TARGET_MODULES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm")

DEPRECATED_KEYS = {"disable_conv_cp": "use_tucker", "use_cp": "use_tucker", "use_conv_cp": "use_tucker",
                   "constrain": "constraint"}


class ConfigError(ValueError):
    """A config that cannot be used; the message starts with the offending field's path."""


def _fail(path: str, message: str) -> None:
    raise ConfigError(f"{path}: {message}")


# -- field validators: each returns the normalised value or raises ConfigError naming `path` --

def _number(path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(path, f"must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        _fail(path, f"must be a finite number, got {value}")
    return value


def _int(path: str, value: Any) -> int:
    value = _number(path, value)
    if float(value) != int(value):
        _fail(path, f"must be a whole number, got {value}")
    return int(value)


def _positive_int(path: str, value: Any) -> int:
    value = _int(path, value)
    if value < 1:
        _fail(path, f"must be at least 1, got {value}")
    return value


def _nonneg_int(path: str, value: Any) -> int:
    value = _int(path, value)
    if value < 0:
        _fail(path, f"must be 0 or more, got {value}")
    return value


def _positive(path: str, value: Any) -> float:
    value = _number(path, value)
    if value <= 0:
        _fail(path, f"must be greater than 0, got {value}")
    return float(value)


def _nonneg(path: str, value: Any) -> float:
    value = _number(path, value)
    if value < 0:
        _fail(path, f"must be 0 or more, got {value}")
    return float(value)


def _probability(path: str, value: Any) -> float:
    value = _number(path, value)
    if not 0 <= value <= 1:
        _fail(path, f"must be between 0 and 1, got {value}")
    return float(value)


def _factor(path: str, value: Any) -> int:
    value = _int(path, value)
    if value == 0 or value < -1:
        _fail(path, f"must be -1 (automatic) or a positive integer, got {value}")
    return value


_BOOL_STRINGS = {"true": True, "false": False, "1": True, "0": False}


def _bool(path: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_STRINGS:
        return _BOOL_STRINGS[value.strip().lower()]
    _fail(path, f"must be true or false, got {value!r}")


def _algo(path: str, value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in ALGOS:
        _fail(path, f"unknown algorithm {value!r}; supported: {', '.join(ALGOS)}")
    return value.lower()


def _string(path: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        _fail(path, f"must be a non-empty string, got {value!r}")
    return value


def _sig_type(path: str, value: Any) -> str:
    if value not in ("principal", "last", "middle"):
        _fail(path, f"must be one of principal, last, middle; got {value!r}")
    return value


def _families(path: str, value: Any) -> tuple[str, ...]:
    known = ("flux2", "flux1", "sdxl")
    if not isinstance(value, list) or not value or any(v not in known for v in value):
        _fail(path, f"must be a list drawn from {', '.join(known)}, got {value!r}")
    return tuple(value)


# Algorithm keywords accepted at the top level and inside module_algo_map / name_algo_map entries.
ALGO_KEYWORDS: dict[str, Callable[[str, Any], Any]] = {
    "factor": _factor, "full_matrix": _bool, "decompose_both": _bool, "use_tucker": _bool,
    "use_scalar": _bool, "dora_wd": _bool, "wd_on_output": _bool, "rs_lora": _bool,
    "unbalanced_factorization": _bool, "rescaled": _bool, "constraint": _nonneg, "block_size": _positive_int,
    "dropout": _probability, "rank_dropout": _probability, "module_dropout": _probability,
    "rank_dropout_scale": _bool, "train_norm": _bool, "conv_dim": _nonneg_int, "conv_alpha": _nonneg,
    "sig_type": _sig_type, "use_data_init": _bool, "mask_group_id": _nonneg_int, "bypass_mode": _bool,
}

TOP_LEVEL: dict[str, Callable[[str, Any], Any]] = {
    "algo": _algo, "multiplier": _number, "linear_dim": _positive_int, "linear_alpha": _positive,
    "tlora_min_rank": _nonneg_int, "tlora_alpha": _positive, "preset": _string, **ALGO_KEYWORDS,
}

# Documentation keys of the pack's presets; SimpleTuner passes them to create_lycoris, which
# ignores them, so a preset file stays usable there as it is.
DOC_KEYS: dict[str, Callable[[str, Any], Any]] = {"description": _string, "families": _families}

# Per-target overrides: LyCORIS reads `dim` / `alpha` / `algo` there (not linear_dim / linear_alpha).
OVERRIDE_KEYS: dict[str, Callable[[str, Any], Any]] = {
    "algo": _algo, "dim": _positive_int, "alpha": _positive, **ALGO_KEYWORDS,
}

PRESET_KEYS = ("target_module", "target_name", "module_algo_map", "name_algo_map", "exclude_name",
               "use_fnmatch", "enable_conv", "lora_prefix")

# Keys people write that mean something else; the message says what to use instead.
MISNAMED = {
    "weight_decompose": "use 'dora_wd' (create_lycoris reads dora_wd and passes weight_decompose itself)",
    "rank": "use 'linear_dim'", "dim": "use 'linear_dim' at the top level ('dim' belongs in module_algo_map entries)",
    "alpha": "use 'linear_alpha' at the top level ('alpha' belongs in module_algo_map entries)",
    "network_dim": "use 'linear_dim'", "network_alpha": "use 'linear_alpha'",
}


def _unknown_key(path: str, key: str, valid: list[str]) -> None:
    if key in MISNAMED:
        _fail(path, f"'{key}' is not a config key: {MISNAMED[key]}")
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(sorted(valid))}"
    _fail(path, f"unknown key '{key}'; {hint}")


@dataclass(frozen=True)
class PresetSpec:
    """The `apply_preset` block, every key set (so no LyCORIS class state can leak in)."""

    target_module: tuple[str, ...] = DEFAULT_TARGET_MODULES
    target_name: tuple[str, ...] = ()
    module_algo_map: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    name_algo_map: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    exclude_name: tuple[str, ...] = ()
    use_fnmatch: bool = False
    enable_conv: bool = True
    lora_prefix: str = "lycoris"

    def as_lycoris_preset(self) -> dict:
        """Every preset key LyCORIS's `apply_preset` reads, as fresh mutable copies."""
        return {
            "target_module": list(self.target_module), "target_name": list(self.target_name),
            "module_algo_map": copy.deepcopy(dict(self.module_algo_map)),
            "name_algo_map": copy.deepcopy(dict(self.name_algo_map)),
            "exclude_name": list(self.exclude_name), "use_fnmatch": self.use_fnmatch,
            "enable_conv": self.enable_conv, "lora_prefix": self.lora_prefix,
        }


@dataclass(frozen=True)
class LycorisConfig:
    """A validated config. `source` is the normalised SimpleTuner JSON (saved in file metadata)."""

    algo: str
    multiplier: float
    linear_dim: int
    linear_alpha: float
    preset: PresetSpec
    keywords: Mapping[str, Any]  # algorithm keywords for create_lycoris (factor, full_matrix, ...)
    tlora_min_rank: int = 1
    tlora_alpha: float = 1.0
    source: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    description: str = ""
    families: tuple[str, ...] = ()  # families a preset is written for; empty = not stated

    @property
    def factor(self) -> int:
        return self.keywords.get("factor", -1)

    @property
    def full_matrix(self) -> bool:
        return self.keywords.get("full_matrix", False)

    @property
    def bypass_mode(self) -> bool:
        return self.keywords.get("bypass_mode", False)

    def lycoris_kwargs(self) -> dict:
        """Keyword arguments for `lycoris.create_lycoris(model, multiplier, linear_dim, linear_alpha, **kw)`."""
        return {"algo": self.algo, **copy.deepcopy(dict(self.keywords))}

    def to_json(self) -> str:
        return json.dumps(self.source, sort_keys=True)


MAX_DEPTH = 16  # nesting levels of objects and lists; a config needs 4 (apply_preset.module_algo_map.<Class>.<key>)
_TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep; a LyCORIS config needs at most 4"


def _child(path: str, key: Any, depth: int) -> str:
    """The field path shown in messages: `apply_preset.module_algo_map.Attention` (four levels at most)."""
    if depth == 0:
        return str(key)
    return f"{path}.{key}" if depth < 4 else path


def _check_depth(data: Any) -> None:
    """Refuse deep nesting before anything recurses into it (json, deepcopy, repr), without recursing ourselves."""
    stack = [(data, "config", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(f"{path}: {_TOO_DEEP}")
        if isinstance(value, Mapping):
            stack.extend((v, _child(path, k, depth), depth + 1) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, path, depth + 1) for v in value)


def load_json(text: str) -> dict:
    """Parse config text; malformed JSON is reported with its line and column."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"config: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except RecursionError:  # json's C parser stops at Python's recursion limit
        raise ConfigError(f"config: {_TOO_DEEP}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: must be a JSON object, got {type(data).__name__}")
    _check_depth(data)
    return data


def _check_patterns(path: str, patterns: Any, fnmatch_style: bool) -> tuple[str, ...]:
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        _fail(path, f"must be a list of strings, got {patterns!r}")
    if not fnmatch_style:
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as err:
                _fail(f"{path}[{i}]", f"invalid regular expression {pattern!r}: {err}")
    return tuple(patterns)


def _check_override(path: str, entry: Any) -> dict:
    if not isinstance(entry, dict):
        _fail(path, f"must be an object of algorithm settings, got {entry!r}")
    out = {}
    for key, value in entry.items():
        if key not in OVERRIDE_KEYS:
            _unknown_key(path, key, list(OVERRIDE_KEYS))
        out[key] = OVERRIDE_KEYS[key](f"{path}.{key}", value)
    return out


def _check_map(path: str, value: Any, fnmatch_style: bool, patterns: bool) -> dict:
    if not isinstance(value, dict):
        _fail(path, f"must be an object mapping names to settings, got {value!r}")
    if patterns:
        _check_patterns(path, list(value), fnmatch_style)
    return {name: _check_override(f"{path}.{name}", entry) for name, entry in value.items()}


def parse_preset(data: Any) -> PresetSpec:
    path = "apply_preset"
    if not isinstance(data, dict):
        _fail(path, f"must be an object, got {data!r}")
    for key in data:
        if key not in PRESET_KEYS:
            _unknown_key(path, key, list(PRESET_KEYS))
    use_fnmatch = _bool(f"{path}.use_fnmatch", data.get("use_fnmatch", False))
    targets = data.get("target_module", [])
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        _fail(f"{path}.target_module", f"must be a list of class names, got {targets!r}")
    return PresetSpec(
        target_module=tuple(targets),
        target_name=_check_patterns(f"{path}.target_name", data.get("target_name", []), use_fnmatch),
        module_algo_map=_check_map(f"{path}.module_algo_map", data.get("module_algo_map", {}), use_fnmatch, False),
        name_algo_map=_check_map(f"{path}.name_algo_map", data.get("name_algo_map", {}), use_fnmatch, True),
        exclude_name=_check_patterns(f"{path}.exclude_name", data.get("exclude_name", []), use_fnmatch),
        use_fnmatch=use_fnmatch,
        enable_conv=_bool(f"{path}.enable_conv", data.get("enable_conv", True)),
        lora_prefix=_string(f"{path}.lora_prefix", data.get("lora_prefix", "lycoris")),
    )


def _required(data: dict, full_matrix: bool) -> None:
    missing = [k for k in ("multiplier", "linear_alpha") if k not in data]
    if "linear_dim" not in data and not full_matrix:
        missing.append("linear_dim")
    if missing:
        hint = " (linear_dim may be left out only with full_matrix: true)" if "linear_dim" in missing else ""
        raise ConfigError(f"{missing[0]}: required field is missing{hint}")


def parse_config(source: str | Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> LycorisConfig:
    """Validate a SimpleTuner LyCORIS config (JSON text or dict) with optional top-level overrides."""
    if not isinstance(source, str):
        _check_depth(source)
    _check_depth(overrides or {})
    data = load_json(source) if isinstance(source, str) else copy.deepcopy(dict(source))
    data.update(overrides or {})
    warnings: list[str] = []
    for old, new in DEPRECATED_KEYS.items():
        if old in data:
            warnings.append(f"{old}: deprecated in LyCORIS, read as '{new}'")
            data.setdefault(new, data.pop(old) if old != "disable_conv_cp" else not data.pop(old))
    for key in data:
        if key not in TOP_LEVEL and key not in DOC_KEYS and key != "apply_preset":
            _unknown_key("config", key, [*TOP_LEVEL, *DOC_KEYS, "apply_preset"])
    values = {key: TOP_LEVEL[key](key, value) for key, value in data.items() if key in TOP_LEVEL}
    docs = {key: DOC_KEYS[key](key, value) for key, value in data.items() if key in DOC_KEYS}
    algo = values.setdefault("algo", "lora")
    full_matrix = values.get("full_matrix", False)
    _required(values, full_matrix)
    if "linear_dim" not in values:
        values["linear_dim"] = 10000  # what SimpleTuner users write for a full LoKr
    preset = parse_preset(data["apply_preset"]) if "apply_preset" in data else PresetSpec()
    warnings += _semantic_warnings(values, algo)
    keywords = {k: v for k, v in values.items() if k in ALGO_KEYWORDS}
    normalised = {**values, **({"apply_preset": data["apply_preset"]} if "apply_preset" in data else {})}
    return LycorisConfig(
        algo=algo, multiplier=float(values["multiplier"]), linear_dim=values["linear_dim"],
        linear_alpha=values["linear_alpha"], preset=preset, keywords=keywords,
        tlora_min_rank=values.get("tlora_min_rank", 1), tlora_alpha=values.get("tlora_alpha", 1.0),
        source=normalised, warnings=tuple(warnings),
        description=docs.get("description", ""), families=docs.get("families", ()),
    )


def _semantic_warnings(values: dict, algo: str) -> list[str]:
    """Settings that parse but do not do what their author likely meant; errors for impossible ones."""
    warnings = []
    tlora_fields = [k for k in ("tlora_min_rank", "tlora_alpha") if k in values]
    if tlora_fields and algo != "tlora":
        warnings.append(f"{', '.join(tlora_fields)}: only used by algo 'tlora'; ignored for '{algo}'")
    if algo == "tlora" and values.get("tlora_min_rank", 1) > values["linear_dim"]:
        raise ConfigError(f"tlora_min_rank: {values['tlora_min_rank']} is larger than linear_dim {values['linear_dim']}")
    if values.get("full_matrix") and algo != "lokr":
        warnings.append(f"full_matrix: only used by algo 'lokr'; ignored for '{algo}'")
    if "factor" in values and algo != "lokr":
        warnings.append(f"factor: only used by algo 'lokr'; ignored for '{algo}'")
    for key in ("multiplier", "linear_alpha"):
        if key in values and float(values[key]) != int(values[key]):
            warnings.append(f"{key}: SimpleTuner reads this field with int(); {values[key]} trains as "
                            f"{int(values[key])} there")
    return warnings
