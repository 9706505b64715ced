"""Atomic training checkpoints without pickle: one safetensors file per checkpoint.

A checkpoint holds everything a resume needs: the adapter tensors (LyCORIS names, T-LoRA base
included), the optimizer state (its tensors as safetensors entries, everything else as JSON in
the metadata), the step, RNG states (torch CPU, CUDA when in use, and named generators such as
the trainer's noise generator, each as a uint8 tensor), the job spec and free-form JSON extras;
when the job keeps one, the adapter's EMA (`ema.` tensors), and ModelSpec keys in the metadata.
Nothing is unpickled on load, so a checkpoint from elsewhere cannot run code.

Every checkpoint carries a sha256 checksum of each tensor (its name, dtype, shape and raw bytes)
and of the other metadata, in the safetensors metadata (`lycoris_trainer.checksum`).
`load_checkpoint` verifies it: a file whose header parses but whose data was damaged (bytes
overwritten, truncated) is a CheckpointError naming the file and what failed. Checkpoints written
before checksums existed still load, with a note saying they could not be verified.

Writes go to a hidden temp file in the same folder, are flushed to disk, then `os.replace`d onto
`checkpoint-<step>.safetensors`: a crash (even SIGKILL mid-write) leaves the previous checkpoint
intact, and temp files never match the checkpoint name pattern, so nothing partial is listed or
resumed from; the next save deletes stale temp files. A new checkpoint is read back and verified
before older ones are pruned. `resume_point` picks the newest intact checkpoint, naming each newer
one it had to skip, and refuses (CheckpointError) when checkpoints exist but none is intact, so a
job never silently restarts at step 0. One writer per folder is assumed (one job owns its folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..core.adapter_file import PACK_PREFIX, SUFFIX, AdapterFileError, atomic_save_file, resolve_in_folder

FORMAT_KEY = "lycoris_trainer.format"
FORMAT_VERSION = "1"
_NAME = re.compile(r"^checkpoint-(\d{8,})\.safetensors$")
_TEMP = re.compile(r"^\.checkpoint-\d{8,}\.[0-9a-f]+\.tmp$")
_META_KEYS = ("step", "optimizer", "rng", "job", "extra")
CHECKSUM_KEY = "lycoris_trainer.checksum"
CHECKSUM_ALGORITHM = "sha256"


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
    notes: list[str] = field(default_factory=list)  # filled by load_checkpoint (e.g. "no checksum"); never saved
    ema: dict[str, torch.Tensor] = field(default_factory=dict)  # the adapter's EMA shadow (trainer.ema), if kept
    file_metadata: dict[str, str] = field(default_factory=dict)  # extra safetensors metadata (ModelSpec keys)


@dataclass
class ResumePoint:
    """The newest intact checkpoint of a folder, loaded, and the newer ones that were skipped."""

    state: TrainingState
    path: Path
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why), newest first

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def notes(self) -> list[str]:
        """One line per skipped file, then the loaded checkpoint's own notes (e.g. written without checksum)."""
        return [f"skipped {p.name}: {why}" for p, why in self.skipped] + list(self.state.notes)


class NoIntactCheckpointError(CheckpointError):
    """Checkpoint files exist but none can be used; `skipped` lists each (file, why), newest first."""

    def __init__(self, folder: Path, skipped: list[tuple[Path, str]]):
        self.folder, self.skipped = folder, skipped
        listing = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        super().__init__(f"{folder}: no intact checkpoint to resume from ({listing}); move these files away to "
                         "start the job from step 0")


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


def _tensor_digest(key: str, tensor: torch.Tensor) -> str:
    """sha256 of a tensor's name, dtype, shape and raw bytes (a contiguous CPU tensor)."""
    digest = hashlib.sha256(f"{key}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
    digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _metadata_digest(metadata: Mapping[str, str]) -> str:
    """sha256 of every metadata entry except the checksum itself, in key order."""
    items = sorted((k, v) for k, v in metadata.items() if k != CHECKSUM_KEY)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    return json.dumps({"algorithm": CHECKSUM_ALGORITHM, "metadata": _metadata_digest(metadata),
                       "tensors": {k: _tensor_digest(k, tensors[k]) for k in sorted(tensors)}})


def _verify(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> list[str]:
    """Raise CheckpointError when the checksum does not match; returns notes (none, or 'no checksum')."""
    if CHECKSUM_KEY not in metadata:
        return [f"{path.name}: written without a checksum (older format); its data could not be verified"]
    try:
        checksum = json.loads(metadata[CHECKSUM_KEY])
        algorithm, meta_digest, digests = checksum["algorithm"], checksum["metadata"], checksum["tensors"]
        if not isinstance(digests, dict):
            raise TypeError("tensors is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path.name}: checksum metadata is malformed ({err})") from None
    if algorithm != CHECKSUM_ALGORITHM:
        raise CheckpointError(f"{path.name}: checksum algorithm {algorithm!r} is not {CHECKSUM_ALGORITHM}")
    if meta_digest != _metadata_digest(metadata):
        raise CheckpointError(f"{path.name}: metadata does not match its checksum (header altered)")
    missing, extra = sorted(set(digests) - set(tensors)), sorted(set(tensors) - set(digests))
    if missing or extra:
        what = [f"missing tensors {_some(missing)}"] * bool(missing) + [f"unlisted tensors {_some(extra)}"] * bool(extra)
        raise CheckpointError(f"{path.name}: tensors do not match the checksum list ({'; '.join(what)})")
    bad = [k for k in sorted(tensors) if _tensor_digest(k, tensors[k]) != digests[k]]
    if bad:
        raise CheckpointError(f"{path.name}: data corrupted: {len(bad)} of {len(tensors)} tensors do not match their "
                              f"checksum ({_some(bad)})")
    return []


def _some(names: list[str], show: int = 3) -> str:
    more = len(names) - show
    return ", ".join(names[:show]) + (f" and {more} more" if more > 0 else "")


def _contents(state: TrainingState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {f"adapter.{k}": v for k, v in state.adapter.items()}
    optimizer = _encode(state.optimizer, "optimizer", tensors)
    tensors.update({f"rng.{k}": v for k, v in state.rng.items()})
    tensors.update({f"ema.{k}": v for k, v in state.ema.items()})
    reserved = sorted(k for k in state.file_metadata if k in (FORMAT_KEY, CHECKSUM_KEY, *_META_KEYS))
    if reserved:
        raise CheckpointError(f"checkpoint: metadata key {reserved[0]!r} is the checkpoint's own")
    try:
        metadata = {**state.file_metadata, FORMAT_KEY: FORMAT_VERSION, "step": str(int(state.step)), "optimizer": json.dumps(optimizer),
                    "rng": json.dumps(sorted(state.rng)), "job": json.dumps(state.job),
                    "extra": json.dumps(state.extra)}
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint: job spec or extras are not JSON: {err}") from None
    # Private contiguous CPU copies: safetensors refuses shared storage, and training goes on.
    prepared = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    metadata[CHECKSUM_KEY] = _checksum(prepared, metadata)
    return prepared, metadata


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: str | os.PathLike[str], state: TrainingState, keep_last: int | None = None) -> Path:
    """Write `state` atomically as `folder/checkpoint-<step>.safetensors` (with its checksum).

    Stale temp files of earlier crashed writes are deleted. With `keep_last`, the new file is read
    back and verified first, and only then are all but the newest `keep_last` checkpoints deleted:
    a write that did not land intact raises CheckpointError and prunes nothing.
    """
    if keep_last is not None and keep_last < 1:
        raise CheckpointError(f"keep_last: must be at least 1, got {keep_last}")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    tensors, metadata = _contents(state)
    final = root / checkpoint_name(state.step)
    atomic_save_file(tensors, metadata, final)
    _fsync_dir(root)
    remove_temp_files(root)
    if keep_last is not None:
        load_checkpoint(final)  # verify what landed before deleting anything older
        prune(root, keep_last, keep=final)
    return final


def remove_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files of interrupted checkpoint writes (one writer per folder: none is in progress)."""
    root = Path(folder)
    stale = [p for p in root.iterdir() if _TEMP.match(p.name)] if root.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


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
    for path in old:
        path.unlink(missing_ok=True)
    return old + remove_temp_files(root)


def _check_size(path: Path) -> None:
    """A file shorter (or longer) than its safetensors header describes is named as such."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            header = json.loads(fh.read(length)) if length is not None and length <= min(size, 100_000_000) else None
    except (OSError, ValueError):
        return  # safe_open reports it
    if not isinstance(header, dict):
        return
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
            and len(v["data_offsets"]) == 2 and isinstance(v["data_offsets"][1], int)]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        raise CheckpointError(f"{path.name}: truncated: {size} bytes, its header describes {expected}")
    if size > expected:
        raise CheckpointError(f"{path.name}: {size - expected} bytes of unexpected data after the tensors")


def _read_metadata(path: Path) -> dict[str, str]:
    _check_size(path)
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


def resume_point(folder: str | os.PathLike[str], device: str | torch.device = "cpu") -> ResumePoint | None:
    """The newest checkpoint of `folder` that loads and verifies, with the newer ones skipped and why.

    None when the folder holds no checkpoint file at all (a fresh job starts at step 0). When it
    holds some but none is intact: NoIntactCheckpointError listing each file and reason, so that
    a job never silently starts over. Temp files of interrupted writes are never considered.
    """
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(list_checkpoints(folder)):
        try:
            state = load_checkpoint(path, device)
        except CheckpointError as err:
            text = str(err)
            skipped.append((path, text[len(path.name) + 2:] if text.startswith(f"{path.name}: ") else text))
            continue
        return ResumePoint(state, path, skipped)
    if skipped:
        raise NoIntactCheckpointError(Path(folder), skipped)
    return None


def latest_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """Path of `resume_point(folder)` (fully verified; corrupt newer files are passed over), or None.

    Kept for callers that load the file themselves; `resume_point` reads it once instead of twice.
    Raises NoIntactCheckpointError when checkpoint files exist but none is intact.
    """
    point = resume_point(folder)
    return point.path if point is not None else None


def _json(path: Path, metadata: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path.name}: metadata '{key}' is not valid JSON ({err.msg})") from None


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> TrainingState:
    """Read, verify (checksum) and validate a checkpoint; optimizer tensors land on `device` (adapter
    and RNG on the CPU). CheckpointError names the file and what failed; a checkpoint without a
    checksum (older format) loads with a note in `TrainingState.notes`."""
    path = Path(path)
    metadata = _read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path.name}: tensor data unreadable ({err})") from None
    notes = _verify(path, tensors, metadata)
    if not metadata["step"].isdigit():
        raise CheckpointError(f"{path.name}: step must be a non-negative integer, got {metadata['step']!r}")
    named = _NAME.match(path.name)
    if named and int(named.group(1)) != int(metadata["step"]):
        raise CheckpointError(f"{path.name}: holds step {int(metadata['step'])}, not the step in its name")
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
    ema = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
    extra_meta = {k: v for k, v in metadata.items() if k not in (FORMAT_KEY, CHECKSUM_KEY, *_META_KEYS)}
    return TrainingState(int(metadata["step"]), adapter, optimizer, {n: tensors[f"rng.{n}"] for n in rng_names},
                         _json(path, metadata, "job"), _json(path, metadata, "extra"), notes, ema, extra_meta)


def final_adapter(folder: str | os.PathLike[str], output_name: str, steps: int) -> Path | None:
    """The adapter file a run that finished at `steps` wrote for `output_name` in `folder`, or None.

    Looks at `<name>.safetensors` and the numbered `<name>_NNNNN.safetensors` (a taken name gets
    the next number), newest first, for one whose `lycoris_pack.steps` metadata is `steps`.
    """
    try:
        plain = resolve_in_folder(folder, output_name)
    except AdapterFileError:
        return None
    numbered = re.compile(re.escape(plain.stem) + r"_\d{5,}" + re.escape(SUFFIX) + "$", re.IGNORECASE)
    found = [p for p in (plain.parent.iterdir() if plain.parent.is_dir() else ())
             if (p == plain or numbered.match(p.name)) and p.is_file()]
    for path in sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        try:
            with safe_open(str(path), framework="pt") as fh:
                if (fh.metadata() or {}).get(f"{PACK_PREFIX}steps") == str(int(steps)):
                    return path
        except (SafetensorError, OSError):
            continue
    return None
