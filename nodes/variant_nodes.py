"""LyCORIS Variant: one named look of an adapter (strength, block strengths, schedule) for LyCORIS A/B."""

from __future__ import annotations

from comfy_api.latest import io

from ..core import api
from ..core.grid import LABEL_SEPARATORS
from .adapter_nodes import PRESET_NAMES, STRENGTH, _block_inputs, block_pairs, check_strength_input
from .types import CATEGORY, LycorisSchedule, LycorisVariants


def check_name(name) -> bool | str:
    """A variant name labels a grid column and travels in A/B's comma-separated labels text."""
    if name is None:
        return True
    if not str(name).strip():
        return "name: give the variant a name (it labels its grid column)"
    bad = [c for c in (*LABEL_SEPARATORS, "\n") if c in str(name)]
    if bad:
        return f"name: '{name}' contains {bad[0]!r}; names are listed comma-separated, so use none of , ; or a newline"
    return True


class LycorisVariant(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisVariant",
            display_name="LyCORIS Variant",
            category=CATEGORY,
            description=(
                "One named look of an adapter for LyCORIS A/B: a strength, per-block strengths and an optional "
                "strength schedule, as on Apply LyCORIS. Chain Variant nodes (variants -> variants) to list several; "
                "A/B renders them all in one sampler run and the Strength Grid labels each column with its name."
            ),
            inputs=[
                io.String.Input("name", default="full",
                                tooltip="The variant's label in the grid; unique in the chain, no commas."),
                io.Float.Input("strength", **STRENGTH, tooltip="0 is the base model; 1 the adapter as trained."),
                *_block_inputs(),
                LycorisSchedule.Input("schedule", optional=True,
                                      tooltip="From LyCORIS Strength Schedule: this variant's multiplier over the "
                                              "sampling steps (e.g. only the early steps)."),
                LycorisVariants.Input("variants", optional=True,
                                      tooltip="Variants listed before this one (from another LyCORIS Variant); "
                                              "this one is added after them."),
            ],
            outputs=[LycorisVariants.Output("variants_out", display_name="variants",
                                            tooltip="The list so far, for LyCORIS A/B's variants input or the next "
                                                    "Variant.")],
        )

    @classmethod
    def validate_inputs(cls, name, strength) -> bool | str:
        named = check_name(name)
        return named if named is not True else check_strength_input(strength)

    @classmethod
    def execute(cls, name, strength, block_preset=PRESET_NAMES[0], block_strengths="", schedule=None,
                variants=None) -> io.NodeOutput:
        name = name.strip()
        earlier = tuple(variants or ())
        if any(v.name == name for v in earlier):
            raise ValueError(f"name: '{name}' is already a variant of this chain; give each its own name")
        blocks = block_pairs(block_preset, block_strengths)
        look = api.Variant(name, api.check_strength(strength), blocks=blocks or None,
                           schedule=None if schedule is None else list(schedule))
        return io.NodeOutput((*earlier, look))


NODES = [LycorisVariant]
