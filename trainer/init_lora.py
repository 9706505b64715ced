"""Start training from an existing LyCORIS file (SimpleTuner's `--init_lora`).

The file's tensors replace the freshly initialised ones before step 0; the optimizer starts
fresh. Unlike SimpleTuner, which builds its network from the file (`create_lycoris_from_weights`:
algorithm and ranks come from the file, the config's are ignored), the config decides here and
the file must fit it: the same modules (`lycoris_<path>` names, the config's lora_prefix), the same
tensors with the same shapes, the same alpha. `check_init_file` checks names and shapes at submit
from the file's header alone (no tensor is read); `load_init_lora` loads it at the start of the
run. Frozen tensors the file does not hold keep this run's values: T-LoRA's frozen base (LyCORIS
saves none), alpha. Only `.safetensors` files are read.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..core.adapter_file import AdapterFileError, read_adapter
from ..core.lycoris_modules import _stand_in, adapter_param_shapes, build_adapter
from ..core.targets import Plan, PlannedTarget
from .trainable import FROZEN_KEYS, TrainableAdapter, TrainerError

INPUT = "init_lora"


class InitLoraError(ValueError):
    """The init file cannot start this run; the message starts with `init_lora` and names the file and key."""


def _fail(path: Path, text: str) -> InitLoraError:
    return InitLoraError(f"{INPUT}: {path.name}: {text}")


def saved_shapes(target: PlannedTarget) -> dict[str, tuple[int, ...]]:
    """The tensors LyCORIS saves for `target` and their shapes (built on `meta`: no memory)."""
    if target.algo == "full":  # FullModule copies the base weight, which a meta tensor cannot give
        return adapter_param_shapes(target)
    with torch.device("meta"):
        module = build_adapter(target, _stand_in(target))
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix.lower() != ".safetensors":
        raise _fail(path, "only .safetensors files are read (pickle formats can run code)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError) as err:
        raise _fail(path, f"not a readable safetensors file ({err})") from None


def check_init_file(path: str | os.PathLike[str], plan: Plan) -> None:
    """InitLoraError naming the first key (in sorted order) where the file does not fit `plan`."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "file not found")
    have = _file_shapes(path)
    want: dict[str, tuple[int, ...]] = {}
    for target in plan.targets:
        want.update({f"{target.lora_name}.{k}": s for k, s in saved_shapes(target).items()})
    problems = []
    for key in sorted(set(have) | set(want)):
        param = key.partition(".")[2]
        if key not in have:
            if param not in FROZEN_KEYS:
                problems.append(f"{key}: missing from the file (this config trains it)")
        elif key not in want:
            module = key.partition(".")[0]
            known = any(k.startswith(f"{module}.") for k in want)
            if known and param in FROZEN_KEYS:  # e.g. T-LoRA's frozen base, which this pack's files hold
                continue
            problems.append(f"{key}: not in this config's adapter ("
                            + ("another algorithm or rank split for this module" if known else
                               "a module this config does not adapt") + ")")
        elif have[key] != want[key]:
            problems.append(f"{key}: shape {list(have[key])} in the file, {list(want[key])} for this config")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise _fail(path, f"does not fit the config: {problems[0]}{more}; train with the config the file was "
                          "trained with (algo, dims, factor, targets)")


def load_init_lora(path: str | os.PathLike[str], trainable: TrainableAdapter) -> int:
    """Copy the file's tensors into the trainable adapter (before step 0); returns how many were taken."""
    path = Path(path)
    try:
        tensors = read_adapter(path).tensors()
    except AdapterFileError as err:
        raise InitLoraError(f"{INPUT}: {err}") from None
    state = trainable.state_dict()
    unexpected = sorted(set(tensors) - set(state))
    # use_scalar's `scalar` is never in a file (LyCORIS folds it into the factor); loading sets it to 1.
    missing = sorted(k for k in set(trainable.named_parameters()) - set(tensors) if not k.endswith(".scalar"))
    if unexpected or missing:
        key = (unexpected or missing)[0]
        raise _fail(path, f"does not fit the config: {key}: "
                          + ("not in this config's adapter" if key in unexpected else "missing from the file"))
    try:
        trainable.load_state_dict({**state, **tensors})
    except TrainerError as err:
        raise _fail(path, f"does not fit the config: {err}") from None
    return len(tensors)
