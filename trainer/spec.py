"""The job spec: everything a training run needs besides the model and data, as plain JSON.

A spec is what the Train node submits, what a checkpoint records, and what a headless job file
holds, so the same run can be resumed or moved to another machine.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from ..core.dtypes import DTYPE_NAMES
from ..core.paths import PathNameError, safe_relative_name

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")
SCHEDULES = ("constant", "cosine", "linear")
NAN_POLICIES = ("stop", "skip")
DTYPES = DTYPE_NAMES


class SpecError(ValueError):
    """A spec field is out of range; the message starts with the field name."""


def check_output_name(output_name: object, input_name: str = "output_name") -> str:
    """The clean `output_name` (core.paths rules: relative, no '..', no hidden or Windows-reserved
    parts, length kept for `.safetensors` and a `_00001` counter); SpecError naming the input if not.

    It names both `models/loras/<output_name>.safetensors` and the job folder
    `output/lycoris_jobs/<output_name>/`, so the file suffix counts against its length.
    """
    try:
        return safe_relative_name(output_name, input_name, ".safetensors")
    except PathNameError as err:
        raise SpecError(str(err)) from None


def check_init_lora(init_lora: object) -> str:
    """The clean `init_lora` name ("" = none): a `.safetensors` file named relative to the loras folder
    (core.paths rules); SpecError naming the input if not."""
    if init_lora == "":
        return ""
    if not isinstance(init_lora, str) or not init_lora.lower().endswith(".safetensors"):
        raise SpecError(f"init_lora: only .safetensors files are read (got {init_lora!r})")
    try:
        return safe_relative_name(init_lora, "init_lora", ".safetensors", new=False) + ".safetensors"
    except PathNameError as err:
        raise SpecError(str(err)) from None


@dataclass(frozen=True)
class JobSpec:
    config_json: str  # the LyCORIS config (SimpleTuner format)
    steps: int = 200
    batch_size: int = 1
    grad_accumulation: int = 1
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    gradient_checkpointing: bool = True
    save_every: int = 50
    keep_last: int = 3
    nan_policy: str = "stop"
    output_name: str = "lycoris/trained"
    guidance: float = 1.0  # guidance input for guidance-distilled Flux models during training
    flow_shift: float = 3.0  # Flux sigma shift; 0 = resolution dependent
    min_snr_gamma: float = 0.0  # SDXL min-SNR weighting, 0 = off
    init_lora: str = ""  # a LyCORIS file in the loras folder whose tensors start training ("" = LyCORIS's init)
    ema_decay: float = 0.0  # EMA of the adapter, saved beside it (0 = off; SimpleTuner's default when on: 0.995)
    ema_update_interval: int = 1  # fold the adapter into the EMA every N optimizer steps (SimpleTuner's)
    trigger_words: str = ""  # written as ModelSpec `trained_words` (comma-separated)
    init_lokr_norm: float = 0.0  # SimpleTuner's --init_lokr_norm: LoKr's perturbed-normal init at this scale (0 = off)

    def __post_init__(self) -> None:
        checks = [
            ("steps", self.steps >= 1, "must be at least 1"),
            ("batch_size", self.batch_size >= 1, "must be at least 1"),
            ("grad_accumulation", self.grad_accumulation >= 1, "must be at least 1"),
            ("learning_rate", math.isfinite(self.learning_rate) and self.learning_rate > 0, "must be > 0"),
            ("lr_schedule", self.lr_schedule in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
            ("warmup_steps", 0 <= self.warmup_steps, "must be 0 or more"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}"),
            ("dtype", self.dtype in DTYPES, f"must be one of {', '.join(DTYPES)}"),
            ("save_every", self.save_every >= 1, "must be at least 1"),
            ("keep_last", self.keep_last >= 1, "must be at least 1"),
            ("nan_policy", self.nan_policy in NAN_POLICIES, f"must be one of {', '.join(NAN_POLICIES)}"),
            ("max_grad_norm", self.max_grad_norm >= 0, "must be 0 (off) or more"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise SpecError(f"{name}: {message} (got {getattr(self, name)!r})")
        check_output_name(self.output_name)
        if isinstance(self.init_lokr_norm, bool) or not isinstance(self.init_lokr_norm, (int, float)) \
                or not math.isfinite(self.init_lokr_norm) or self.init_lokr_norm < 0:
            raise SpecError(f"init_lokr_norm: must be 0 (off) or a positive number (got {self.init_lokr_norm!r})")
        check_init_lora(self.init_lora)
        ema = [("ema_decay", 0 <= self.ema_decay < 1, "must be 0 (off) or more and below 1"),
               ("ema_update_interval", self.ema_update_interval >= 1, "must be at least 1")]
        for name, ok, message in ema:
            if not ok:
                raise SpecError(f"{name}: {message} (got {getattr(self, name)!r})")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"{unknown[0]}: not a job spec field")
        return cls(**data)

    def learning_rate_at(self, step: int) -> float:
        """The schedule's rate for 0-based `step`: linear warmup, then constant / cosine / linear decay."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / (self.warmup_steps + 1)
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        if self.lr_schedule == "cosine":
            return self.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))
        if self.lr_schedule == "linear":
            return self.learning_rate * (1 - progress)
        return self.learning_rate
