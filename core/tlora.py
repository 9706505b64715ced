"""The T-LoRA timestep mask: which ranks of a T-LoRA adapter are active at a timestep.

This is the pack's one copy of the schedule (the visualizer, the adapter runtime and the trainer
all call it), written to give the same integers as LyCORIS's `compute_timestep_mask`
(`lycoris/modules/tlora.py`, lycoris-lora 4.1.3):

    r = int(((T - t) / T) ** alpha * (R - R_min)) + R_min;  r = min(r, R);  ranks [0, r) active

with one deliberate addition: t is clamped to [0, T] first (LyCORIS does not clamp, so t > T
gives a complex number or t < 0 more ranks than exist; SimpleTuner never passes such t).

What SimpleTuner 4.10.1 feeds that formula, reproduced here:
- R is the config's `linear_dim`, one mask for every module (`helpers/training/trainer.py`
  `"max_rank": linear_dim`); each LyCORIS T-LoRA module cuts that mask to its own rank or pads
  it with ones (`TLoraModule._get_mask`). `module_mask` does both.
- t is `int(t)` of a float32 timestep (`helpers/training/lycoris.py` `int(t)`); flow models make
  it as `sigmas * 1000.0` in float32 (`helpers/models/common.py`). `simpletuner_timestep` and
  `integer_timestep` do exactly that.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

T_MAX = 1000  # LyCORIS/SimpleTuner `max_timestep`: the scheduler's num_train_timesteps
DEFAULT_MIN_RANK = 1  # SimpleTuner's default `tlora_min_rank` (trainer.py: int(config.get("tlora_min_rank", 1)))
DEFAULT_ALPHA = 1.0  # SimpleTuner's default `tlora_alpha` (trainer.py: float(config.get("tlora_alpha", 1.0)))


def check_params(rank: int, min_rank: int, alpha: float) -> None:
    """ValueError naming the field when the schedule parameters cannot describe a mask."""
    if int(rank) < 1:
        raise ValueError(f"rank: must be at least 1, got {rank}")
    if not 0 <= int(min_rank) <= int(rank):
        raise ValueError(f"min_rank: must be between 0 and rank ({rank}), got {min_rank}")
    _check_alpha(alpha)


def _check_alpha(alpha: float) -> None:
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha: must be a finite number >= 0, got {alpha}")


def _lycoris_r(t: float, rank: int, min_rank: int, alpha: float, T: int) -> int:
    """LyCORIS's r for a clamped t, in Python double precision as LyCORIS computes it."""
    t = min(max(float(t), 0.0), float(T))
    r = int(((T - t) / T) ** alpha * (rank - min_rank)) + min_rank
    return min(r, rank)


def active_rank(t: float, rank: int, min_rank: int, alpha: float, T: int = T_MAX) -> int:
    """Number of active ranks r(t) at timestep t (0 = clean, T = pure noise); ranks [0, r) are on.

    Evaluated in Python double precision exactly as LyCORIS does, so the integer truncation
    lands on the same side at every boundary.
    """
    check_params(rank, min_rank, alpha)
    return _lycoris_r(t, rank, min_rank, alpha, T)


def active_ranks(timesteps: torch.Tensor | Iterable[float], rank: int, min_rank: int, alpha: float,
                 T: int = T_MAX) -> torch.Tensor:
    """`active_rank` for each timestep of a 1-D tensor (or sequence), as an int64 tensor.

    Evaluated element by element on purpose: torch's vectorised float64 `pow` differs from
    Python's in the last bit for about 1% of (t, alpha) pairs, which flips the integer truncation
    at exact boundaries. Inputs are a batch or at most a few thousand plotted columns, so the loop
    costs microseconds.
    """
    values = timesteps.flatten().tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
    return torch.tensor([active_rank(t, rank, min_rank, alpha, T) for t in values], dtype=torch.long)


def rank_mask(timesteps: torch.Tensor, rank: int, min_rank: int, alpha: float, T: int = T_MAX,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, rank) mask, 1.0 for the active ranks [0, r(t_b)) of each sample and 0.0 elsewhere.

    Row b equals LyCORIS's `compute_timestep_mask(t_b, T, rank, min_rank, alpha)[0]`; one row per
    sample, so a batch of mixed timesteps gets a mask per sample.
    """
    r = active_ranks(timesteps, rank, min_rank, alpha, T)
    device = timesteps.device if isinstance(timesteps, torch.Tensor) else None
    return (torch.arange(rank).unsqueeze(0) < r.unsqueeze(1)).to(dtype=dtype, device=device)


def module_mask(timesteps: torch.Tensor | Iterable[float], module_rank: int, linear_dim: int | None,
                min_rank: int, alpha: float, T: int = T_MAX, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, module_rank) mask of one T-LoRA module, as SimpleTuner + LyCORIS compute it.

    SimpleTuner sets one mask of width `linear_dim` (`compute_timestep_mask(int(t), T, linear_dim,
    min_rank, alpha)`) for every module; LyCORIS's `TLoraModule._get_mask` cuts it to the module's
    rank or pads it with ones (ranks beyond `linear_dim` always active). `linear_dim` None means
    "the module's own rank" (no cut, no pad). A `min_rank` above `linear_dim` keeps every rank on,
    as LyCORIS's `min(r, max_rank)` does.
    """
    width = int(linear_dim) if linear_dim else int(module_rank)
    if int(module_rank) < 1:
        raise ValueError(f"module_rank: must be at least 1, got {module_rank}")
    if width < 1:
        raise ValueError(f"linear_dim: must be at least 1, got {linear_dim}")
    if int(min_rank) < 0:
        raise ValueError(f"min_rank: must be 0 or more, got {min_rank}")
    _check_alpha(alpha)
    values = timesteps.flatten().tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
    r = torch.tensor([_lycoris_r(t, width, int(min_rank), alpha, T) for t in values], dtype=torch.long)
    mask = torch.arange(width).unsqueeze(0) < r.unsqueeze(1)
    if width >= module_rank:
        mask = mask[:, :module_rank]
    else:
        mask = torch.cat([mask, torch.ones(len(values), module_rank - width, dtype=torch.bool)], dim=1)
    device = timesteps.device if isinstance(timesteps, torch.Tensor) else None
    return mask.to(dtype=dtype, device=device)


def integer_timestep(t: float) -> int:
    """The integer timestep SimpleTuner gives LyCORIS for a float one: `int()` of its float32 value.

    SimpleTuner's timesteps are float32 tensors and it passes `int(t)` (truncation toward zero).
    `t` is rounded to float32 first, so a float64 product `1000.0 * sigma` of a float32 sigma
    (exact in float64) gives what SimpleTuner's float32 `sigmas * 1000.0` gives.
    """
    return int(np.float32(t))


def simpletuner_timestep(sigmas: float | torch.Tensor) -> int | torch.Tensor:
    """SimpleTuner's T-LoRA timestep of flow-matching sigmas (Flux, Flux 2, SD3...): `int(sigmas * 1000.0)`
    with the product taken in float32 (`helpers/models/common.py`: `timesteps = sigmas * 1000.0`;
    `helpers/training/lycoris.py`: `int(t)`). Sigma 0.90099996 gives 900 (900.99994 truncated).

    A tensor gives an int64 tensor of the same shape; a number gives an int.
    """
    if isinstance(sigmas, torch.Tensor):
        return (sigmas.detach().to(torch.float32) * float(T_MAX)).trunc().to(torch.long)
    return int(np.float32(sigmas) * np.float32(T_MAX))


def timestep_from_sigma_flow(sigma: float | torch.Tensor) -> int | torch.Tensor:
    """Timestep of a flow-matching sigma (Flux, Flux 2): SimpleTuner's `int(float32(sigma) * 1000)`."""
    return simpletuner_timestep(sigma)
