"""LyCORIS adapter files (SimpleTuner's `pytorch_lora_weights.safetensors` format), read and written safely.

Keys are `<lora_prefix>_<diffusers path with "." -> "_">.<param>` (prefix `lycoris` unless the
config's `apply_preset.lora_prefix` says otherwise); metadata `lycoris_config` holds the SimpleTuner
config JSON. Only safetensors are read: pickle formats can run code when loaded. Names given by
users resolve inside their folder only, and writes go to a temp file renamed into place, so a
crash never leaves a partial file under the final name.
"""

from __future__ import annotations

import json
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

from .config import ConfigError, LycorisConfig, parse_config
from .families import Route
from .paths import PathNameError, free_name, numbered_name, resolve_inside, safe_relative_name

SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
CONFIG_KEY = "lycoris_config"  # the metadata key SimpleTuner writes (json.dumps of its config file)
PACK_PREFIX = "lycoris_pack."  # our own metadata keys, namespaced so no other tool's keys collide
DEFAULT_LORA_PREFIX = "lycoris"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
OUTPUT_FOLDER = "the output folder"
T = TypeVar("T")


class AdapterFileError(ValueError):
    """An adapter file (or a name for one) that cannot be used; the message names the file or key."""


@dataclass(frozen=True)
class AdapterFile:
    """A loaded adapter: tensors grouped by LyCORIS module, and what its metadata says."""

    path: Path
    modules: dict[str, dict[str, torch.Tensor]]  # lora_name -> {param: tensor}
    metadata: dict[str, str]
    config: LycorisConfig | None = None
    raw_config: dict[str, Any] | None = None  # the lycoris_config JSON, kept even when parse_config rejects it
    warnings: list[str] = field(default_factory=list)

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


def _parse_metadata_config(metadata: Mapping[str, str]) -> tuple[LycorisConfig | None, dict | None, list[str]]:
    """The `lycoris_config` metadata, strictly parsed if possible; a rejected config is a warning, not a failure."""
    text = metadata.get(CONFIG_KEY)
    if text is None:
        return None, None, []
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        return None, None, [f"{CONFIG_KEY} metadata is not valid JSON ({err.msg}); settings unknown"]
    except RecursionError:
        return None, None, [f"{CONFIG_KEY} metadata is nested too deeply to be a config; settings unknown"]
    if not isinstance(raw, dict):
        return None, None, [f"{CONFIG_KEY} metadata is not a JSON object; settings unknown"]
    try:
        return parse_config(raw), raw, []
    except ConfigError as err:
        return None, raw, [f"{CONFIG_KEY} metadata: {err} (the weights still load; the raw config is kept)"]


def read_adapter(path: str | os.PathLike[str]) -> AdapterFile:
    """Load a LyCORIS safetensors file on the CPU; every problem raises AdapterFileError naming the file."""
    path = Path(path)
    _check_suffix(path)
    _read_header(path)
    tensors, metadata = _load_tensors(path)
    if not tensors:
        raise AdapterFileError(f"{path.name}: contains no tensors")
    modules = _group(path.name, tensors)
    config, raw, warnings = _parse_metadata_config(metadata)
    return AdapterFile(path=path, modules=modules, metadata=metadata, config=config, raw_config=raw,
                       warnings=warnings)


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
