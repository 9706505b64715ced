"""The T-LoRA timestep mask: which ranks of a T-LoRA adapter are active at a timestep.

This is the pack's one copy of the schedule (the visualizer, the adapter runtime and the trainer
all call it), written to give the same integers as LyCORIS's `compute_timestep_mask`
(`lycoris/modules/tlora.py`, lycoris-lora 4.1.3):

    r = int(((T - t) / T) ** alpha * (R - R_min)) + R_min;  r = min(r, R);  ranks [0, r) active

with two deliberate additions: t is clamped to [0, T] first (LyCORIS does not clamp, so t > T
gives a complex number or t < 0 more ranks than exist), and timesteps derived from float sigmas
are snapped before they are truncated to integers (see `integer_timestep`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

T_MAX = 1000  # LyCORIS/SimpleTuner `max_timestep`: the scheduler's num_train_timesteps
DEFAULT_MIN_RANK = 1  # SimpleTuner's default `tlora_min_rank`
DEFAULT_ALPHA = 1.0  # SimpleTuner's default `tlora_alpha`
_SNAP_DECIMALS = 3  # float32 noise at t ~ 1000 is ~6e-5; real fractions of a timestep are kept to 1e-3


def check_params(rank: int, min_rank: int, alpha: float) -> None:
    """ValueError naming the field when the schedule parameters cannot describe a mask."""
    if int(rank) < 1:
        raise ValueError(f"rank: must be at least 1, got {rank}")
    if not 0 <= int(min_rank) <= int(rank):
        raise ValueError(f"min_rank: must be between 0 and rank ({rank}), got {min_rank}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha: must be a finite number >= 0, got {alpha}")


def active_rank(t: float, rank: int, min_rank: int, alpha: float, T: int = T_MAX) -> int:
    """Number of active ranks r(t) at timestep t (0 = clean, T = pure noise); ranks [0, r) are on.

    Evaluated in Python double precision exactly as LyCORIS does, so the integer truncation
    lands on the same side at every boundary.
    """
    check_params(rank, min_rank, alpha)
    t = min(max(float(t), 0.0), float(T))
    r = int(((T - t) / T) ** alpha * (rank - min_rank)) + min_rank
    return min(r, rank)


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


def integer_timestep(t: float) -> int:
    """An integer timestep from a float one: snapped to 1e-3, then truncated like SimpleTuner's `int(t)`.

    SimpleTuner feeds LyCORIS `int(t)`. Timesteps computed from float32 sigmas carry rounding
    noise (1000 * float32(0.9) = 899.99994, which `int` makes 899); snapping first gives 900.
    """
    return math.floor(round(float(t), _SNAP_DECIMALS))


def timestep_from_sigma_flow(sigma: float | torch.Tensor) -> int | torch.Tensor:
    """Timestep of a flow-matching sigma (Flux, Flux 2): t = 1000 * sigma, as an integer.

    A tensor gives an int64 tensor of the same shape; a number gives an int.
    """
    if isinstance(sigma, torch.Tensor):
        values = [integer_timestep(T_MAX * s) for s in sigma.double().flatten().tolist()]
        return torch.tensor(values, dtype=torch.long).view(sigma.shape)
    return integer_timestep(T_MAX * float(sigma))
