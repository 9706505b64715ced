"""LyCORIS Config (preset or pasted JSON) and LyCORIS Plan (what a config adapts on a model)."""

from __future__ import annotations

import json
from pathlib import Path

from comfy_api.latest import io, ui

from ..core import host
from ..core.config import ConfigError, load_json, parse_config
from ..core.config import LycorisConfig as ParsedConfig
from ..core.memory_estimate import estimate_training_memory
from ..core.plan_report import summarize
from ..core.targets import plan_for
from ..trainer.preflight import PreflightError, review
from .types import CATEGORY, LycorisConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CUSTOM = "custom"


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json") if p.name != "schema.json")


def config_from_inputs(preset: str, config_json: str) -> ParsedConfig:
    """What a LyCORIS Config node with these widget values outputs (its node, and the mask widget's
    route for a connected Config node); ConfigError naming the field."""
    if preset == CUSTOM:
        if not config_json.strip():
            raise ConfigError("config_json: empty; paste a config or pick a preset")
        return parse_config(config_json)
    if preset not in preset_names():
        raise ConfigError(f"preset: '{preset}' is not in configs/ ({', '.join(preset_names())})")
    overrides = load_json(config_json) if config_json.strip() else None
    return parse_config((CONFIG_DIR / f"{preset}.json").read_text(), overrides)


class LoadConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisConfig",
            display_name="LyCORIS Config",
            category=CATEGORY,
            description=(
                "A LyCORIS config in SimpleTuner's format (the lycoris_config.json SimpleTuner reads): "
                "a shipped preset, optionally with overrides, or your own JSON. Errors name the field."
            ),
            inputs=[
                io.Combo.Input("preset", options=[*preset_names(), CUSTOM], default="flux2_lokr",
                               tooltip="A preset from the pack's configs/ folder, or 'custom' to paste a whole config below."),
                io.String.Input("config_json", multiline=True, default="",
                                tooltip="With 'custom': the whole config JSON. With a preset: a JSON object of keys to "
                                        "override, e.g. {\"linear_dim\": 32, \"factor\": 8}. Empty: none."),
            ],
            outputs=[
                LycorisConfig.Output("config", display_name="config", tooltip="The validated config, for Plan / Train nodes."),
                io.String.Output("json", display_name="json", tooltip="The effective config as SimpleTuner JSON."),
            ],
        )

    @classmethod
    def execute(cls, preset, config_json) -> io.NodeOutput:
        try:
            config = config_from_inputs(preset, config_json)
        except ConfigError as err:
            raise ValueError(f"LyCORIS config error: {err}") from None
        lines = [config.description] if config.description else []
        lines += [f"warning: {w}" for w in config.warnings]
        text = "\n".join(lines) or f"{config.algo}, dim {config.linear_dim}, alpha {config.linear_alpha:g}"
        return io.NodeOutput(config, json.dumps(dict(config.source), indent=2), ui=ui.PreviewText(text))


class Plan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisPlan",
            display_name="LyCORIS Plan",
            category=CATEGORY,
            description=(
                "Shows what a config adapts on this model, resolved exactly as SimpleTuner/LyCORIS would: "
                "modules per class, algorithm settings, parameter count and file size. Zero matches is an error "
                "that lists the classes the model has; what Train LyCORIS would refuse (ranks beyond a layer's "
                "width, absurd sizes) and what probably does not do what you meant (a target class that matches "
                "nothing, FeedForward on SDXL) is listed first. Ends with the estimated peak training memory at "
                "the given size, with and without gradient checkpointing."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A Flux 2, Flux 1 or SDXL model."),
                LycorisConfig.Input("config", tooltip="From LyCORIS Config."),
                io.Int.Input("width", default=1024, min=64, max=8192, step=64, optional=True,
                             tooltip="Training image width in pixels, for the memory estimate."),
                io.Int.Input("height", default=1024, min=64, max=8192, step=64, optional=True,
                             tooltip="Training image height in pixels, for the memory estimate."),
                io.Int.Input("batch_size", default=1, min=1, max=256, optional=True,
                             tooltip="Items per micro-batch, for the memory estimate."),
            ],
            outputs=[io.String.Output("summary", display_name="summary", tooltip="The plan as text.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, config, width=1024, height=1024, batch_size=1) -> io.NodeOutput:
        unet_config = host.model_unet_config(model)
        try:
            plan = plan_for(config, unet_config)
            found = review(config, unet_config, plan=plan)
        except (ConfigError, PreflightError) as err:
            raise ValueError(f"LyCORIS config error: {err}") from None
        text = summarize(plan, errors=found.errors, warnings=found.warnings)
        settings = host.memory_settings(model)
        estimates = [estimate_training_memory(unet_config, plan, width=width, height=height, batch=batch_size,
                                              checkpointing=ckpt, **settings) for ckpt in (True, False)]
        text += "\n\n" + "\n".join(e.summary() for e in estimates)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES = [LoadConfig, Plan]
