"""LyCORIS A/B: one sampler run renders several strengths; and the labelled grid of the result."""

from __future__ import annotations

from comfy_api.latest import io

from ..core import api
from ..core.grid import parse_labels, parse_strengths, strength_grid, sweep_latent
from ..core.strength_shape import StrengthShapeError
from .types import CATEGORY, LycorisAdapter, LycorisVariants


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
                "Compare adapter strengths, or named variants (LyCORIS Variant: strength, block strengths, "
                "schedule), in one sampler run: every latent sample is repeated once per strength or variant "
                "(same noise), and batch element i uses the (i mod N)-th. Feed the decoded images to LyCORIS "
                "Strength Grid with the labels output."
            ),
            inputs=[
                io.Model.Input("model", tooltip="Model to adapt (not changed)."),
                LycorisAdapter.Input("adapter", tooltip="From Load LyCORIS or a training job."),
                io.String.Input("strengths", default="0, 0.5, 1",
                                tooltip="Comma-separated strengths to compare, each in -10..10 (not used when "
                                        "variants is connected)."),
                io.Latent.Input("latent", tooltip="Latent(s) to sample; each is repeated once per strength or variant."),
                LycorisVariants.Input("variants", optional=True,
                                      tooltip="Named variants from a chain of LyCORIS Variant nodes: compared instead "
                                              "of the strengths, in their chain order."),
            ],
            outputs=[
                io.Model.Output("sweep_model", display_name="model", tooltip="The model with per-sample strengths."),
                io.Latent.Output("sweep_latent", display_name="latent", tooltip="The repeated latent batch for the sampler."),
                io.String.Output("labels", display_name="strengths",
                                 tooltip="The strengths (or the variant names), for the Strength Grid's labels."),
            ],
        )

    @classmethod
    def validate_inputs(cls, strengths) -> bool | str:
        return check_strengths_input(strengths)

    @classmethod
    def execute(cls, model, adapter, strengths, latent, variants=None) -> io.NodeOutput:
        if variants:
            try:
                swept = api.apply_variants(model, adapter, list(variants))
            except StrengthShapeError as err:
                raise ValueError(str(err)) from None
            labels = ", ".join(v.name for v in variants)
            return io.NodeOutput(swept, sweep_latent(latent, len(variants)), labels)
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
            description="Lays out an A/B batch as a grid: one column per strength or variant, headed with its "
                        "strength or name, one row per sample.",
            inputs=[
                io.Image.Input("images", tooltip="Decoded A/B batch (sample-major: all strengths of sample 0 first)."),
                io.String.Input("strengths", default="0, 0.5, 1",
                                tooltip="The strengths or variant names of the batch, comma-separated (LyCORIS A/B's "
                                        "strengths output)."),
            ],
            outputs=[io.Image.Output(tooltip="The labelled grid.")],
        )

    @classmethod
    def validate_inputs(cls, strengths) -> bool | str:
        if strengths is None:
            return True
        try:
            parse_labels(strengths)
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    def execute(cls, images, strengths) -> io.NodeOutput:
        return io.NodeOutput(strength_grid(images, parse_labels(strengths)))


NODES = [LycorisAB, StrengthGrid]
