"""Self-contained job folders: what the Export node writes and `python -m trainer run` reads.

```
<job>/job.json              {"format", "name", "spec": JobSpec fields, "model": ModelRef fields, "dataset"}
<job>/dataset.safetensors   cached latents + conditioning tensors (no pickle), structure as JSON metadata
<job>/checkpoints/          written by the run (resume reads the latest)
<job>/loras/                the final adapter (unless the run is given another folder)
```

The base model is referenced, not copied: a ComfyUI model file plus the loader kind, or the
recipe of a tiny seeded model (`core.tiny.TinySizes`), which rebuilds bit-identically anywhere.
`read_job` checks everything it can without the model: field types, spec ranges, the LyCORIS
config in `spec.config_json`, the tiny recipe; a JobFileError names the file and the field
(`job.json: spec.steps: must be an integer (got 'ten')`). Nothing here imports ComfyUI.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

import torch
from safetensors import SafetensorError, safe_open

from ..core.adapter_file import atomic_save_file, atomic_write
from ..core.config import ConfigError, parse_config
from ..core.paths import PathNameError, resolve_inside
from ..core.tiny import TinyModelError, TinySizes, unet_config
from .data import DatasetError, TrainingSet
from .spec import DTYPES, JobSpec, SpecError
from .validation import Validation

FORMAT = "lycoris-job/1"
DATASET_FORMAT = "1"
JOB_FILE = "job.json"
DATASET_FILE = "dataset.safetensors"
MODEL_KINDS = ("tiny", "diffusion_model", "checkpoint")
MODEL_FOLDERS = {"diffusion_model": "diffusion_models", "checkpoint": "checkpoints"}  # ComfyUI model folders
# Load Diffusion Model's `weight_dtype` choices (core's UNETLoader, 0.3.75 and v0.33): how a diffusion_model
# file's weights are held. Checkpoints (Load Checkpoint has no such option) and tiny models use "default".
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
_SCALARS = (type(None), bool, int, float, str)


class JobFileError(ValueError):
    """A job folder that cannot be written or used; the message names the file and field."""


# JSON value checks for dataclass fields by their annotated type (bool is not a number here).
_TYPE_CHECKS = {
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
}


def _shown(value: Any, limit: int = 60) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_fields(cls: type, data: Any, where: str) -> None:
    """JobFileError naming `<where>.<field>` unless `data` is an object whose fields all have `cls`'s
    JSON types (int, float, str, bool annotations; others unchecked), with no unknown or missing field."""
    if not isinstance(data, dict):
        raise JobFileError(f"{where}: must be an object (got {_shown(data)})")
    hints, known = get_type_hints(cls), {f.name: f for f in fields(cls)}
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise JobFileError(f"{where}.{unknown[0]}: not a field here (known: {', '.join(known)})")
    for name, spec_field in known.items():
        if name not in data:
            if spec_field.default is MISSING and spec_field.default_factory is MISSING:
                raise JobFileError(f"{where}.{name}: missing")
            continue
        check = _TYPE_CHECKS.get(hints[name])
        if check is not None and not check[1](data[name]):
            raise JobFileError(f"{where}.{name}: must be {check[0]} (got {_shown(data[name])})")


@dataclass(frozen=True)
class ModelRef:
    """The base model of a job: a tiny recipe, or a file and the ComfyUI loader that reads it."""

    kind: str  # one of MODEL_KINDS
    tiny: TinySizes | None = None  # kind "tiny": the recipe
    dtype: str = "float32"  # kind "tiny": storage dtype of the weights
    file: str = ""  # file kinds: name inside ComfyUI's models/<MODEL_FOLDERS[kind]>
    path: str = ""  # file kinds: absolute path where the export found it
    architecture: str = ""  # core.adapter_set.architecture_key of the model; "" = not checked
    weight_dtype: str = "default"  # kind "diffusion_model": Load Diffusion Model's weight_dtype (WEIGHT_DTYPES)

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise JobFileError(f"model.kind: must be one of {', '.join(MODEL_KINDS)} (got {self.kind!r})")
        if self.kind == "tiny" and self.tiny is None:
            raise JobFileError("model.tiny: a tiny model needs its recipe (TinySizes fields)")
        if self.kind != "tiny" and not (self.file or self.path):
            raise JobFileError(f"model.file: a {self.kind} needs a file name or path")
        if self.dtype not in DTYPES:
            raise JobFileError(f"model.dtype: must be one of {', '.join(DTYPES)} (got {_shown(self.dtype)})")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise JobFileError(f"model.weight_dtype: must be one of {', '.join(WEIGHT_DTYPES)} "
                               f"(got {_shown(self.weight_dtype)})")
        if self.weight_dtype != "default" and self.kind != "diffusion_model":
            raise JobFileError(f"model.weight_dtype: only a diffusion_model file is loaded with a weight dtype "
                               f"(Load Diffusion Model's option); a {self.kind} takes 'default' "
                               f"(got {_shown(self.weight_dtype)})")
        if self.tiny is not None:
            try:
                unet_config(self.tiny)  # the recipe must form a model (names the bad size)
            except (TinyModelError, TypeError) as err:
                raise JobFileError(f"model.tiny.{' '.join(str(err).split())}") from None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tiny"] = asdict(self.tiny) if self.tiny is not None else None
        return out

    @classmethod
    def from_dict(cls, data: Any) -> ModelRef:
        check_fields(cls, data, "model")
        tiny = data.get("tiny")
        if tiny is not None:
            check_fields(TinySizes, tiny, "model.tiny")
            tiny = TinySizes(**tiny)
        return cls(**{**data, "tiny": tiny})

    def describe(self) -> str:
        if self.kind == "tiny":
            return f"tiny {self.tiny}"
        weights = f" (weight_dtype {self.weight_dtype})" if self.weight_dtype != "default" else ""
        return f"{self.kind} {self.file or self.path}{weights}"


@dataclass(frozen=True)
class JobFolder:
    folder: Path
    name: str
    spec: JobSpec
    model: ModelRef
    dataset: Path
    validation: Validation | None = None

    @property
    def checkpoints(self) -> Path:
        return self.folder / "checkpoints"

    @property
    def loras(self) -> Path:
        return self.folder / "loras"


# -- dataset -------------------------------------------------------------------------------------

def _encode_conditioning(conditioning: Any, prefix: str, sink: dict[str, torch.Tensor]) -> list[dict]:
    """A ComfyUI CONDITIONING ([[tensor, {extras}], ...]) as JSON, its tensors into `sink`."""
    if not isinstance(conditioning, (list, tuple)):
        raise JobFileError(f"{prefix}: a CONDITIONING must be a list, got {type(conditioning).__name__}")
    entries = []
    for j, entry in enumerate(conditioning):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], torch.Tensor)
                and isinstance(entry[1], dict)):
            raise JobFileError(f"{prefix}.{j}: expected [tensor, dict]")
        sink[f"{prefix}.{j}.cond"] = entry[0]
        extras = {}
        for k, (key, value) in enumerate(entry[1].items()):
            if isinstance(value, torch.Tensor):
                sink[f"{prefix}.{j}.{k}"] = value
                extras[key] = {"tensor": f"{prefix}.{j}.{k}"}
            elif isinstance(value, _SCALARS):
                extras[key] = {"value": value}
            else:
                raise JobFileError(f"{prefix}.{j}: conditioning value '{key}' is a {type(value).__name__}, "
                                   "which a job file cannot hold (tensors and plain values only)")
        entries.append({"cond": f"{prefix}.{j}.cond", "extras": extras})
    return entries


def _decode_conditioning(entries: Any, tensors: dict[str, torch.Tensor], where: str) -> list:
    def tensor(name: Any) -> torch.Tensor:
        if name not in tensors:
            raise JobFileError(f"{where}: tensor '{name}' is referenced but missing")
        return tensors[name]

    out = []
    for entry in entries:
        extras = {key: tensor(v["tensor"]) if "tensor" in v else v["value"] for key, v in entry["extras"].items()}
        out.append([tensor(entry["cond"]), extras])
    return out


def save_dataset(path: Path, data: TrainingSet) -> Path:
    """Write a TrainingSet (latents, conditionings, settings) to one safetensors file, atomically."""
    tensors: dict[str, torch.Tensor] = {f"latent.{i}": latent for i, latent in enumerate(data.latents)}
    layout = {
        "latents": len(data.latents),
        "conditionings": [_encode_conditioning(c, f"cond.{i}", tensors) for i, c in enumerate(data.conditionings)],
        "empty": None if data.empty_conditioning is None else _encode_conditioning(data.empty_conditioning, "empty",
                                                                                     tensors),
        "repeats": data.repeats, "caption_dropout": data.caption_dropout, "captions": list(data.captions),
    }
    # Private contiguous CPU copies: safetensors refuses views and shared storage.
    prepared = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    metadata = {"lycoris_dataset.format": DATASET_FORMAT, "dataset": json.dumps(layout)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_file(prepared, metadata, path)
    return path


def load_dataset(path: Path) -> TrainingSet:
    """Read what `save_dataset` wrote; errors name the file."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as err:
        raise JobFileError(f"{path.name}: not a readable safetensors file ({err})") from None
    if metadata.get("lycoris_dataset.format") != DATASET_FORMAT:
        raise JobFileError(f"{path.name}: not a job dataset of format {DATASET_FORMAT}")
    try:
        layout = json.loads(metadata["dataset"])
        latents = [tensors[f"latent.{i}"] for i in range(int(layout["latents"]))]
        conds = [_decode_conditioning(c, tensors, f"{path.name}: cond.{i}")
                 for i, c in enumerate(layout["conditionings"])]
        empty = None if layout["empty"] is None else _decode_conditioning(layout["empty"], tensors, f"{path.name}: empty")
        return TrainingSet(latents, conds, int(layout["repeats"]), float(layout["caption_dropout"]), empty,
                           list(layout["captions"]))
    except JobFileError:
        raise
    except DatasetError as err:
        raise JobFileError(f"{path.name}: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise JobFileError(f"{path.name}: malformed dataset layout ({type(err).__name__}: {err})") from None


# -- validation previews -------------------------------------------------------------------------

VALIDATION_FILE = "validation.safetensors"
_VALIDATION_SETTINGS = ("sampler_name", "scheduler", "steps", "cfg", "seed", "strengths", "every", "guidance")


def save_validation(path: Path, validation: Validation) -> dict:
    """Conditioning and latent of a Validation into `path` (atomically); returns its job.json entry.

    The VAE is not part of a job folder: headless previews use the latent preview projection."""
    tensors: dict[str, torch.Tensor] = {"latent": validation.latent["samples"]}
    layout = {"positive": _encode_conditioning(validation.positive, "positive", tensors),
              "negative": _encode_conditioning(validation.negative, "negative", tensors)}
    prepared = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    atomic_save_file(prepared, {"lycoris_validation": json.dumps(layout)}, path)
    settings = {k: getattr(validation, k) for k in _VALIDATION_SETTINGS}
    return {**settings, "strengths": list(validation.strengths), "file": path.name}


def load_validation(folder: Path, entry: Any) -> Validation:
    """The Validation a job.json entry and its file describe; JobFileError names the field."""
    if not isinstance(entry, dict):
        raise JobFileError(f"validation: must be an object (got {_shown(entry)})")
    missing = [k for k in (*_VALIDATION_SETTINGS, "file") if k not in entry]
    if missing:
        raise JobFileError(f"validation.{missing[0]}: missing")
    try:
        path = resolve_inside(folder, entry["file"], "validation.file", new=False, where="the job folder")
        with safe_open(str(path), framework="pt") as fh:
            layout = json.loads((fh.metadata() or {})["lycoris_validation"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        return Validation(_decode_conditioning(layout["positive"], tensors, "validation.positive"),
                          _decode_conditioning(layout["negative"], tensors, "validation.negative"),
                          {"samples": tensors["latent"]}, str(entry["sampler_name"]), str(entry["scheduler"]),
                          int(entry["steps"]), float(entry["cfg"]), int(entry["seed"]),
                          tuple(float(s) for s in entry["strengths"]), int(entry["every"]),
                          None if entry["guidance"] is None else float(entry["guidance"]))
    except JobFileError:
        raise
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        raise JobFileError(f"validation: unusable ({type(err).__name__}: {err})") from None


# -- job folders ---------------------------------------------------------------------------------

def _atomic_text(final: Path, text: str) -> None:
    """Write `text` to `final` atomically (temp file, fsync, rename)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(final, lambda tmp: tmp.write_text(text))


def write_job(folder: Path, spec: JobSpec, data: TrainingSet, model: ModelRef, name: str = "",
              validation: Validation | None = None) -> Path:
    """Write a job folder (dataset first, job.json last: a folder with job.json is complete); returns job.json."""
    folder = Path(folder)
    target = folder / JOB_FILE
    if target.exists():
        raise JobFileError(f"{target}: already holds a job; export into a new folder")
    save_dataset(folder / DATASET_FILE, data)
    document = {"format": FORMAT, "name": name or spec.output_name, "spec": json.loads(spec.to_json()),
                "model": model.to_dict(), "dataset": DATASET_FILE}
    if validation is not None:
        document["validation"] = save_validation(folder / VALIDATION_FILE, validation)
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    _atomic_text(target, text)
    return target


def read_job(path: str | os.PathLike[str]) -> JobFolder:
    """A job folder (or its job.json) -> JobFolder; JobFileError names what is wrong."""
    path = Path(path)
    target = path / JOB_FILE if path.is_dir() else path
    if not target.is_file():
        raise JobFileError(f"{target}: no job file (export one with the Export LyCORIS Job node)")
    try:
        document = json.loads(target.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise JobFileError(f"{target.name}: not valid JSON ({err})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise JobFileError(f"{target.name}: format must be '{FORMAT}'")
    try:
        spec = read_spec(document.get("spec"))
        model = ModelRef.from_dict(document.get("model"))
    except JobFileError as err:
        raise JobFileError(f"{target.name}: {err}") from None
    for key in ("name", "dataset"):
        if not isinstance(document.get(key, ""), str):
            raise JobFileError(f"{target.name}: {key}: must be a string (got {_shown(document[key])})")
    try:
        dataset = resolve_inside(target.parent, document.get("dataset") or DATASET_FILE, "dataset", new=False,
                                 where="the job folder")
    except PathNameError as err:
        raise JobFileError(f"{target.name}: {err}") from None
    if not dataset.is_file():
        raise JobFileError(f"{target.name}: dataset: {dataset} does not exist")
    validation = None
    if document.get("validation") is not None:
        try:
            validation = load_validation(target.parent, document["validation"])
        except (JobFileError, PathNameError, ValueError) as err:
            raise JobFileError(f"{target.name}: {err}") from None
    return JobFolder(target.parent, document.get("name") or spec.output_name, spec, model, dataset, validation)


def read_spec(data: Any) -> JobSpec:
    """The `spec` object of a job file -> JobSpec, its LyCORIS config parsed too; JobFileError names `spec.<field>`."""
    check_fields(JobSpec, data, "spec")
    try:
        spec = JobSpec(**data)
    except SpecError as err:  # its message starts with the field name
        raise JobFileError(f"spec.{' '.join(str(err).split())}") from None
    try:
        parse_config(spec.config_json)
    except ConfigError as err:
        raise JobFileError(f"spec.config_json: {' '.join(str(err).split())}") from None
    return spec
