"""HTTP routes for the pack's web widgets: the numbers come from the core, the browser only draws them.

`GET /lycoris/tlora/mask?rank=64&min_rank=1&alpha=1.0&alphas=0.5,2[&step=10]` answers
`{"rank", "min_rank", "alphas", "timesteps", "curves": {"1.0": [r(t), ...], "0.5": [...]}}` with
r(t) from `core.tlora.active_ranks`, the pack's one copy of the schedule; bad parameters answer
HTTP 400 `{"error": "<field>: <message>"}`. ComfyUI also serves every route under `/api`.
With `preset=<name>[&config_json=<overrides or custom JSON>]` (a connected LyCORIS Config node's
widgets) rank, min_rank and alpha come from that config, as the node uses them when it runs, and
the answer says so (`"from_config": true`).

`GET /lycoris/strength/schedule?mode=window&start=0&end=0.4&ramp=0.05&keyframes=...&steps=20[&percents=0,0.3]`
(the LyCORIS Strength Schedule node's widgets) answers `{"keyframes": [[percent, multiplier], ...], "grid":
[percent, ...], "curve": [multiplier, ...], "marks": {"percents": [...], "values": [...]}}`: the multiplier
from `core.strength_shape.Schedule` over 0..1, and at the sampler's steps: `percents` (those of the
node's last run with a model) or, without, `steps` evenly spaced ones, as the node plots without a model.

Routes are registered when this module is imported inside a running ComfyUI (PromptServer exists
before custom nodes load). Imported anywhere else (unit tests) it registers nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from ..core.mask_plot import check_alphas, parse_alphas
from ..core.tlora import T_MAX, active_ranks, check_params

MASK_ROUTE = "/lycoris/tlora/mask"
SCHEDULE_ROUTE = "/lycoris/strength/schedule"
SCHEDULE_POINTS = 201  # samples of the curve over 0..1 (the node's plot uses as many)
DEFAULT_STEP = 10


def _number(query: Mapping[str, str], field: str, kind: type, default=None):
    text = query.get(field)
    if text is None or text.strip() == "":
        if default is None:
            raise ValueError(f"{field}: is required")
        return default
    try:
        return kind(text.strip())
    except ValueError:
        raise ValueError(f"{field}: '{text}' is not {'an integer' if kind is int else 'a number'}") from None


def _alphas(alpha: float, text: str) -> list[float]:
    extras = parse_alphas(text, "alphas")
    try:
        return check_alphas([alpha, *extras])
    except ValueError as err:
        raise ValueError(f"alphas: {str(err).split(': ', 1)[-1]}") from None


def config_params(preset: str, config_json: str) -> tuple[int, int, float]:
    """rank, min_rank, alpha of what a LyCORIS Config node with these widgets outputs; ValueError naming the field."""
    from ..core.config import ConfigError
    from .config_nodes import config_from_inputs
    from .tlora_visualizer import _config_params

    try:
        config = config_from_inputs(preset, config_json)
    except ConfigError as err:
        raise ValueError(f"config: {err}") from None
    return _config_params(config)


def mask_curves(query: Mapping[str, str]) -> dict:
    """The answer of the mask route for its query parameters; ValueError naming the field."""
    from_config = "preset" in query
    if from_config:
        rank, min_rank, alpha = config_params(query["preset"], query.get("config_json", ""))
    else:
        rank = _number(query, "rank", int)
        min_rank = _number(query, "min_rank", int)
        alpha = _number(query, "alpha", float)
    step = _number(query, "step", int, DEFAULT_STEP)
    if not 1 <= step <= T_MAX:
        raise ValueError(f"step: must be between 1 and {T_MAX}, got {step}")
    alphas = _alphas(alpha, query.get("alphas", ""))
    for a in alphas:
        check_params(rank, min_rank, a)
    timesteps = list(range(0, T_MAX, step)) + [T_MAX]
    return {
        "rank": rank,
        "min_rank": min_rank,
        "alphas": alphas,
        "timesteps": timesteps,
        "curves": {repr(a): active_ranks(timesteps, rank, min_rank, a).tolist() for a in alphas},
        "from_config": from_config,
    }


async def tlora_mask(request):
    from aiohttp import web

    try:
        body = mask_curves(request.rel_url.query)
    except ValueError as err:
        return web.json_response({"error": str(err)}, status=400)
    return web.json_response(body)


def schedule_curve(query: Mapping[str, str]) -> dict:
    """The answer of the schedule route for its query parameters; ValueError naming the field."""
    import torch

    from ..core.strength_shape import Schedule
    from .schedule_nodes import keyframes_of

    mode = query.get("mode", "window")
    frames = keyframes_of(mode, _number(query, "start", float, 0.0), _number(query, "end", float, 1.0),
                          _number(query, "ramp", float, 0.0), query.get("keyframes", ""))
    schedule = Schedule.of(frames)
    text = query.get("percents", "").strip()
    if text:
        try:
            percents = [float(item) for item in text.split(",")]
        except ValueError:
            raise ValueError(f"percents: '{text}' is not a comma-separated list of numbers") from None
        if not all(0.0 <= p <= 1.0 for p in percents):
            raise ValueError("percents: each must be in 0..1")
    else:
        steps = _number(query, "steps", int, 20)
        if not 1 <= steps <= 1000:
            raise ValueError(f"steps: must be between 1 and 1000, got {steps}")
        percents = [i / steps for i in range(steps)]
    grid = [i / (SCHEDULE_POINTS - 1) for i in range(SCHEDULE_POINTS)]
    values = schedule.at_percent(torch.tensor(grid + percents, dtype=torch.float64)).tolist()
    return {"keyframes": [list(f) for f in schedule.keyframes], "grid": grid, "curve": values[:SCHEDULE_POINTS],
            "marks": {"percents": percents, "values": values[SCHEDULE_POINTS:]}}


async def strength_schedule(request):
    from aiohttp import web

    try:
        body = schedule_curve(request.rel_url.query)
    except ValueError as err:
        return web.json_response({"error": str(err)}, status=400)
    return web.json_response(body)


def register() -> bool:
    """Adds the routes to the running ComfyUI server; False (and nothing done) outside one."""
    server = sys.modules.get("server")  # ComfyUI's main.py imports it before loading custom nodes
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    instance.routes.get(MASK_ROUTE)(tlora_mask)
    instance.routes.get(SCHEDULE_ROUTE)(strength_schedule)
    return True


REGISTERED = register()
