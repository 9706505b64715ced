"""SimpleTuner-format LyCORIS configs: parsed once, read exactly as SimpleTuner + LyCORIS read them.

A config is the JSON SimpleTuner reads (`--lycoris_config`): `algo`, `multiplier`, `linear_dim`,
`linear_alpha`, algorithm keywords (`factor`, `full_matrix`, ...), an `apply_preset` block with
target selection, and T-LoRA's `tlora_min_rank` / `tlora_alpha`. `parse_config` turns it into a
frozen `LycorisConfig`; nothing here touches LyCORIS's process-global preset state.

What "as SimpleTuner reads it" means (SimpleTuner 4.10.1, LyCORIS 4.1.3; tests/unit/
test_simpletuner_conformance.py checks each point against their source):
- required keys: `algo`, `multiplier`, `linear_alpha`, and `linear_dim` unless `full_matrix` is the
  JSON value true (`helpers/configuration/cmd_args.py`);
- `multiplier`, `linear_dim`, `linear_alpha`, `tlora_min_rank` go through `int()`, `tlora_alpha`
  through `float()` (`helpers/training/trainer.py`): "16" is 16, 16.7 is 16, a linear_alpha of 0.5
  is 0 (LyCORIS then uses alpha = dim). Every cast that changes a value is a warning;
- everything else goes to `create_lycoris(**config)`, which reads the keys it knows (booleans
  through its `str_bool`: only the text "false" is false) and ignores the rest: unknown keys pass
  with a warning;
- `preset` is applied by create_lycoris after `apply_preset`: a built-in name (only its
  `enable_conv` reaches the network) or a TOML preset file, whose keys then replace those of
  `apply_preset`. Files are read from the pack's configs folder or ComfyUI's input folder only.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIMPLETUNER_VERSION = "4.10.1"  # the SimpleTuner release these rules were read from and tested against
ALGOS = ("lora", "locon", "loha", "lokr", "dylora", "glora", "full", "diag-oft", "boft", "ia3", "tlora")

# LyCORIS 4.1.3's own defaults when a config has no `apply_preset` (LycorisNetwork class state in
# a fresh process): every Linear, Conv and norm layer, convolutions enabled.
DEFAULT_TARGET_MODULES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm")

# create_lycoris applies its `preset` (default "full") after SimpleTuner's apply_preset; of a
# built-in preset only `enable_conv` reaches LycorisNetwork (its unet_/text_encoder_ lists are not
# applied), so it decides conv handling.
BUILTIN_PRESETS = {
    "full": True, "full-lin": False, "attn-mlp": False, "attn-only": False, "unet-only": True,
    "unet-transformer-only": False, "unet-convblock-only": True, "ia3": False,
}
PACK_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# More folders preset files may come from (besides PACK_CONFIGS and ComfyUI's input folder).
EXTRA_PRESET_FOLDERS: list[Path] = []

# SimpleTuner reads these five with a cast and a default (helpers/training/trainer.py), removes them
# from the config before create_lycoris and before writing the final file's metadata.
SIMPLETUNER_CASTS: dict[str, tuple[type, int | float]] = {
    "multiplier": (int, 1), "linear_dim": (int, 4), "linear_alpha": (int, 1),
    "tlora_min_rank": (int, 1), "tlora_alpha": (float, 1.0),
}
SIMPLETUNER_STRIPPED = tuple(SIMPLETUNER_CASTS)

DEPRECATED_KEYS = {"disable_conv_cp": "use_tucker", "use_cp": "use_tucker", "use_conv_cp": "use_tucker",
                   "constrain": "constraint"}


class ConfigError(ValueError):
    """A config that cannot be used; the message starts with the offending field's path."""


def _fail(path: str, message: str) -> None:
    raise ConfigError(f"{path}: {message}")


Warn = Callable[[str], None]

# -- field validators: each returns the normalised value (warning through `warn` when LyCORIS or
#    SimpleTuner reads it differently from how it looks) or raises ConfigError naming `path` --


def _number(path: str, value: Any, warn: Warn) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(path, f"must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        _fail(path, f"must be a finite number, got {value}")
    return value


def _int(path: str, value: Any, warn: Warn) -> int:
    value = _number(path, value, warn)
    if float(value) != int(value):
        _fail(path, f"must be a whole number, got {value}")
    return int(value)


def _positive_int(path: str, value: Any, warn: Warn) -> int:
    value = _int(path, value, warn)
    if value < 1:
        _fail(path, f"must be at least 1, got {value}")
    return value


def _nonneg_int(path: str, value: Any, warn: Warn) -> int:
    value = _int(path, value, warn)
    if value < 0:
        _fail(path, f"must be 0 or more, got {value}")
    return value


def _nonneg(path: str, value: Any, warn: Warn) -> float:
    value = _number(path, value, warn)
    if value < 0:
        _fail(path, f"must be 0 or more, got {value}")
    return float(value)


def _positive(path: str, value: Any, warn: Warn) -> float:
    value = _number(path, value, warn)
    if value <= 0:
        _fail(path, f"must be greater than 0, got {value}")
    return float(value)


def _probability(path: str, value: Any, warn: Warn) -> float:
    value = _number(path, value, warn)
    if not 0 <= value <= 1:
        _fail(path, f"must be between 0 and 1, got {value}")
    return float(value)


def _factor(path: str, value: Any, warn: Warn) -> int:
    value = _int(path, value, warn)
    if value == 0 or value < -1:
        _fail(path, f"must be -1 (automatic) or a positive integer, got {value}")
    return value


def _cast(kind: type, path: str, value: Any, warn: Warn, who: str) -> int | float:
    """`kind(value)` as Python computes it (SimpleTuner's / create_lycoris's cast), warning when it changes
    what the JSON says; values the cast cannot read (or reads as infinite / NaN) are errors."""
    name = kind.__name__
    if value is None or isinstance(value, (list, dict)):
        _fail(path, f"must be a number, got {type(value).__name__} {value!r} ({who} {name}() cannot read it)")
    if isinstance(value, float) and not math.isfinite(value):
        _fail(path, f"must be a finite number, got {value}")
    try:
        out = kind(value)
    except (TypeError, ValueError, OverflowError):
        _fail(path, f"must be a number; {who} {name}() cannot read {value!r}")
    if isinstance(out, float) and not math.isfinite(out):
        _fail(path, f"must be a finite number, got {value!r}")
    if isinstance(value, str):
        warn(f"{path}: the text {value!r} is read by {who} {name}() as {out}; write the number")
    elif isinstance(value, bool):
        warn(f"{path}: {json.dumps(value)} is read by {who} {name}() as {out}; write the number")
    elif out != value:
        warn(f"{path}: {value} becomes {out} in {who} {name}()")
    return out


def _simpletuner(kind: type, minimum: float, meaning: str = "") -> Callable[[str, Any, Warn], Any]:
    def validate(path: str, value: Any, warn: Warn):
        out = _cast(kind, path, value, warn, "SimpleTuner's")
        if out < minimum:
            shown = f" ({value!r} becomes {out} in SimpleTuner)" if out != value else ""
            _fail(path, f"must be at least {minimum:g}{meaning}, got {out}{shown}")
        return out
    return validate


def _lycoris_cast(kind: type, check: Callable[[str, Any, Warn], Any]) -> Callable[[str, Any, Warn], Any]:
    """Keys create_lycoris reads as `kind(value or default)`: numbers, or text / booleans that cast."""
    def validate(path: str, value: Any, warn: Warn):
        if isinstance(value, (str, bool)):
            value = _cast(kind, path, value, warn, "create_lycoris's")
        return check(path, value, warn)
    return validate


def _str_bool(path: str, value: Any, warn: Warn) -> bool:
    """create_lycoris reads these with `str_bool`: `str(value).lower() != "false"`."""
    if isinstance(value, bool):
        return value
    out = str(value).lower() != "false"
    warn(f"{path}: {json.dumps(value)} is not true/false; LyCORIS's str_bool reads it as {json.dumps(out)}")
    return out


def _truthy(path: str, value: Any, warn: Warn) -> bool:
    """Keys LyCORIS passes on as they are: Python's truth value decides (the text "false" is true)."""
    if isinstance(value, bool):
        return value
    out = bool(value)
    warn(f"{path}: {json.dumps(value)} is not true/false; LyCORIS tests it as Python does: {json.dumps(out)}")
    return out


def _algo(path: str, value: Any, warn: Warn) -> str:
    """create_lycoris reads the top-level algo with `.lower()`."""
    if not isinstance(value, str) or value.lower() not in ALGOS:
        _fail(path, f"unknown algorithm {value!r}; supported: {', '.join(ALGOS)}")
    return value.lower()


def _override_algo(path: str, value: Any, warn: Warn) -> str:
    """Per-target algos are looked up as written (no `.lower()` there)."""
    if isinstance(value, str) and value.lower() in ALGOS and value not in ALGOS:
        _fail(path, f"'{value}' must be written in lower case ('{value.lower()}'): LyCORIS looks per-target "
                    "algorithms up as written")
    return _algo(path, value, warn)


def _string(path: str, value: Any, warn: Warn) -> str:
    if not isinstance(value, str) or not value:
        _fail(path, f"must be a non-empty string, got {value!r}")
    return value


def _sig_type(path: str, value: Any, warn: Warn) -> str:
    if value not in ("principal", "last", "middle"):
        _fail(path, f"must be one of principal, last, middle; got {value!r}")
    return value


def _families(path: str, value: Any, warn: Warn) -> tuple[str, ...]:
    known = ("flux2", "flux1", "sdxl")
    if not isinstance(value, list) or not value or any(v not in known for v in value):
        _fail(path, f"must be a list drawn from {', '.join(known)}, got {value!r}")
    return tuple(value)


def _anything(path: str, value: Any, warn: Warn) -> Any:
    return value


# Module keywords, as LyCORIS's module classes take them inside module_algo_map / name_algo_map
# entries (passed on as they are: booleans by truth value).
MODULE_KEYWORDS: dict[str, Callable[[str, Any, Warn], Any]] = {
    "factor": _factor, "full_matrix": _truthy, "decompose_both": _truthy, "use_tucker": _truthy,
    "use_scalar": _truthy, "dora_wd": _truthy, "wd_on_output": _truthy, "rs_lora": _truthy,
    "unbalanced_factorization": _truthy, "rescaled": _truthy, "constraint": _nonneg, "block_size": _positive_int,
    "dropout": _probability, "rank_dropout": _probability, "module_dropout": _probability,
    "rank_dropout_scale": _truthy, "train_norm": _truthy, "conv_dim": _nonneg_int, "conv_alpha": _nonneg,
    "sig_type": _sig_type, "use_data_init": _truthy, "mask_group_id": _nonneg_int, "bypass_mode": _truthy,
}
ALGO_KEYWORDS = MODULE_KEYWORDS  # the algorithm keywords a config can hold (top level or per target)

# How create_lycoris (lycoris/wrapper.py) reads each top-level algorithm keyword.
_TOP_KEYWORDS: dict[str, Callable[[str, Any, Warn], Any]] = {
    **{k: _str_bool for k in ("full_matrix", "use_tucker", "use_scalar", "dora_wd", "wd_on_output", "rescaled",
                              "unbalanced_factorization", "train_norm", "bypass_mode")},
    "decompose_both": _truthy, "factor": _factor,
    "constraint": _lycoris_cast(float, _nonneg), "block_size": _lycoris_cast(int, _positive_int),
    "dropout": _lycoris_cast(float, _probability), "rank_dropout": _lycoris_cast(float, _probability),
    "module_dropout": _lycoris_cast(float, _probability), "conv_dim": _lycoris_cast(int, _nonneg_int),
    "conv_alpha": _lycoris_cast(float, _nonneg),
    # create_lycoris does not pass these on from the top level (only per target): read, then a warning
    "rs_lora": _truthy, "rank_dropout_scale": _truthy, "sig_type": _sig_type, "use_data_init": _truthy,
    "mask_group_id": _nonneg_int,
}
NOT_PASSED_AT_TOP = ("rs_lora", "rank_dropout_scale", "sig_type", "use_data_init", "mask_group_id")

TOP_LEVEL: dict[str, Callable[[str, Any, Warn], Any]] = {
    "algo": _algo,
    "multiplier": _simpletuner(int, -math.inf),
    "linear_dim": _simpletuner(int, 1),
    "linear_alpha": _simpletuner(int, 0, " (0 means alpha = dim)"),
    "tlora_min_rank": _simpletuner(int, 0),
    "tlora_alpha": _simpletuner(float, 0),
    "preset": _string, **_TOP_KEYWORDS,
    "train_llm_adapter": _str_bool, "warn_on_unmatched": _anything,
}

# Documentation keys of the pack's presets; SimpleTuner passes them to create_lycoris, which
# ignores them, so a preset file stays usable there as it is.
DOC_KEYS: dict[str, Callable[[str, Any, Warn], Any]] = {"description": _string, "families": _families}

# Per-target overrides: LyCORIS reads `dim` / `alpha` / `algo` there (not linear_dim / linear_alpha).
OVERRIDE_KEYS: dict[str, Callable[[str, Any, Warn], Any]] = {
    "algo": _override_algo, "dim": _positive_int, "alpha": _nonneg, **MODULE_KEYWORDS,
}

# Every key LycorisNetwork.apply_preset accepts (lycoris/config_sdk.py VALID_PRESET_KEYS); it
# raises on any other. The unet_/text_encoder_ lists are accepted but never applied.
PRESET_KEYS = ("target_module", "target_name", "module_algo_map", "name_algo_map", "exclude_name",
               "use_fnmatch", "enable_conv", "lora_prefix")
UNAPPLIED_PRESET_KEYS = ("unet_target_module", "unet_target_name", "text_encoder_target_module",
                         "text_encoder_target_name")

# Keys people write that mean something else; the warning says what to use instead.
MISNAMED = {
    "weight_decompose": "use 'dora_wd' (create_lycoris reads dora_wd and passes weight_decompose itself)",
    "rank": "use 'linear_dim'", "dim": "use 'linear_dim' at the top level ('dim' belongs in module_algo_map entries)",
    "alpha": "use 'linear_alpha' at the top level ('alpha' belongs in module_algo_map entries)",
    "network_dim": "use 'linear_dim'", "network_alpha": "use 'linear_alpha'",
}


def _unknown_key(path: str, key: str, valid: list[str], warn: Warn, ignored_by: str) -> None:
    """LyCORIS ignores keys it does not know: they pass, with a warning that suggests the likely key."""
    if key in MISNAMED:
        warn(f"{path}: '{key}' is not a config key ({ignored_by} ignores it): {MISNAMED[key]}")
        return
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    warn(f"{path}: unknown key '{key}' ({ignored_by} ignores it){hint}")


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
    """A validated config. `source` is the normalised SimpleTuner JSON (saved in file metadata).

    `preset` is the target selection in effect (apply_preset, then a preset file's keys);
    `enable_conv` whether k x k convolutions are adapted after create_lycoris's own `preset`.
    """

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
    enable_conv: bool = True
    preset_file: str | None = None  # the preset file read for `preset`, when it names one

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


def _check_override(path: str, entry: Any, warn: Warn) -> dict:
    if not isinstance(entry, dict):
        _fail(path, f"must be an object of algorithm settings, got {entry!r}")
    out = {}
    for key, value in entry.items():
        if key not in OVERRIDE_KEYS:
            _unknown_key(path, key, list(OVERRIDE_KEYS), warn, "the LyCORIS module")
            continue
        out[key] = OVERRIDE_KEYS[key](f"{path}.{key}", value, warn)
    return out


def _check_map(path: str, value: Any, fnmatch_style: bool, patterns: bool, warn: Warn) -> dict:
    if not isinstance(value, dict):
        _fail(path, f"must be an object mapping names to settings, got {value!r}")
    if patterns:
        _check_patterns(path, list(value), fnmatch_style)
    return {name: _check_override(f"{path}.{name}", entry, warn) for name, entry in value.items()}


def _preset_fields(path: str, data: Any, warn: Warn) -> dict:
    """The keys of an apply_preset block (or preset file) that are present, validated."""
    if not isinstance(data, dict):
        _fail(path, f"must be an object, got {data!r}")
    for key in data:
        if key in UNAPPLIED_PRESET_KEYS:
            warn(f"{path}.{key}: accepted by LyCORIS's apply_preset but never applied (use target_module / "
                 "target_name)")
        elif key not in PRESET_KEYS:
            near = difflib.get_close_matches(key, PRESET_KEYS, n=1, cutoff=0.6)
            hint = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(sorted(PRESET_KEYS))}"
            _fail(path, f"unknown key '{key}' (LyCORIS's apply_preset refuses it); {hint}")
    out: dict[str, Any] = {}
    use_fnmatch = _truthy(f"{path}.use_fnmatch", data["use_fnmatch"], warn) if "use_fnmatch" in data else False
    if "use_fnmatch" in data:
        out["use_fnmatch"] = use_fnmatch
    if "target_module" in data:
        targets = data["target_module"]
        if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
            _fail(f"{path}.target_module", f"must be a list of class names, got {targets!r}")
        out["target_module"] = tuple(targets)
    for key in ("target_name", "exclude_name"):
        if key in data:
            out[key] = _check_patterns(f"{path}.{key}", data[key], use_fnmatch)
    if "module_algo_map" in data:
        out["module_algo_map"] = _check_map(f"{path}.module_algo_map", data["module_algo_map"], use_fnmatch, False, warn)
    if "name_algo_map" in data:
        out["name_algo_map"] = _check_map(f"{path}.name_algo_map", data["name_algo_map"], use_fnmatch, True, warn)
    if "enable_conv" in data:
        out["enable_conv"] = _truthy(f"{path}.enable_conv", data["enable_conv"], warn)
    if "lora_prefix" in data:
        out["lora_prefix"] = _string(f"{path}.lora_prefix", data["lora_prefix"], warn)
    return out


def parse_preset(data: Any, warn: Warn | None = None) -> PresetSpec:
    """An `apply_preset` block. Keys it leaves out keep the pack's explicit defaults (no targets by name)."""
    fields = _preset_fields("apply_preset", data, warn or (lambda _: None))
    defaults = {"target_module": (), "target_name": (), "module_algo_map": {}, "name_algo_map": {},
                "exclude_name": (), "use_fnmatch": False, "enable_conv": True, "lora_prefix": "lycoris"}
    return PresetSpec(**{**defaults, **fields})


# -- preset files --------------------------------------------------------------------------------

def preset_folders() -> list[Path]:
    """Where `preset` files are read from: the pack's configs folder, ComfyUI's input folder (when
    running inside ComfyUI) and EXTRA_PRESET_FOLDERS. Nothing else: a config must not read any file."""
    folders = [PACK_CONFIGS]
    folder_paths = sys.modules.get("folder_paths")  # ComfyUI's module, only when ComfyUI is running
    if folder_paths is not None and hasattr(folder_paths, "get_input_directory"):
        folders.append(Path(folder_paths.get_input_directory()))
    return [*folders, *EXTRA_PRESET_FOLDERS]


def _find_preset_file(name: str) -> Path:
    from .paths import PathNameError, resolve_inside

    roots = [folder.resolve() for folder in preset_folders() if folder.is_dir()]
    where = " or ".join(str(root) for root in roots) or "the pack's configs folder"
    candidate = Path(name)
    if candidate.is_absolute():
        resolved = candidate.resolve()
        if resolved.is_file() and any(resolved.is_relative_to(root) for root in roots):
            return resolved
    else:
        for root in roots:
            try:
                path = resolve_inside(root, name, "preset", new=False, where=str(root))
            except PathNameError as err:
                raise ConfigError(str(err)) from None
            if path.is_file():
                return path
    raise ConfigError(f"preset: '{name}' is neither a LyCORIS built-in preset ({', '.join(BUILTIN_PRESETS)}) "
                      f"nor a preset file in {where}; preset files are read from those folders only")


def read_preset_file(name: str, warn: Warn) -> tuple[dict, Path]:
    """The keys of a LyCORIS preset file (TOML, read as LyCORIS's `read_preset` reads it), validated."""
    import toml

    path = _find_preset_file(name)
    try:
        raw = toml.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, toml.TomlDecodeError) as err:
        raise ConfigError(f"preset: cannot read the preset file {path.name} ({err}); LyCORIS reads TOML") from None
    try:
        from lycoris.config_sdk import PresetConfig, PresetValidationError
    except ImportError:  # pragma: no cover - LyCORIS is a requirement
        PresetConfig = None
    if PresetConfig is not None:
        try:
            raw = PresetConfig.from_dict(raw).to_dict()
        except PresetValidationError as err:
            raise ConfigError(f"preset: {path.name}: {err}") from None
    return _preset_fields(f"preset ({path.name})", raw, warn), path


# -- SimpleTuner's rules -----------------------------------------------------------------------------

def simpletuner_rule_errors(data: Mapping[str, Any]) -> list[str]:
    """What SimpleTuner's `--lycoris_config` check refuses (helpers/configuration/cmd_args.py asserts)."""
    errors = [f"{key}: required field is missing" for key in ("algo", "multiplier") if key not in data]
    if "full_matrix" not in data or data.get("full_matrix") is not True:
        if "linear_dim" not in data:
            errors.append("linear_dim: required field is missing (linear_dim may be left out only with "
                          "full_matrix: true, the JSON value; SimpleTuner does not count the text \"true\")")
    if "linear_alpha" not in data:
        errors.append("linear_alpha: required field is missing")
    return errors


def _apply_deprecated(data: dict, warn: Warn) -> None:
    """create_lycoris's handling of deprecated keys, as it is (lycoris/wrapper.py): each is copied to its
    new name, then `use_tucker = str_bool(not disable_conv_cp(True) or use_conv_cp or use_cp or use_tucker)`."""
    present = [k for k in data if k in DEPRECATED_KEYS]
    if not present:
        return
    kwargs = dict(data)
    for key in present:
        kwargs[DEPRECATED_KEYS[key]] = data[key]
        warn(f"{key}: deprecated in LyCORIS, read as '{DEPRECATED_KEYS[key]}'")
    if any(DEPRECATED_KEYS[k] == "use_tucker" for k in present):
        chained = (not kwargs.get("disable_conv_cp", True) or kwargs.get("use_conv_cp", False)
                   or kwargs.get("use_cp", False) or kwargs.get("use_tucker", False))
        data["use_tucker"] = str(chained).lower() != "false"
    if "constrain" in present:
        data["constraint"] = data["constrain"]
    for key in present:
        data.pop(key)


def parse_config(source: str | Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> LycorisConfig:
    """Validate a SimpleTuner LyCORIS config (JSON text or dict) with optional top-level overrides."""
    if not isinstance(source, str):
        _check_depth(source)
    _check_depth(overrides or {})
    data = load_json(source) if isinstance(source, str) else copy.deepcopy(dict(source))
    data.update(overrides or {})
    warnings: list[str] = []
    warn = warnings.append
    _apply_deprecated(data, warn)
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():  # values first (a message names what is wrong), then what is missing
        if key in TOP_LEVEL:
            values[key] = TOP_LEVEL[key](key, value, warn)
        elif key not in DOC_KEYS and key != "apply_preset":
            _unknown_key("config", key, [*TOP_LEVEL, *DOC_KEYS, "apply_preset"], warn, "create_lycoris")
            extra[key] = value
    errors = simpletuner_rule_errors(data)
    if errors:
        raise ConfigError(errors[0])
    docs = {key: DOC_KEYS[key](key, value, warn) for key, value in data.items() if key in DOC_KEYS}
    algo = values["algo"]
    if values["multiplier"] == 0:
        shown = f"{data['multiplier']!r} becomes 0 in SimpleTuner's int(), which" if data["multiplier"] != 0 else "0"
        _fail("multiplier", f"{shown} switches the adapter off in training; use 1")
    linear_dim = values.get("linear_dim", SIMPLETUNER_CASTS["linear_dim"][1])
    preset = parse_preset(data["apply_preset"], warn) if "apply_preset" in data else PresetSpec()
    preset, enable_conv, preset_file = _create_lycoris_preset(values.get("preset", "full"), preset, data, warn)
    warnings += _semantic_warnings(values, data, algo, linear_dim, preset)
    keywords = {k: v for k, v in values.items() if k in MODULE_KEYWORDS}
    normalised = {**values, **extra, **({"apply_preset": data["apply_preset"]} if "apply_preset" in data else {}),
                  **{k: data[k] for k in docs}}
    return LycorisConfig(
        algo=algo, multiplier=float(values["multiplier"]), linear_dim=linear_dim,
        linear_alpha=values["linear_alpha"], preset=preset, keywords=keywords,
        tlora_min_rank=values.get("tlora_min_rank", SIMPLETUNER_CASTS["tlora_min_rank"][1]),
        tlora_alpha=values.get("tlora_alpha", SIMPLETUNER_CASTS["tlora_alpha"][1]),
        source=normalised, warnings=tuple(dict.fromkeys(warnings)),
        description=docs.get("description", ""), families=docs.get("families", ()),
        enable_conv=enable_conv, preset_file=preset_file,
    )


def _create_lycoris_preset(name: str, preset: PresetSpec, data: dict, warn: Warn
                           ) -> tuple[PresetSpec, bool, str | None]:
    """create_lycoris's own `preset` step, after apply_preset: (selection in effect, enable_conv, file)."""
    if name in BUILTIN_PRESETS:
        return preset, BUILTIN_PRESETS[name], None
    fields, path = read_preset_file(name, warn)
    if "apply_preset" in data:
        replaced = sorted(k for k in fields if k in data["apply_preset"])
        if replaced:
            warn(f"preset: {path.name} replaces apply_preset's {', '.join(replaced)} (create_lycoris applies the "
                 "preset file after apply_preset)")
    enable_conv = fields.get("enable_conv", preset.enable_conv if "apply_preset" in data else True)
    return PresetSpec(**{**preset.__dict__, **fields}), enable_conv, str(path)


def _semantic_warnings(values: dict, data: dict, algo: str, linear_dim: int, preset: PresetSpec) -> list[str]:
    """Settings that parse but do not do what their author likely meant."""
    warnings = []
    tlora_fields = [k for k in ("tlora_min_rank", "tlora_alpha") if k in values]
    if tlora_fields and algo != "tlora":
        warnings.append(f"{', '.join(tlora_fields)}: only used by algo 'tlora'; ignored for '{algo}'")
    if algo == "tlora" and values.get("tlora_min_rank", 1) > linear_dim:
        warnings.append(f"tlora_min_rank: {values['tlora_min_rank']} is larger than linear_dim {linear_dim}: "
                        "every rank is active at every timestep (LyCORIS caps r at linear_dim)")
    if values.get("full_matrix") and algo != "lokr":
        warnings.append(f"full_matrix: only used by algo 'lokr'; ignored for '{algo}'")
    if "factor" in values and algo != "lokr":
        warnings.append(f"factor: only used by algo 'lokr'; ignored for '{algo}'")
    if values.get("linear_alpha") == 0:
        was = data.get("linear_alpha")
        became = f"{was!r} becomes 0 in SimpleTuner" if was != 0 else "0"
        warnings.append(f"linear_alpha: {became}: LyCORIS then uses alpha = dim (scale 1)")
    for key in NOT_PASSED_AT_TOP:
        if key in values:
            warnings.append(f"{key}: create_lycoris does not pass it on from the top level (LyCORIS 4.1.3); "
                            "set it per target in apply_preset.module_algo_map / name_algo_map")
    groups = [f"{where}.{name}" for where, table in (("module_algo_map", preset.module_algo_map),
                                                      ("name_algo_map", preset.name_algo_map))
              for name, entry in table.items() if entry.get("mask_group_id", 0) != 0]
    if algo == "tlora" or any(e.get("algo") == "tlora" for t in (preset.module_algo_map, preset.name_algo_map)
                              for e in t.values()):
        if groups:
            warnings.append(f"mask_group_id: SimpleTuner sets the T-LoRA mask of group 0 only; {', '.join(groups)} "
                            "run with every rank active there")
    return warnings
