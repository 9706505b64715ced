"""LyCORIS Strength Schedule: an adapter's strength over the sampling steps, drawn over a sampler's schedule."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui
from PIL import Image, ImageDraw

from ..core import host
from ..core.strength_shape import Schedule, StrengthShapeError, parse_keyframes, ramp_keyframes
from .types import CATEGORY, LycorisSchedule

MODES = ("window", "keyframes")


def keyframes_of(mode: str, start: float, end: float, ramp: float, keyframes: str) -> list[tuple[float, float]]:
    """The node's keyframes from its widgets (also what the live plot asks GET /lycoris/strength/schedule for);
    ValueError naming the field."""
    if mode not in MODES:
        raise ValueError(f"mode: '{mode}' is not one of {', '.join(MODES)}")
    try:
        return ramp_keyframes(start, end, ramp) if mode == "window" else parse_keyframes(keyframes)
    except StrengthShapeError as err:
        raise ValueError(str(err)) from None


def plot(schedule: Schedule, step_percents: list[float], width: int = 512, height: int = 256) -> torch.Tensor:
    """IMAGE of the multiplier over the sampling percent (0 = start, noisiest), sampler steps as dots."""
    image = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 36, width - 12, 16, height - 28
    values = [v for _, v in schedule.keyframes]
    lo, hi = min(0.0, *values), max(1.0, *values)

    def xy(p: float, v: float) -> tuple[float, float]:
        return left + p * (right - left), bottom - (v - lo) / (hi - lo or 1) * (bottom - top)

    draw.rectangle([left, top, right, bottom], outline=(90, 90, 100))
    for v in (lo, 0.0, 1.0, hi):
        draw.text((4, xy(0, v)[1] - 6), f"{v:g}", fill=(170, 170, 180))
    grid = torch.linspace(0, 1, 201)
    curve = schedule.at_percent(grid).tolist()
    draw.line([xy(float(p), v) for p, v in zip(grid.tolist(), curve)], fill=(90, 200, 255), width=2)
    for p, v in zip(step_percents, schedule.at_percent(torch.tensor(step_percents, dtype=torch.float64)).tolist()):
        x, y = xy(p, v)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(255, 190, 60))
    draw.text((left, bottom + 6), "start (noise)", fill=(170, 170, 180))
    draw.text((right - 70, bottom + 6), "end (clean)", fill=(170, 170, 180))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return pixels.float().div(255)[None]


class StrengthSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        samplers, schedulers = host.sampler_names()
        return io.Schema(
            node_id="LycorisStrengthSchedule",
            display_name="LyCORIS Strength Schedule",
            category=CATEGORY,
            description="An adapter's strength multiplier over the sampling steps (0 = start, the noisiest; 1 = end), "
                        "for Apply LyCORIS: a window with ramps (e.g. only the early, composition-setting steps) or "
                        "keyframes, linear in between. Drawn over the sampler's real steps when a model is connected.",
            inputs=[
                io.Combo.Input("mode", options=list(MODES), default="window",
                               tooltip="window: start/end/ramp below; keyframes: the keyframes text."),
                io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="window: first sampling percent at full multiplier."),
                io.Float.Input("end", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="window: last sampling percent at full multiplier."),
                io.Float.Input("ramp", default=0.05, min=0.0, max=1.0, step=0.01,
                               tooltip="window: width of the linear ramps outside the window (0: a hard cut)."),
                io.String.Input("keyframes", multiline=True, default="0 = 1\n0.4 = 1\n0.5 = 0",
                                tooltip="keyframes: 'percent = multiplier' lines; constant before the first and "
                                        "after the last."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampler steps to mark on the plot."),
                io.Combo.Input("scheduler", options=schedulers, default="simple", tooltip="Scheduler of those steps."),
                io.Model.Input("model", optional=True,
                               tooltip="The model you sample (its sigma schedule places the steps on the plot)."),
            ],
            outputs=[LycorisSchedule.Output("schedule", display_name="schedule",
                                            tooltip="For Apply LyCORIS's schedule input."),
                     io.Image.Output("plot", display_name="plot", tooltip="The multiplier over the sampling steps.")],
        )

    @classmethod
    def execute(cls, mode, start, end, ramp, keyframes, steps, scheduler, model=None) -> io.NodeOutput:
        frames = keyframes_of(mode, start, end, ramp, keyframes)
        schedule = Schedule.of(frames)
        percents = [i / steps for i in range(steps)]
        if model is not None:
            sigmas = host.sampler_sigmas(model, scheduler, steps)[:-1]
            percents = schedule.bind(host.percent_to_sigma(model)).percent_of(sigmas).tolist()
        text = ", ".join(f"{p:g} -> {v:g}" for p, v in schedule.keyframes)
        # lycoris_schedule: the steps that ran, so the node's live plot (web/lib/schedule_widget.js) marks them
        ran = {"percents": percents, "steps": steps, "scheduler": scheduler, "model": model is not None}
        return io.NodeOutput(frames, plot(schedule, percents), ui=_SchedulePreview(f"keyframes: {text}", ran))


class _SchedulePreview(ui.PreviewText):
    """The keyframes as text, plus `lycoris_schedule`: the sampler steps of this run, for the live plot."""

    def __init__(self, text: str, ran: dict):
        super().__init__(text)
        self.ran = ran

    def as_dict(self) -> dict:
        return {**super().as_dict(), "lycoris_schedule": [self.ran]}


NODES = [StrengthSchedule]
