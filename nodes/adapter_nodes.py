"""Load, Apply, Merge and Save LyCORIS adapters (SimpleTuner / LyCORIS files)."""

from __future__ import annotations

import math

import folder_paths
from comfy_api.latest import io, ui

from ..core import api
from ..core.adapter_file import SUFFIX
from ..core.paths import PathNameError, safe_relative_name
from ..core.strength_shape import BLOCK_PRESETS, StrengthShapeError, describe_blocks, parse_block_lines
from .types import CATEGORY, LycorisAdapter, LycorisSchedule

# As core's LoRA loader: a number widget with step 0.01 (a drag moves 0.01 per pixel, the arrows 0.01 per
# click), so a mouse sets 0..1.5 to 0.05 and finer; a slider over -10..10 made 0..1.5 about 20 pixels.
STRENGTH = dict(default=1.0, min=-10.0, max=10.0, step=0.01, display_mode=io.NumberDisplay.number)


def check_strength_input(strength) -> bool | str:
    """validate_inputs for a strength widget: finite and in range (ComfyUI's own check lets NaN by, and
    is skipped for inputs a node validates itself). None: linked, checked when the node runs."""
    if strength is None:
        return True
    try:
        value = api.check_strength(strength)
    except ValueError as err:
        return str(err)
    if not STRENGTH["min"] <= value <= STRENGTH["max"]:
        return f"strength: must be between {STRENGTH['min']:g} and {STRENGTH['max']:g}, got {value:g}"
    return True


def check_name_input(value, input_name: str, suffix: str | None = None) -> bool | str:
    """validate_inputs for a name widget (core.paths rules), so a bad name refuses the prompt before any node
    runs. None: linked, checked when the node runs."""
    if value is None:
        return True
    try:
        safe_relative_name(value, input_name, suffix)
    except PathNameError as err:
        return str(err)
    return True


FROM_FILE = -1  # Load LyCORIS's T-LoRA inputs: take the value from the file


def _lora_files() -> list[str]:
    return folder_paths.get_filename_list("loras")


class LoadLycoris(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisLoad",
            display_name="Load LyCORIS",
            category=CATEGORY,
            description=(
                "Loads a LyCORIS adapter file (as SimpleTuner / LyCORIS write them: lycoris_<diffusers path> keys) "
                "from the loras folder and maps it onto this model's ComfyUI layers, fused q/k/v slices included. "
                "Only .safetensors: pickle files can run code and are refused. Every LyCORIS algorithm is supported."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The Flux 2, Flux 1 or SDXL model the adapter was trained for."),
                io.Combo.Input("lora_name", options=_lora_files(),
                               tooltip="Adapter file in models/loras (.safetensors)."),
                io.Boolean.Input("strict", default=False,
                                 tooltip="Fail when any module of the file has no place in this model, "
                                         "instead of listing it."),
                io.Int.Input("tlora_min_rank", default=FROM_FILE, min=FROM_FILE, max=1 << 16, optional=True,
                             tooltip="T-LoRA only: ranks active even at the noisiest step. -1 = from the file. "
                                     "SimpleTuner's final file leaves it out (its lycoris_config.json beside the "
                                     "file has it): the node then says the schedule is unknown."),
                io.Float.Input("tlora_alpha", default=FROM_FILE, min=FROM_FILE, max=100.0, step=0.1, optional=True,
                               tooltip="T-LoRA only: exponent of the rank schedule. -1 = from the file."),
            ],
            outputs=[LycorisAdapter.Output("adapter", display_name="adapter",
                                           tooltip="The adapter, for Apply / A/B / Merge / Save.")],
        )

    @classmethod
    def validate_inputs(cls, tlora_min_rank=None, tlora_alpha=None) -> bool | str:
        for name, value in (("tlora_min_rank", tlora_min_rank), ("tlora_alpha", tlora_alpha)):
            if value is not None and not (value == FROM_FILE or (math.isfinite(value) and value >= 0)):
                return f"{name}: -1 (from the file) or a number >= 0, got {value}"
        return True

    @classmethod
    def execute(cls, model, lora_name, strict, tlora_min_rank=FROM_FILE, tlora_alpha=FROM_FILE) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        adapter = api.load_adapter(path, model, strict=strict,
                                   tlora_min_rank=None if tlora_min_rank == FROM_FILE else int(tlora_min_rank),
                                   tlora_alpha=None if tlora_alpha == FROM_FILE else float(tlora_alpha))
        text = f"{api.describe(adapter)}\nblocks: {describe_blocks(adapter.by_comfy_module())}"
        return io.NodeOutput(adapter, ui=ui.PreviewText(text))


PRESET_NAMES = list(BLOCK_PRESETS)


def _block_inputs() -> list:
    """Per-block strength inputs shared by Apply and Merge."""
    return [
        io.Combo.Input("block_preset", options=PRESET_NAMES, default=PRESET_NAMES[0], optional=True,
                       tooltip="Per-block multipliers to start from (Flux: double / single blocks; SDXL: input / "
                               "middle / output blocks); block_strengths lines come first."),
        io.String.Input("block_strengths", multiline=True, default="", optional=True,
                        tooltip="'pattern = multiplier' lines over ComfyUI module paths, e.g. 'double_blocks.* = 0.5'; "
                                "a module takes the first matching line (then the preset's; none: 1). A pattern "
                                "matching no adapted module is an error. The Load node lists the adapter's blocks."),
    ]


def block_pairs(preset: str, lines: str) -> list[tuple[str, float]]:
    """The typed lines first, then the preset's (first match wins); a node error naming the field."""
    if preset not in BLOCK_PRESETS:
        raise ValueError(f"block_preset: '{preset}' is not one of {', '.join(BLOCK_PRESETS)}")
    try:
        return parse_block_lines(lines or "") + parse_block_lines(BLOCK_PRESETS[preset], "block_preset")
    except StrengthShapeError as err:
        raise ValueError(str(err)) from None


class ApplyLycoris(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisApply",
            display_name="Apply LyCORIS",
            category=CATEGORY,
            description=(
                "Adds an adapter to a model in bypass: the base weights are never written (fp8/fp16 bases work, "
                "nothing is backed up), and changing the strength costs no weight work. DoRA, IA3 and OFT, whose "
                "effect is not linear in strength, run through their exact weight delta instead. T-LoRA adapters "
                "follow each sample's timestep. Several Apply nodes stack."
            ),
            inputs=[
                io.Model.Input("model", tooltip="Model to adapt; it is not changed (a new clone is returned)."),
                LycorisAdapter.Input("adapter", tooltip="From Load LyCORIS or a training job."),
                io.Float.Input("strength", **STRENGTH, tooltip="0 is the base model; 1 the adapter as trained."),
                *_block_inputs(),
                LycorisSchedule.Input("schedule", optional=True,
                                      tooltip="From LyCORIS Strength Schedule: a multiplier over the sampling steps "
                                              "(each sample's own sigma), e.g. the adapter only in the early steps."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the adapter.")],
        )

    @classmethod
    def validate_inputs(cls, strength) -> bool | str:
        return check_strength_input(strength)

    @classmethod
    def execute(cls, model, adapter, strength, block_preset=PRESET_NAMES[0], block_strengths="",
                schedule=None) -> io.NodeOutput:
        blocks = block_pairs(block_preset, block_strengths)
        try:
            return io.NodeOutput(api.apply(model, adapter, strength, blocks=blocks or None, schedule=schedule))
        except StrengthShapeError as err:
            raise ValueError(str(err)) from None


class MergeLycoris(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisMerge",
            display_name="Merge LyCORIS",
            category=CATEGORY,
            description=(
                "Bakes strength x the adapter's exact weight delta (computed by this pack, not LyCORIS's merge_to, "
                "which scales LoHa and decomposed LoKr twice) into the model through ComfyUI's patch mechanism: "
                "unpatching restores the base bit for bit. T-LoRA merges at one timestep or with all ranks."
            ),
            inputs=[
                io.Model.Input("model", tooltip="Model to merge into (a patched clone is returned)."),
                LycorisAdapter.Input("adapter", tooltip="From Load LyCORIS or a training job."),
                io.Float.Input("strength", **STRENGTH, tooltip="Strength baked into the weights."),
                io.Int.Input("tlora_timestep", default=-1, min=-1, max=1000,
                             tooltip="T-LoRA only: timestep (0..1000) whose rank mask is merged; -1 = all ranks."),
                *_block_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The merged model.")],
        )

    @classmethod
    def validate_inputs(cls, strength) -> bool | str:
        return check_strength_input(strength)

    @classmethod
    def execute(cls, model, adapter, strength, tlora_timestep, block_preset=PRESET_NAMES[0],
                block_strengths="") -> io.NodeOutput:
        try:
            merged, warnings = api.merge(model, adapter, strength, None if tlora_timestep < 0 else tlora_timestep,
                                         blocks=block_pairs(block_preset, block_strengths) or None)
        except StrengthShapeError as err:
            raise ValueError(str(err)) from None
        return io.NodeOutput(merged, ui=ui.PreviewText("\n".join(warnings) or "merged"))


class SaveLycoris(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisSave",
            display_name="Save LyCORIS",
            category=CATEGORY,
            description=(
                "Writes an adapter as a LyCORIS/SimpleTuner .safetensors file (with lycoris_config metadata) into "
                "models/loras or the output folder. Written to a temporary file then renamed, so an existing file is "
                "never left half-written; existing files are kept unless overwrite is on."
            ),
            inputs=[
                LycorisAdapter.Input("adapter", tooltip="The adapter to write."),
                io.String.Input("filename", default="lycoris/adapter",
                                tooltip="Name inside the folder, like 'folder/name' (no '..', no absolute path, no "
                                        "hidden or Windows-reserved names); .safetensors is added."),
                io.Combo.Input("folder", options=["loras", "output"], default="loras",
                               tooltip="models/loras (ready for Load LyCORIS) or ComfyUI's output folder."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a file of the same name; off: a numbered name is used instead."),
            ],
            outputs=[io.String.Output("path", display_name="path", tooltip="Where the file was written.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename) -> bool | str:
        return check_name_input(filename, "filename", SUFFIX)

    @classmethod
    def execute(cls, adapter, filename, folder, overwrite) -> io.NodeOutput:
        root = folder_paths.get_folder_paths("loras")[0] if folder == "loras" else folder_paths.get_output_directory()
        path = api.save_adapter(adapter, root, filename, overwrite=overwrite, input_name="filename")
        return io.NodeOutput(str(path), ui=ui.PreviewText(f"saved {path}"))


NODES = [LoadLycoris, ApplyLycoris, MergeLycoris, SaveLycoris]
