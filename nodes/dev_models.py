"""Tiny seeded models and text conditioning, so the pack can be tried with no downloaded weights."""

from __future__ import annotations

from comfy_api.latest import io

from ..core import host
from ..core.dtypes import TORCH_DTYPES
from ..core.tiny import FAMILIES, TinyModelError, TinySizes, pattern_latents
from .types import DEV_CATEGORY


class TinyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisTinyModel",
            display_name="Tiny Model (LyCORIS dev)",
            category=DEV_CATEGORY,
            description=(
                "Builds a small random-weight Flux 2 (Klein layout), Flux 1 or SDXL model with the "
                "real architecture, seeded, for trying the pack without downloaded weights. Swap in "
                "a real loader (Load Diffusion Model / Load Checkpoint) for real work."
            ),
            inputs=[
                io.Combo.Input("family", options=list(FAMILIES), default="flux2",
                               tooltip="Architecture: flux2 (Klein layout), flux1 or sdxl."),
                io.Int.Input("width", default=128, min=32, max=4096, step=32,
                             tooltip="Hidden size (Flux) or model channels (SDXL: a multiple of 32)."),
                io.Int.Input("heads", default=1, min=1, max=64,
                             tooltip="Attention heads (Flux); width / heads is the head dimension, a multiple of 8. SDXL always uses 64 channels per head."),
                io.Int.Input("depth", default=1, min=1, max=64,
                             tooltip="Double-stream blocks (Flux) or transformer depth per attention level (SDXL)."),
                io.Int.Input("single_depth", default=1, min=0, max=64,
                             tooltip="Single-stream blocks (Flux only; ignored for SDXL)."),
                io.Int.Input("context_dim", default=64, min=8, max=8192,
                             tooltip="Width of the text embedding the model takes (use the same in Tiny Text Encode)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the random weights: same seed, same model, on any machine."),
                io.Combo.Input("dtype", options=list(TORCH_DTYPES), default="float32",
                               tooltip="Storage dtype of the weights."),
            ],
            outputs=[io.Model.Output(tooltip="The tiny model, usable by any MODEL input.")],
        )

    @classmethod
    def execute(cls, family, width, heads, depth, single_depth, context_dim, seed, dtype) -> io.NodeOutput:
        sizes = TinySizes(family=family, width=width, heads=heads, depth=depth,
                          single_depth=single_depth, context_dim=context_dim, seed=seed)
        try:
            model = host.build_tiny_model(sizes, TORCH_DTYPES[dtype])
        except TinyModelError as err:
            raise ValueError(f"Tiny Model: {err}") from None
        return io.NodeOutput(model)


class TinyTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisTinyTextEncode",
            display_name="Tiny Text Encode (LyCORIS dev)",
            category=DEV_CATEGORY,
            description=(
                "Deterministic stand-in for a text encoder, sized for the given model: each word maps "
                "to a fixed random vector. Pairs with Tiny Model; use CLIP Text Encode with a real model."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the conditioning is for (its text width is read from it)."),
                io.String.Input("text", multiline=True, default="a photo",
                                tooltip="Caption; the same text always gives the same conditioning."),
                io.Int.Input("tokens", default=8, min=1, max=512,
                             tooltip="Sequence length of the embedding (words beyond it are dropped)."),
            ],
            outputs=[io.Conditioning.Output(tooltip="Conditioning for samplers and training.")],
        )

    @classmethod
    def execute(cls, model, text, tokens) -> io.NodeOutput:
        return io.NodeOutput(host.tiny_conditioning(model, text, tokens))


class TinyLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisTinyLatents",
            display_name="Tiny Training Latents (LyCORIS dev)",
            category=DEV_CATEGORY,
            description=(
                "Seeded, smooth, structured latents shaped for the model's latent space: a stand-in for VAE-encoded "
                "training images, so the pack's training can be tried with no VAE or images."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the latents are for (its latent channels are read from it)."),
                io.Int.Input("width", default=64, min=16, max=2048, step=16, tooltip="Image width in pixels."),
                io.Int.Input("height", default=64, min=16, max=2048, step=16, tooltip="Image height in pixels."),
                io.Int.Input("count", default=2, min=1, max=64, tooltip="Number of training items."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the patterns."),
            ],
            outputs=[io.Latent.Output(tooltip="The latents (a batch).")],
        )

    @classmethod
    def execute(cls, model, width, height, count, seed) -> io.NodeOutput:
        channels, down = host.latent_layout(model)
        return io.NodeOutput({"samples": pattern_latents(channels, height // down, width // down, count, seed)})


NODES = [TinyModel, TinyTextEncode, TinyLatents]
