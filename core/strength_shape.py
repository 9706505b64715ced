"""Strength beyond one number: per-block multipliers and a multiplier over the sampling schedule.

The effective strength of an adapted module for a sample is
`strength x block multiplier x schedule multiplier`, evaluated per call in bypass (no weight work):

- `blocks`: an ordered mapping from an fnmatch pattern over the ComfyUI module path inside the
  diffusion model (`"double_blocks.*"`, `"single_blocks.1?.*"`, `"output_blocks.*"`) to a
  multiplier. A module takes the multiplier of the first pattern that matches its path; no
  match = 1.0. A pattern that matches no adapted module is an error naming it (a typo must not
  silently do nothing).
- `schedule`: keyframes `[(percent, multiplier), ...]` in ComfyUI's sampling-percent sense
  (`model_sampling.percent_to_sigma`: 0 = start, the highest noise; 1 = end), linearly
  interpolated in percent, constant outside, evaluated from each sample's sigma on every call.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

BlockSpec = Mapping[str, float] | Sequence[tuple[str, float]]
_GRID = 2001  # percent samples of the sigma -> percent table


class StrengthShapeError(ValueError):
    """A block pattern or schedule keyframe that cannot be used; the message names the input."""


def _finite(value: object, what: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise StrengthShapeError(f"{what}: '{value}' is not a number") from None
    if not math.isfinite(number):
        raise StrengthShapeError(f"{what}: must be a finite number, got {value}")
    return number


def block_items(blocks: BlockSpec) -> list[tuple[str, float]]:
    """`blocks` as ordered (pattern, multiplier) pairs, checked."""
    items = list(blocks.items()) if isinstance(blocks, Mapping) else list(blocks)
    out = []
    for pattern, value in items:
        if not isinstance(pattern, str) or not pattern.strip():
            raise StrengthShapeError(f"blocks: a pattern must be non-empty text, got {pattern!r}")
        out.append((pattern.strip(), _finite(value, f"blocks: '{pattern}'")))
    return out


def resolve_blocks(blocks: BlockSpec | None, comfy_paths: Iterable[str]) -> dict[str, float]:
    """Multiplier of every adapted ComfyUI module path (1.0 where no pattern matches)."""
    paths = list(dict.fromkeys(comfy_paths))
    if not blocks:
        return {}
    items = block_items(blocks)
    for pattern, _ in items:
        if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
            shown = ", ".join(paths[:4]) + (" ..." if len(paths) > 4 else "")
            raise StrengthShapeError(f"blocks: pattern '{pattern}' matches no adapted module (adapted: {shown})")
    return {p: next((v for pattern, v in items if fnmatch.fnmatchcase(p, pattern)), 1.0) for p in paths}


def parse_block_lines(text: str, field: str = "block_strengths") -> list[tuple[str, float]]:
    """`pattern = value` lines ('#' starts a comment, blank lines skipped) -> ordered pairs."""
    pairs = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        pattern, sep, value = line.rpartition("=")
        if not sep or not pattern.strip():
            raise StrengthShapeError(f"{field}: line {number} '{raw.strip()}' is not 'pattern = value'")
        pairs.append((pattern.strip(), _finite(value.strip(), f"{field}: line {number}")))
    return pairs


def describe_blocks(comfy_paths: Iterable[str]) -> str:
    """The adapter's blocks, for reading patterns off: `double_blocks.0-7 (24 modules)` per top-level list."""
    groups: dict[str, list[str]] = {}
    for path in comfy_paths:
        parts = path.split(".")
        key = parts[0]
        if len(parts) > 1 and parts[1].isdigit():
            groups.setdefault(key, []).append(parts[1])
        else:
            groups.setdefault(key, [])
    lines = []
    for key, indices in groups.items():
        numbers = sorted({int(i) for i in indices})
        span = f".{numbers[0]}-{numbers[-1]}" if len(numbers) > 1 else f".{numbers[0]}" if numbers else ""
        lines.append(f"{key}{span}")
    return ", ".join(lines)


@dataclass(frozen=True)
class Schedule:
    """Keyframes (percent, multiplier), sorted by percent; linear in between, constant outside."""

    keyframes: tuple[tuple[float, float], ...]

    @classmethod
    def of(cls, keyframes: Sequence[tuple[float, float]]) -> Schedule:
        frames = []
        for i, frame in enumerate(keyframes):
            try:
                percent, value = frame
            except (TypeError, ValueError):
                raise StrengthShapeError(f"schedule: keyframe {i + 1} must be (percent, multiplier)") from None
            percent = _finite(percent, f"schedule: keyframe {i + 1} percent")
            if not 0.0 <= percent <= 1.0:
                raise StrengthShapeError(f"schedule: keyframe {i + 1} percent must be in 0..1, got {percent:g}")
            frames.append((percent, _finite(value, f"schedule: keyframe {i + 1} multiplier")))
        if not frames:
            raise StrengthShapeError("schedule: give at least one keyframe (percent, multiplier)")
        return cls(tuple(sorted(frames, key=lambda f: f[0])))

    def at_percent(self, percent: torch.Tensor) -> torch.Tensor:
        """Multiplier at each percent (float64)."""
        p = percent.double()
        xs = torch.tensor([f[0] for f in self.keyframes], dtype=torch.float64)
        ys = torch.tensor([f[1] for f in self.keyframes], dtype=torch.float64)
        out = torch.full_like(p, float(ys[0]))
        for i in range(len(self.keyframes) - 1):
            x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
            inside = (p >= x0) & (p <= x1)
            if x1 > x0:
                t = ((p - x0) / (x1 - x0)).clamp(0, 1)
                value = torch.where(t == 0, y0, torch.where(t == 1, y1, y0 + t * (y1 - y0)))
            else:
                value = torch.full_like(p, float(y1))
            out = torch.where(inside, value, out)
        return torch.where(p > xs[-1], ys[-1], out)

    def bind(self, percent_to_sigma: Callable[[float], float]) -> BoundSchedule:
        """This schedule for one model's sampling (its sigma <-> percent relation)."""
        percents = [i / (_GRID - 1) for i in range(_GRID)]
        sigmas = [float(percent_to_sigma(min(max(p, 1e-6), 1 - 1e-6))) for p in percents]
        return BoundSchedule(self, torch.tensor(percents, dtype=torch.float64), torch.tensor(sigmas, dtype=torch.float64))


@dataclass(frozen=True, eq=False)
class BoundSchedule:
    """A schedule with its model's percent -> sigma table (sigmas fall as percent rises)."""

    schedule: Schedule
    percents: torch.Tensor
    sigmas: torch.Tensor

    def percent_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """Sampling percent of each sigma (interpolated in the table; clamped to 0..1)."""
        s = sigma.detach().double().cpu().flatten()
        desc = self.sigmas
        asc_sigmas, asc_percents = desc.flip(0), self.percents.flip(0)
        idx = torch.searchsorted(asc_sigmas, s).clamp(1, len(asc_sigmas) - 1)
        lo, hi = asc_sigmas[idx - 1], asc_sigmas[idx]
        w = ((s - lo) / (hi - lo).clamp_min(1e-300)).clamp(0, 1)
        percent = asc_percents[idx - 1] + w * (asc_percents[idx] - asc_percents[idx - 1])
        percent = torch.where(s >= asc_sigmas[-1], torch.zeros_like(s), percent)
        return torch.where(s <= asc_sigmas[0], torch.ones_like(s), percent)

    def multipliers(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.schedule.at_percent(self.percent_of(sigma))


def scaled(strength: float | torch.Tensor, factor: float | torch.Tensor, batch: int) -> float | torch.Tensor:
    """strength x factor per sample; a plain float when every sample has the same value."""
    if isinstance(strength, float) and isinstance(factor, float):
        return strength * factor
    s = strength if isinstance(strength, torch.Tensor) else torch.full((batch,), float(strength))
    f = factor if isinstance(factor, torch.Tensor) else torch.full((batch,), float(factor))
    if f.numel() == 1:
        f = f.expand(batch)
    out = s.double() * f.double().to(s.device)
    return float(out[0]) if bool((out == out[0]).all()) else out.float()


# Block presets per family (ComfyUI module paths): what people reach for first.
BLOCK_PRESETS: dict[str, str] = {
    "all blocks": "",
    "Flux: double blocks only": "single_blocks.* = 0",
    "Flux: single blocks only": "double_blocks.* = 0",
    "Flux: late blocks only": "double_blocks.* = 0\nsingle_blocks.[0-9].* = 0\nsingle_blocks.1[0-9].* = 0",
    "SDXL: input blocks only": "middle_block.* = 0\noutput_blocks.* = 0",
    "SDXL: middle block only": "input_blocks.* = 0\noutput_blocks.* = 0",
    "SDXL: output blocks only": "input_blocks.* = 0\nmiddle_block.* = 0",
}


def parse_keyframes(text: str, field: str = "keyframes") -> list[tuple[float, float]]:
    """'percent = multiplier' lines (or comma-separated) -> keyframes."""
    pairs = parse_block_lines(text.replace(",", "\n"), field)
    frames = []
    for percent, value in pairs:
        frames.append((_finite(percent, f"{field}: percent '{percent}'"), value))
    return list(Schedule.of(frames).keyframes)


def ramp_keyframes(start: float, end: float, ramp: float, inside: float = 1.0,
                   outside: float = 0.0) -> list[tuple[float, float]]:
    """`inside` from `start` to `end` percent, `outside` beyond, with linear ramps `ramp` wide outside the window."""
    if not 0.0 <= start <= end <= 1.0:
        raise StrengthShapeError(f"start/end: need 0 <= start <= end <= 1, got {start:g} / {end:g}")
    ramp = max(0.0, float(ramp))
    frames = [(start, inside), (end, inside)]
    if start > 0:
        frames.insert(0, (max(0.0, start - ramp), outside))
    if end < 1:
        frames.append((min(1.0, end + ramp), outside))
    return list(Schedule.of(frames).keyframes)
