"""Tiny Latent Preview: a LATENT as an IMAGE without a VAE (tiny models have none).

The projection is fixed and documented in `core/latent_preview.py`, so pictures are comparable
across runs and machines (the trainer's validation previews use the same one).
"""

from __future__ import annotations

from comfy_api.latest import io

from ..core.latent_preview import NORMALIZE, UPSCALE, latent_to_rgb, preview_image, rgb_projection
from .types import DEV_CATEGORY

__all__ = ["TinyLatentPreview", "latent_to_rgb", "preview_image", "rgb_projection"]


class TinyLatentPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisTinyLatentPreview",
            display_name="Tiny Latent Preview (LyCORIS dev)",
            category=DEV_CATEGORY,
            description=(
                "Turns a LATENT into an IMAGE without a VAE, for tiny models (which have none): the latent "
                "channels are projected to RGB by a fixed projection (the 3 orthonormal directions of a "
                "normal matrix seeded with 0), mapped to 0..1 and upsampled. Same latent, same picture, on "
                "any machine. With a real model use VAE Decode instead."
            ),
            inputs=[
                io.Latent.Input("latent", tooltip="The latents to show (e.g. a sampler's output, or training latents)."),
                io.Int.Input("scale", default=16, min=1, max=64,
                             tooltip="Pixels per latent cell, in each direction."),
                io.Combo.Input("upscale", options=list(UPSCALE), default="bilinear",
                               tooltip="How cells are upsampled: bilinear (smooth) or nearest (blocky, exact cells)."),
                io.Combo.Input("normalize", options=list(NORMALIZE), default="fixed",
                               tooltip="fixed: projected values in -value_range..value_range map to 0..1 (pictures of different "
                                       "runs compare); batch: standardised over the whole batch (one scale for an "
                                       "A/B sweep); image: standardised per image."),
                io.Float.Input("value_range", default=2.0, min=0.01, max=100.0, step=0.01,
                               tooltip="Value (fixed) or standard deviations (batch, image) that reach full "
                                       "brightness; values beyond are clipped."),
            ],
            outputs=[io.Image.Output(tooltip="The preview images, one per latent (for Preview/Save Image or "
                                             "LyCORIS Strength Grid).")],
        )

    @classmethod
    def execute(cls, latent, scale, upscale, normalize, value_range) -> io.NodeOutput:
        try:
            image = preview_image(latent["samples"], scale, upscale, normalize, value_range)
        except ValueError as err:
            raise ValueError(f"Tiny Latent Preview: {err}") from None
        return io.NodeOutput(image)


NODES = [TinyLatentPreview]
