"""LyCORIS adapter files (SimpleTuner's `pytorch_lora_weights.safetensors` format), read and written safely.

Keys are `<lora_prefix>_<diffusers path with "." -> "_">.<param>` (prefix `lycoris` unless the
config's `apply_preset.lora_prefix` says otherwise); metadata `lycoris_config` holds the SimpleTuner
config JSON. Only safetensors are read: pickle formats can run code when loaded. Names given by
users resolve inside their folder only, and writes go to a temp file renamed into place, so a
crash never leaves a partial file under the final name.

Reading never requires the metadata to be a complete training config. SimpleTuner 4.10.1 writes two
kinds of file (helpers/training/trainer.py final save, helpers/training/save_hooks.py checkpoints):
- checkpoints: metadata = the whole config file, a copy of it as `lycoris_config.json` beside;
- the final `pytorch_lora_weights.safetensors`: metadata = the config without `multiplier`,
  `linear_dim`, `linear_alpha`, `tlora_min_rank`, `tlora_alpha` (removed before create_lycoris),
  and the whole config copied as `lycoris_config.json` beside it.
So the metadata is completed from a side-car (`<name>.lycoris_config.json` or `lycoris_config.json`
in the same folder, or one folder up for SimpleTuner's `ema/` copy) when one is there, and
`tlora_settings` says what is known about the T-LoRA schedule and where it came from.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import stat
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import SIMPLETUNER_CASTS, SIMPLETUNER_STRIPPED, ConfigError, LycorisConfig, load_json, parse_config
from .families import Route
from .paths import PathNameError, free_name, numbered_name, resolve_inside, safe_relative_name

SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
CONFIG_KEY = "lycoris_config"  # the metadata key SimpleTuner writes (json.dumps of its config file)
PACK_PREFIX = "lycoris_pack."  # our own metadata keys, namespaced so no other tool's keys collide
DEFAULT_LORA_PREFIX = "lycoris"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
SIDECAR = "lycoris_config.json"  # the name SimpleTuner copies its config to, beside the weights
MAX_SIDECAR_BYTES = 1_000_000
OUTPUT_FOLDER = "the output folder"
T = TypeVar("T")


class AdapterFileError(ValueError):
    """An adapter file (or a name for one) that cannot be used; the message names the file or key."""


@dataclass(frozen=True)
class TLoraSettings:
    """What a file says about its T-LoRA schedule; None = the file does not say.

    `linear_dim` is the mask width SimpleTuner used (one mask for every module, cut or padded to
    each module's rank); `source` says where the values came from, for the Load node.
    """

    min_rank: int | None = None
    alpha: float | None = None
    linear_dim: int | None = None
    source: str = "unknown"

    @property
    def known(self) -> bool:
        return self.min_rank is not None and self.alpha is not None

    def given(self, min_rank: int | None = None, alpha: float | None = None) -> TLoraSettings:
        """These settings with the user's values (Load node inputs) in place of the file's."""
        if min_rank is None and alpha is None:
            return self
        parts = [p for p, v in (("tlora_min_rank", min_rank), ("tlora_alpha", alpha)) if v is not None]
        source = f"{' and '.join(parts)} given on the node" + ("" if self.source == "unknown" else f"; rest {self.source}")
        return TLoraSettings(self.min_rank if min_rank is None else int(min_rank),
                             self.alpha if alpha is None else float(alpha), self.linear_dim, source)


@dataclass(frozen=True)
class AdapterFile:
    """A loaded adapter: tensors grouped by LyCORIS module, and what its metadata says."""

    path: Path
    modules: dict[str, dict[str, torch.Tensor]]  # lora_name -> {param: tensor}
    metadata: dict[str, str]
    config: LycorisConfig | None = None
    raw_config: dict[str, Any] | None = None  # the lycoris_config JSON (completed from a side-car), kept even when
    warnings: list[str] = field(default_factory=list)  # parse_config rejects it
    sidecar: Path | None = None  # the lycoris_config.json whose keys completed the metadata
    tlora_settings: TLoraSettings = field(default_factory=TLoraSettings)

    @property
    def lora_prefix(self) -> str:
        """The module-name prefix the file was saved with (LyCORIS's LORA_PREFIX at save time)."""
        if self.config is not None:
            return self.config.preset.lora_prefix
        preset = (self.raw_config or {}).get("apply_preset")
        prefix = preset.get("lora_prefix") if isinstance(preset, dict) else None
        return prefix if isinstance(prefix, str) and prefix else DEFAULT_LORA_PREFIX

    @property
    def pack_info(self) -> dict[str, str]:
        """Our `lycoris_pack.*` metadata without the namespace (family, algo, rank, ...)."""
        return {k[len(PACK_PREFIX):]: v for k, v in self.metadata.items() if k.startswith(PACK_PREFIX)}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The flat `lora_name.param -> tensor` dict, as LyCORIS saves and loads it."""
        return {f"{name}.{param}": t for name, params in self.modules.items() for param, t in params.items()}


@dataclass(frozen=True)
class ModuleMatch:
    """Which of an adapter's modules exist in a model (lora_name -> diffusers path)."""

    matched: dict[str, str]
    unmatched: list[str]

    @property
    def total(self) -> int:
        return len(self.matched) + len(self.unmatched)

    def describe(self, show: int = 5) -> str:
        """One line for the UI: "25 of 25 modules matched", or which names did not."""
        text = f"{len(self.matched)} of {self.total} modules matched"
        if not self.unmatched:
            return text
        more = len(self.unmatched) - show
        names = ", ".join(self.unmatched[:show]) + (f" (and {more} more)" if more > 0 else "")
        return f"{text}; not in this model: {names}{_format_hint(self.unmatched)}"


def _format_hint(names: list[str]) -> str:
    """Name the likely cause when unmatched names look like another tool's format."""
    if any(n.startswith(("lora_unet_", "lora_te")) for n in names):
        return " (these look like kohya-style LoRA keys; use ComfyUI's LoRA loader for such files)"
    if any(n in ("transformer", "unet", "text_encoder") for n in names):
        return " (these look like diffusers/PEFT LoRA keys, not LyCORIS ones)"
    return ""


# -- reading --

def _check_suffix(path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise AdapterFileError(f"{path.name}: {suffix} files are Python pickles, which can run arbitrary code when "
                               f"loaded; only {SUFFIX} files are read. Convert it to {SUFFIX} with a tool you trust.")
    if suffix != SUFFIX:
        raise AdapterFileError(f"{path.name}: only {SUFFIX} files are read, got '{suffix or 'no extension'}'")


def _read_header(path: Path) -> dict[str, Any]:
    """Validate the safetensors header ourselves, so a damaged file gets a message a user can act on."""
    name = path.name
    if not path.is_file():
        raise AdapterFileError(f"{name}: file not found" if not path.exists() else f"{name}: is not a file")
    size = path.stat().st_size
    if size < 8:
        raise AdapterFileError(f"{name}: not a safetensors file ({'empty' if size == 0 else f'only {size} bytes'})")
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > MAX_HEADER_BYTES:
            raise AdapterFileError(f"{name}: not a safetensors file (its first 8 bytes are not a header length)")
        if length > size - 8:
            raise AdapterFileError(f"{name}: the file is truncated (its header needs {length} bytes, "
                                   f"only {size - 8} are there)")
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterFileError(f"{name}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{name}: not a safetensors file (its header is not a JSON object)")
    _check_data_size(name, header, size - 8 - length)
    return header


def _check_data_size(name: str, header: dict[str, Any], available: int) -> None:
    """The tensors' byte ranges must end exactly where the file does."""
    ends = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise AdapterFileError(f"{name}: damaged header: tensor {key!r} has no valid data_offsets")
        ends.append(offsets[1])
    end = max(ends, default=0)
    if end > available:
        raise AdapterFileError(f"{name}: the file is truncated or its header is damaged (tensor data should "
                               f"take {end} bytes, only {available} are there)")
    if end < available:
        raise AdapterFileError(f"{name}: damaged file: {available - end} unexpected bytes after the tensor data")


def _check_finite(name: str, key: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        return
    values = tensor if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else tensor.float()
    if bool(torch.isfinite(values).all()):
        return
    nans, infs = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
    raise AdapterFileError(f"{name}: tensor {key!r} contains {nans} NaN and {infs} infinite values of "
                           f"{values.numel()}; the adapter is damaged (training may have diverged)")


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors on the CPU and the metadata; safetensors' own checks back up `_read_header`."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except SafetensorError as err:
        raise AdapterFileError(f"{path.name}: not a valid safetensors file ({err})") from None
    return tensors, metadata


def _group(name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`lora_name.param` keys -> {lora_name: {param: tensor}}; the param is everything after the first dot."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        lora_name, _, param = key.partition(".")
        if not lora_name or not param:
            raise AdapterFileError(f"{name}: tensor key {key!r} is not of the form <module>.<parameter>; "
                                   f"not a LyCORIS adapter")
        _check_finite(name, key, tensor)
        modules.setdefault(lora_name, {})[param] = tensor
    return modules


def _metadata_config(metadata: Mapping[str, str]) -> tuple[dict | None, list[str]]:
    """The `lycoris_config` metadata as a dict, or None with a warning saying why."""
    text = metadata.get(CONFIG_KEY)
    if text is None:
        return None, []
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        return None, [f"{CONFIG_KEY} metadata is not valid JSON ({err.msg}); settings unknown"]
    except RecursionError:
        return None, [f"{CONFIG_KEY} metadata is nested too deeply to be a config; settings unknown"]
    if not isinstance(raw, dict):
        return None, [f"{CONFIG_KEY} metadata is not a JSON object; settings unknown"]
    try:
        load_json(json.dumps(raw))  # the depth limit
    except ConfigError as err:
        return None, [f"{CONFIG_KEY} metadata: {err}; settings unknown"]
    return raw, []


def sidecar_candidates(path: Path) -> list[Path]:
    """Where a SimpleTuner config copy for `path` may be: `<name>.lycoris_config.json`, then
    `lycoris_config.json` in the same folder, then one folder up for SimpleTuner's `ema/` file."""
    out = [path.with_name(f"{path.stem}.{SIDECAR}"), path.with_name(SIDECAR)]
    if path.parent.name == "ema":
        out.append(path.parent.parent / SIDECAR)
    return out


def _read_sidecar(path: Path) -> tuple[dict | None, Path | None, list[str]]:
    for candidate in sidecar_candidates(path):
        if not candidate.is_file():
            continue
        try:
            if candidate.stat().st_size > MAX_SIDECAR_BYTES:
                return None, None, [f"{candidate.name} beside the file is over {MAX_SIDECAR_BYTES} bytes; not read"]
            return load_json(candidate.read_text(encoding="utf-8")), candidate, []
        except (OSError, UnicodeDecodeError, ConfigError) as err:
            return None, None, [f"{candidate.name} beside the file cannot be read ({err}); not used"]
    return None, None, []


def _merge_sidecar(meta: dict | None, side: dict | None, side_path: Path | None) -> tuple[dict | None, Path | None,
                                                                                          list[str]]:
    """The metadata config completed with the side-car's keys (the metadata wins where both have a key).

    A side-car for another algorithm belongs to another adapter: it is not used."""
    if side is None:
        return meta, None, []
    if meta is None:
        return side, side_path, []
    if "algo" in meta and "algo" in side and str(meta["algo"]).lower() != str(side["algo"]).lower():
        return meta, None, [f"{side_path.name} beside the file is for algo '{side['algo']}', the file is "
                            f"'{meta['algo']}'; not used"]
    differ = sorted(k for k in meta if k in side and meta[k] != side[k])
    warnings = [f"{side_path.name} beside the file differs from the file's {CONFIG_KEY} in {', '.join(differ)}; "
                "the file's values are used"] if differ else []
    return {**side, **meta}, side_path, warnings


def _cast(kind: type, value: Any) -> int | float | None:
    """SimpleTuner's cast of a T-LoRA setting, None when it cannot be used."""
    try:
        out = kind(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return out if math.isfinite(out) and out >= 0 else None


def tlora_settings_of(meta: Mapping[str, Any] | None, side: Mapping[str, Any] | None, side_name: str | None,
                      metadata: Mapping[str, str]) -> TLoraSettings:
    """The T-LoRA schedule a file states, and where from: tlora_* keys of the metadata config, else of the
    side-car; for a complete config (one SimpleTuner could train from) SimpleTuner's defaults for keys it
    leaves out (trainer.py: int(get("tlora_min_rank", 1)), float(get("tlora_alpha", 1.0)), linear_dim
    int(get("linear_dim", 4))); else this pack's `lycoris_pack.tlora_*` metadata; None where nothing says."""
    layers = [(meta or {}, f"the file's {CONFIG_KEY}"), (side or {}, f"{side_name} beside the file")]
    complete = any("multiplier" in raw and "linear_alpha" in raw for raw, _ in layers)
    values: dict[str, Any] = {}
    sources: list[str] = []
    for key in ("tlora_min_rank", "tlora_alpha", "linear_dim"):
        kind, default = SIMPLETUNER_CASTS[key]
        found = next(((raw[key], where) for raw, where in layers if key in raw), None)
        if found is not None:
            values[key] = _cast(kind, found[0])
            sources.append(found[1])
        elif complete:
            values[key] = default
            sources.append("SimpleTuner's defaults")
        elif key != "linear_dim" and f"{PACK_PREFIX}{key}" in metadata:
            values[key] = _cast(kind, metadata[f"{PACK_PREFIX}{key}"])
            sources.append("this pack's lycoris_pack metadata")
    if values.get("tlora_min_rank") is None or values.get("tlora_alpha") is None:
        return TLoraSettings(None, None, values.get("linear_dim"), "unknown")
    return TLoraSettings(values["tlora_min_rank"], values["tlora_alpha"], values.get("linear_dim"),
                         " and ".join(dict.fromkeys(sources)))


def _describe_missing(raw: dict | None) -> str:
    stripped = [k for k in SIMPLETUNER_STRIPPED if k not in (raw or {})]
    return (f"{CONFIG_KEY} metadata has no {', '.join(stripped)} (SimpleTuner's final save removes them) and no "
            f"{SIDECAR} is beside the file; settings not in the file are unknown")


def _file_config(path: Path, metadata: Mapping[str, str]) -> tuple[LycorisConfig | None, dict | None, Path | None,
                                                                  TLoraSettings, list[str]]:
    """(config if complete, raw config, side-car used, T-LoRA settings, warnings) for a file."""
    meta, warnings = _metadata_config(metadata)
    side, side_path, more = _read_sidecar(path)
    raw, used, merged = _merge_sidecar(meta, side, side_path)
    warnings += more + merged
    settings = tlora_settings_of(meta, side if used is not None else None, used.name if used else None, metadata)
    if raw is None:
        return None, None, used, settings, warnings
    if any(k not in raw for k in ("multiplier", "linear_alpha")):
        return None, raw, used, settings, warnings + [_describe_missing(raw)]
    try:
        return parse_config(raw), raw, used, settings, warnings
    except ConfigError as err:
        return None, raw, used, settings, warnings + [f"{CONFIG_KEY}: {err} (the weights still load; the raw config "
                                                      "is kept)"]


def read_adapter(path: str | os.PathLike[str]) -> AdapterFile:
    """Load a LyCORIS safetensors file on the CPU; every problem raises AdapterFileError naming the file."""
    path = Path(path)
    _check_suffix(path)
    _read_header(path)
    tensors, metadata = _load_tensors(path)
    if not tensors:
        raise AdapterFileError(f"{path.name}: contains no tensors")
    modules = _group(path.name, tensors)
    config, raw, sidecar, settings, warnings = _file_config(path, metadata)
    return AdapterFile(path=path, modules=modules, metadata=metadata, config=config, raw_config=raw,
                       warnings=warnings, sidecar=sidecar, tlora_settings=settings)


def lora_names(routes: Mapping[str, Route], prefix: str = DEFAULT_LORA_PREFIX) -> dict[str, str]:
    """LyCORIS module name -> diffusers path; built forwards because underscores in names are ambiguous."""
    names: dict[str, str] = {}
    for path in routes:
        name = f"{prefix}_{path}".replace(".", "_")
        if name in names:
            raise ValueError(f"routes: '{names[name]}' and '{path}' both save as '{name}'")
        names[name] = path
    return names


def match_modules(adapter: AdapterFile, routes: Mapping[str, Route]) -> ModuleMatch:
    """Pair each module in the file with a diffusers path of the model (`profile.routes(unet_config)`)."""
    names = lora_names(routes, adapter.lora_prefix)
    matched = {n: names[n] for n in adapter.modules if n in names}
    unmatched = sorted(n for n in adapter.modules if n not in names)
    return ModuleMatch(matched=matched, unmatched=unmatched)


# -- names and writing --

class AdapterNameError(AdapterFileError, PathNameError):
    """A name for an adapter file that is unsafe (see core.paths); both error types catch it."""


def _named(call: Callable[[], T]) -> T:
    try:
        return call()
    except PathNameError as err:
        if isinstance(err, AdapterFileError):
            raise
        raise AdapterNameError(str(err)) from None


def resolve_in_folder(folder: str | os.PathLike[str], name: str, input_name: str = "name") -> Path:
    """The `.safetensors` path a user's `name` means inside `folder`; never outside it, even via symlinks.

    The final file may not itself be a symbolic link (writes replace files, not link targets).
    """
    root = Path(folder).resolve()
    clean = _named(lambda: safe_relative_name(name, input_name, SUFFIX))
    parts = clean.split("/")
    candidate = root.joinpath(*parts[:-1], parts[-1] + SUFFIX)
    if candidate.is_symlink():
        raise AdapterNameError(f"{input_name}: {candidate.name} is a symbolic link (got {name!r}); "
                               "not writing through it, pick another name")
    return _named(lambda: resolve_inside(root, clean, input_name, suffix=SUFFIX, where=OUTPUT_FOLDER))


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh contiguous CPU copies (no shared storage, unaffected by training going on), all finite."""
    out = {}
    for key, tensor in tensors.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise AdapterFileError(f"tensor {key!r}: keys must be strings and values tensors")
        out[key] = tensor.detach().to(device="cpu", copy=True).contiguous()
        _check_finite("adapter", key, out[key])
    if not out:
        raise AdapterFileError("adapter: no tensors to write")
    return out


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise AdapterFileError(f"metadata {key!r}: keys and values must be strings, got {type(value).__name__}")
    return dict(metadata)


def atomic_write(final: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` beside `final`, flush to disk, then rename over it: readers see the old file or the new one."""
    tmp = final.parent / f".{final.stem}.{secrets.token_hex(6)}.tmp"
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], final: Path) -> None:
    """A safetensors file written atomically, with an ordinary new file's mode (umask applies)."""

    def write(tmp: Path) -> None:
        open(tmp, "xb").close()  # unlike mkstemp's 0600
        mode = stat.S_IMODE(tmp.stat().st_mode)
        save_file(tensors, tmp, metadata)
        os.chmod(tmp, mode)  # safetensors re-creates the file as 0600; saved adapters are shared files

    atomic_write(final, write)


def write_adapter(folder: Path, name: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                  overwrite: bool = False, input_name: str = "name") -> Path:
    """Save an adapter as `folder/name.safetensors` (subfolders allowed, never outside `folder`); returns the path.

    Name errors start with `input_name` (the node input the name came from).
    """
    root = Path(folder)
    resolve_in_folder(root, name, input_name)  # refuse a bad name before creating anything
    root.mkdir(parents=True, exist_ok=True)
    final = resolve_in_folder(root, name, input_name)
    shown = final.relative_to(root.resolve()).as_posix()
    if final.exists() and not overwrite:
        raise AdapterFileError(f"{shown}: already exists; choose another name or allow overwriting")
    if final.exists() and not final.is_file():
        raise AdapterFileError(f"{shown}: exists and is not a file")
    prepared, meta = _prepare_tensors(tensors), _check_metadata(metadata)
    final.parent.mkdir(parents=True, exist_ok=True)
    final = resolve_in_folder(root, name, input_name)  # again, now that the folders exist
    atomic_save_file(prepared, meta, final)
    return final


def next_free_name(folder: str | os.PathLike[str], prefix: str, input_name: str = "name") -> str:
    """`prefix_00001`, `prefix_00002`, ...: one more than the highest counter in `folder` (core.paths)."""
    return _named(lambda: numbered_name(folder, prefix, input_name, suffix=SUFFIX, where=OUTPUT_FOLDER))


def free_adapter_name(folder: str | os.PathLike[str], name: str, input_name: str = "name") -> str:
    """`name` itself if no file has it, else the next `name_00001`, ... (core.paths.free_name)."""
    return _named(lambda: free_name(folder, name, input_name, suffix=SUFFIX, where=OUTPUT_FOLDER))


def _meta_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def adapter_metadata(config_json: str, family: str, algo: str, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Metadata for a saved adapter: SimpleTuner's `lycoris_config` as is, and ours under `lycoris_pack.`.

    `extra` adds fields such as rank, factor, tlora_min_rank, tlora_alpha, base_model_hash; None
    values are left out. `format: pt` is what diffusers writes in its LoRA files.
    """
    try:
        parsed = json.loads(config_json)
    except (TypeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{CONFIG_KEY}: not valid JSON ({err})") from None
    if not isinstance(parsed, dict):
        raise AdapterFileError(f"{CONFIG_KEY}: must be a JSON object")
    meta = {CONFIG_KEY: config_json, "format": "pt", f"{PACK_PREFIX}family": family, f"{PACK_PREFIX}algo": algo}
    for key, value in (extra or {}).items():
        if not re.fullmatch(r"[a-z0-9_]+", str(key)):
            raise AdapterFileError(f"metadata {key!r}: use lower-case letters, digits and underscores")
        if value is not None:
            meta[f"{PACK_PREFIX}{key}"] = _meta_value(value)
    return meta
