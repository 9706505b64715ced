"""LyCORIS A/B: one sampler run renders several strengths; and the labelled grid of the result."""

from __future__ import annotations

from comfy_api.latest import io

from ..core import api
from ..core.grid import parse_strengths, strength_grid, sweep_latent
from .types import CATEGORY, LycorisAdapter


def check_strengths_input(strengths) -> bool | str:
    """validate_inputs for a strengths list: each a finite number in -10..10. None: linked, checked at run."""
    if strengths is None:
        return True
    try:
        parse_strengths(strengths)
    except ValueError as err:
        return str(err)
    return True


class LycorisAB(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisAB",
            display_name="LyCORIS A/B",
            category=CATEGORY,
            description=(
                "Compare adapter strengths in one sampler run: every latent sample is repeated once per strength "
                "(same noise), and batch element i uses strength i mod N. Feed the decoded images to "
                "LyCORIS Strength Grid."
            ),
            inputs=[
                io.Model.Input("model", tooltip="Model to adapt (not changed)."),
                LycorisAdapter.Input("adapter", tooltip="From Load LyCORIS or a training job."),
                io.String.Input("strengths", default="0, 0.5, 1",
                                tooltip="Comma-separated strengths to compare, each in -10..10."),
                io.Latent.Input("latent", tooltip="Latent(s) to sample; each is repeated once per strength."),
            ],
            outputs=[
                io.Model.Output("sweep_model", display_name="model", tooltip="The model with per-sample strengths."),
                io.Latent.Output("sweep_latent", display_name="latent", tooltip="The repeated latent batch for the sampler."),
                io.String.Output("labels", display_name="strengths", tooltip="The parsed strengths, for the grid labels."),
            ],
        )

    @classmethod
    def validate_inputs(cls, strengths) -> bool | str:
        return check_strengths_input(strengths)

    @classmethod
    def execute(cls, model, adapter, strengths, latent) -> io.NodeOutput:
        values = parse_strengths(strengths)
        text = ", ".join(f"{v:g}" for v in values)
        return io.NodeOutput(api.apply_sweep(model, adapter, values), sweep_latent(latent, len(values)), text)


class StrengthGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisStrengthGrid",
            display_name="LyCORIS Strength Grid",
            category=CATEGORY,
            description="Lays out an A/B batch as a grid: one column per strength with its label, one row per sample.",
            inputs=[
                io.Image.Input("images", tooltip="Decoded A/B batch (sample-major: all strengths of sample 0 first)."),
                io.String.Input("strengths", default="0, 0.5, 1", tooltip="The strengths of the batch (from LyCORIS A/B)."),
            ],
            outputs=[io.Image.Output(tooltip="The labelled grid.")],
        )

    @classmethod
    def validate_inputs(cls, strengths) -> bool | str:
        return check_strengths_input(strengths)

    @classmethod
    def execute(cls, images, strengths) -> io.NodeOutput:
        return io.NodeOutput(strength_grid(images, parse_strengths(strengths)))


NODES = [LycorisAB, StrengthGrid]
