"""LyCORIS Validation: what a training job samples while it trains (SimpleTuner's validation images)."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..core import host
from ..trainer.validation import Validation, parse_strengths
from .types import TRAIN_CATEGORY, LycorisValidation


class ValidationNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        samplers, schedulers = host.sampler_names()
        return io.Schema(
            node_id="LycorisValidation",
            display_name="LyCORIS Validation",
            category=TRAIN_CATEGORY,
            description="Validation previews for Train LyCORIS: sampled at step 0 (the base model), every N steps "
                        "and at the end, with the live adapter at each strength, through ComfyUI's own sampler "
                        "(a KSampler's result for the same inputs) and the same noise every time. Images land in "
                        "the job folder's validation/ and on the LyCORIS Job node.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="The validation prompt's conditioning."),
                io.Latent.Input("latent", tooltip="Size and batch of the previews (e.g. an empty latent)."),
                io.Combo.Input("sampler_name", options=samplers, default="euler", tooltip="As on KSampler."),
                io.Combo.Input("scheduler", options=schedulers, default="simple", tooltip="As on KSampler."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps per preview."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="As on KSampler (1.0 for guidance-distilled Flux)."),
                io.Float.Input("guidance", default=0.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Flux guidance set on the conditioning (as Flux Guidance does); "
                                       "0: leave the conditioning as it is (SDXL)."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, tooltip="Noise seed, the same for every preview."),
                io.String.Input("strengths", default="1.0",
                                tooltip="Adapter strengths to render, e.g. '1.0' or '0, 1' "
                                        "(SimpleTuner's validation_lycoris_strength)."),
                io.Int.Input("every", default=100, min=1, max=1_000_000,
                             tooltip="Render every N training steps (and at step 0 and at the end)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative conditioning (default: the positive, as cfg 1 ignores it)."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Decodes the previews; without one the Tiny Latent Preview projection is shown."),
            ],
            outputs=[LycorisValidation.Output("validation", display_name="validation",
                                              tooltip="For the validation input of Train LyCORIS.")],
        )

    @classmethod
    def execute(cls, positive, latent, sampler_name, scheduler, steps, cfg, guidance, seed, strengths, every,
                negative=None, vae=None) -> io.NodeOutput:
        validation = Validation(positive, negative if negative is not None else positive, latent, sampler_name,
                                scheduler, steps, cfg, seed, parse_strengths(strengths), every,
                                guidance if guidance > 0 else None, vae)
        text = (f"{len(validation.strengths)} strength(s) every {every} steps, {steps} {sampler_name} steps, "
                f"{'VAE decode' if vae is not None else 'latent preview'}")
        return io.NodeOutput(validation, ui=ui.PreviewText(text))


NODES = [ValidationNode]
