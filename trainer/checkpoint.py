"""Atomic training checkpoints without pickle: one safetensors file per checkpoint.

A checkpoint holds everything a resume needs: the adapter tensors (LyCORIS names, T-LoRA base
included), the optimizer state (its tensors as safetensors entries, everything else as JSON in
the metadata), the step, RNG states (torch CPU, CUDA when in use, and named generators such as
the trainer's noise generator, each as a uint8 tensor), the job spec and free-form JSON extras.
Nothing is unpickled on load, so a checkpoint from elsewhere cannot run code.

Writes go to a hidden temp file in the same folder, are flushed to disk, then `os.replace`d onto
`checkpoint-<step>.safetensors`: a crash leaves the previous checkpoint intact, and temp files
never match the checkpoint name pattern, so `latest_checkpoint` cannot pick up a partial write.
One writer per folder is assumed (one job owns its folder).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..core.adapter_file import atomic_save_file

FORMAT_KEY = "lycoris_trainer.format"
FORMAT_VERSION = "1"
_NAME = re.compile(r"^checkpoint-(\d{8,})\.safetensors$")
_TEMP = re.compile(r"^\.checkpoint-\d{8,}\.[0-9a-f]+\.tmp$")
_META_KEYS = ("step", "optimizer", "rng", "job", "extra")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or used; the message names the file and what is wrong."""


@dataclass
class TrainingState:
    """Everything saved at a step. `optimizer` is in `torch.optim.Optimizer.state_dict()` form."""

    step: int
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor] = field(default_factory=dict)  # see capture_rng
    job: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


# -- RNG -----------------------------------------------------------------------------------------

def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, torch.Tensor]:
    """RNG states as uint8 tensors: 'torch' (CPU), 'cuda.<i>' (if CUDA is initialised), 'gen.<name>'."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    for name, generator in (generators or {}).items():
        states[f"gen.{name}"] = generator.get_state()
    return states


def restore_rng(states: Mapping[str, torch.Tensor], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put back what `capture_rng` saved; a named generator without a saved state is an error."""
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    cuda = sorted((int(k.split(".")[1]), v) for k, v in states.items() if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v.cpu() for _, v in cuda][: torch.cuda.device_count()])
    for name, generator in (generators or {}).items():
        if f"gen.{name}" not in states:
            raise CheckpointError(f"rng: no saved state for generator '{name}' (saved: {sorted(states)})")
        generator.set_state(states[f"gen.{name}"].cpu())


# -- JSON with tensor references -----------------------------------------------------------------

def _encode(value: Any, path: str, sink: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of an optimizer state value; tensors go to `sink` under `path`."""
    if isinstance(value, torch.Tensor):
        sink[path] = value
        return {"__tensor__": path}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", sink) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", sink) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if any(not isinstance(k, (str, int)) for k in value):
            raise CheckpointError(f"{path}: dictionary keys must be strings or integers")
        if any(isinstance(k, str) and k.startswith("__") for k in value):
            raise CheckpointError(f"{path}: keys starting with '__' are reserved")
        return {"__dict__": [[k, _encode(v, f"{path}.{k}", sink)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"{path}: cannot store a {type(value).__name__} without pickle")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        key = value["__tensor__"]
        if key not in tensors:
            raise CheckpointError(f"{where}: tensor '{key}' is referenced but missing")
        return tensors[key]
    if "__tuple__" in value:
        return tuple(_decode(v, tensors, where) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _decode(v, tensors, where) for k, v in value["__dict__"]}
    raise CheckpointError(f"{where}: unexpected JSON object with keys {sorted(value)}")


# -- files ---------------------------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    return f"checkpoint-{int(step):08d}.safetensors"


def _contents(state: TrainingState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {f"adapter.{k}": v for k, v in state.adapter.items()}
    optimizer = _encode(state.optimizer, "optimizer", tensors)
    tensors.update({f"rng.{k}": v for k, v in state.rng.items()})
    try:
        metadata = {FORMAT_KEY: FORMAT_VERSION, "step": str(int(state.step)), "optimizer": json.dumps(optimizer),
                    "rng": json.dumps(sorted(state.rng)), "job": json.dumps(state.job),
                    "extra": json.dumps(state.extra)}
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint: job spec or extras are not JSON: {err}") from None
    # Private contiguous CPU copies: safetensors refuses shared storage, and training goes on.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}, metadata


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: str | os.PathLike[str], state: TrainingState, keep_last: int | None = None) -> Path:
    """Write `state` atomically as `folder/checkpoint-<step>.safetensors`; keep the newest `keep_last`."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    tensors, metadata = _contents(state)
    final = root / checkpoint_name(state.step)
    atomic_save_file(tensors, metadata, final)
    _fsync_dir(root)
    if keep_last is not None:
        prune(root, keep_last, keep=final)
    return final


def list_checkpoints(folder: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, path) of every file named like a checkpoint, oldest first (contents not checked)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return sorted(found)


def prune(folder: str | os.PathLike[str], keep_last: int, keep: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (never `keep`) and stale temp files."""
    if keep_last < 1:
        raise CheckpointError(f"keep_last: must be at least 1, got {keep_last}")
    root = Path(folder)
    old = [p for _, p in list_checkpoints(root)[:-keep_last] if p != keep]
    old += [p for p in root.iterdir() if _TEMP.match(p.name)]
    for path in old:
        path.unlink(missing_ok=True)
    return old


def _read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path.name}: not a readable safetensors file ({err})") from None
    if metadata.get(FORMAT_KEY) != FORMAT_VERSION:
        raise CheckpointError(f"{path.name}: not a trainer checkpoint of format {FORMAT_VERSION} "
                              f"({FORMAT_KEY} is {metadata.get(FORMAT_KEY)!r})")
    missing = [k for k in _META_KEYS if k not in metadata]
    if missing:
        raise CheckpointError(f"{path.name}: metadata lacks {', '.join(missing)}")
    return metadata


def latest_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint whose header is valid (temp files and unreadable files are passed over)."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            _read_metadata(path)
        except CheckpointError:
            continue
        return path
    return None


def _json(path: Path, metadata: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path.name}: metadata '{key}' is not valid JSON ({err.msg})") from None


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> TrainingState:
    """Read and validate a checkpoint; optimizer tensors land on `device` (adapter and RNG on the CPU)."""
    path = Path(path)
    metadata = _read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path.name}: tensor data unreadable ({err})") from None
    if not metadata["step"].isdigit():
        raise CheckpointError(f"{path.name}: step must be a non-negative integer, got {metadata['step']!r}")
    optimizer_tensors = {k: v.to(device) for k, v in tensors.items() if k.startswith("optimizer.")}
    optimizer = _decode(_json(path, metadata, "optimizer"), optimizer_tensors, f"{path.name}: optimizer")
    if not isinstance(optimizer, dict) or set(optimizer) != {"state", "param_groups"}:
        raise CheckpointError(f"{path.name}: optimizer state must have 'state' and 'param_groups'")
    rng_names = _json(path, metadata, "rng")
    missing = [n for n in rng_names if f"rng.{n}" not in tensors]
    if missing:
        raise CheckpointError(f"{path.name}: rng states {missing} are listed but missing")
    adapter = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
    if not adapter:
        raise CheckpointError(f"{path.name}: no adapter tensors")
    return TrainingState(int(metadata["step"]), adapter, optimizer, {n: tensors[f"rng.{n}"] for n in rng_names},
                         _json(path, metadata, "job"), _json(path, metadata, "extra"))
