"""The source of `example_workflows/*.json`: each workflow as an API graph plus notes, groups, layout.

`python scripts/example_workflows.py` starts a headless ComfyUI with this pack (or reads
`--url`'s `/object_info`), lays every graph out in the frontend's UI format with
`workflow_api.api_to_ui`, and writes the files. The JSON files are the product (they load by
drag and drop and from the template browser, `make demo` and the tests run them); this script only
keeps them consistent when a node changes. Edit a workflow in the frontend and save it over the
file just as well.

What the template browser shows: the file name is the title (so the names read as titles, numbered
in the order to follow), `<name>.jpg` beside it the thumbnail (`--thumbnails` runs every workflow
on the server and keeps one of the images it makes). Every node carries `cnr_id` / `ver` (this
pack from pyproject.toml, core nodes `comfy-core`), so the frontend asks no registry which pack a
node comes from. Layout: node sizes as the frontend draws them, measured in headless Chromium in
the classic style and in Nodes 2.0 (the larger of the two; estimated when no browser is at hand),
then each group is a block and the blocks are packed in rows so that fit-to-view stays readable.
Workflow 06 loads a small SimpleTuner-format file made here by LyCORIS itself and shipped in
`example_workflows/loras/` (the pack lists that folder among the loras, see `__init__.py`).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workflow_api import api_to_ui, fetch_object_info, node_size  # noqa: E402

from comfyenv import REPO  # noqa: E402

OUT_DIR = REPO / "example_workflows"

# The tiny Flux 2 (Klein layout) of every Flux 2 workflow: the same one, so an adapter trained
# in 01 loads in 02 and 03.
TINY_FLUX2 = {"family": "flux2", "width": 64, "heads": 2, "depth": 1, "single_depth": 1, "context_dim": 32,
              "seed": 5, "dtype": "float32"}
TINY_SDXL = {"family": "sdxl", "width": 32, "heads": 1, "depth": 1, "single_depth": 0, "context_dim": 32,
             "seed": 5, "dtype": "float32"}
CAPTION = "a photo of sks pattern"
ADAPTER = "lycoris-demo/flux2_lokr"  # 01 writes models/loras/<ADAPTER>.safetensors, 02 and 03 load it
SAMPLE_LORAS = OUT_DIR / "loras"  # listed among ComfyUI's loras by the pack (__init__.py)
SIMPLETUNER_FILE = "lycoris-examples/simpletuner_flux2_lokr.safetensors"  # made by LyCORIS itself, shipped
RES = 128  # pixels; the tiny Flux 2 latent is RES / 16 cells a side
TRAIN_STEPS = 200
LEARNING_RATE = 0.01

SWAP_FLUX2 = (
    "With a real Flux 2 model, swap the dev nodes for core ones:\n"
    "- Tiny Model -> Load Diffusion Model (your Flux 2 .safetensors; weight_dtype default or fp8).\n"
    "- Tiny Text Encode -> Load CLIP (type flux2) + CLIP Text Encode.\n"
    "- Tiny Training Latents -> Load Image (your training images, batched) + Load VAE + VAE Encode.\n"
    "- Tiny Latent Preview -> VAE Decode.\n"
    "- Empty Flux 2 Latent: 1024 x 1024 instead of the tiny size.\n"
    "Keep Flux Guidance at the value you trained with (Train LyCORIS uses 1.0)."
)
SWAP_SDXL = (
    "With a real SDXL checkpoint, swap the dev nodes for core ones:\n"
    "- Tiny Model -> Load Checkpoint (MODEL, CLIP and VAE in one file).\n"
    "- Tiny Text Encode -> CLIP Text Encode (the checkpoint's CLIP).\n"
    "- Tiny Training Latents -> Load Image (your training images, batched) + VAE Encode.\n"
    "- Tiny Latent Preview -> VAE Decode.\n"
    "- Empty Latent Image: 1024 x 1024 instead of the tiny size."
)


def node(class_type: str, title: str | None = None, **inputs) -> dict:
    entry = {"class_type": class_type, "inputs": inputs}
    if title:
        entry["_meta"] = {"title": title}
    return entry


def sampler(model, positive, negative, latent, seed=7, steps=8) -> dict:
    return node("KSampler", model=model, positive=positive, negative=negative, latent_image=latent, seed=seed,
                steps=steps, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)


def preview(latent, title="Tiny Latent Preview (swap: VAE Decode)") -> dict:
    return node("LycorisTinyLatentPreview", title, latent=latent, scale=16, upscale="bilinear", normalize="fixed",
                value_range=2.0)


def train(model, dataset, config, steps, output_name, lr=LEARNING_RATE, save_every=50, schedule="constant",
          validation=None) -> dict:
    extra = {"validation": validation} if validation is not None else {}
    return node("LycorisTrain", model=model, dataset=dataset, config=config, steps=steps, batch_size=1,
                grad_accumulation=1, learning_rate=lr, lr_schedule=schedule, warmup_steps=0, optimizer="adamw",
                seed=0, dtype="float32", gradient_checkpointing=True, save_every=save_every, keep_last=2,
                nan_policy="stop", output_name=output_name, resume=False, **extra)


def flux2_lokr_train() -> dict:
    graph = {
        "1": node("LycorisTinyModel", "Tiny Flux 2 (swap: Load Diffusion Model)", **TINY_FLUX2),
        "2": node("LycorisTinyLatents", "Training images (swap: Load Image + VAE Encode)", model=["1", 0],
                  width=RES, height=RES, count=1, seed=1),
        "3": node("LycorisTinyTextEncode", "Caption (swap: CLIP Text Encode)", model=["1", 0], text=CAPTION,
                  tokens=4),
        "4": node("LycorisLatentDataset", latents=["2", 0], conditioning=["3", 0], repeats=1, caption_dropout=0.0),
        "5": node("LycorisConfig", preset="flux2_lokr", config_json=""),
        "6": node("LycorisPlan", model=["1", 0], config=["5", 0]),
        "7": train(["1", 0], ["4", 0], ["5", 0], TRAIN_STEPS, ADAPTER, schedule="cosine", validation=["14", 0]),
        "8": node("LycorisJob", job=["7", 0], wait=True),
        "9": node("SaveImage", "Save loss curve", images=["8", 1], filename_prefix="lycoris-demo/loss"),
        "10": preview(["2", 0], "Tiny Latent Preview of the training data"),
        "11": node("SaveImage", "Save training data preview", images=["10", 0],
                   filename_prefix="lycoris-demo/training_data"),
        "12": node("SaveLatent", "Save training latents", samples=["2", 0], filename_prefix="lycoris-demo/training"),
        "13": node("EmptyFlux2LatentImage", "Validation size", width=RES, height=RES, batch_size=1),
        "14": node("LycorisValidation", "Validation previews (SimpleTuner's validation_lycoris_strength)",
                   positive=["3", 0], latent=["13", 0], sampler_name="euler", scheduler="simple", steps=8, cfg=1.0,
                   guidance=1.0, seed=7, strengths="0, 1", every=50),
        "15": node("SaveImage", "Save validation previews", images=["8", 2],
                   filename_prefix="lycoris-demo/validation"),
    }
    notes = [
        {"id": 20, "column": -1, "title": "About this workflow", "size": [360, 330], "text": (
            "Train a Flux 2 LoKr with the seed's config (preset flux2_lokr: full-matrix LoKr, factor 4 on "
            "attention, 2 on feed-forward and single blocks) from data made inside the graph.\n\n"
            "Queue it: Train LyCORIS submits a background job and returns at once; LyCORIS Job (wait on) "
            "waits for it and outputs the adapter and the loss curve. Progress shows on the Train node, in "
            "the LyCORIS jobs tab and at GET /lycoris/jobs. The adapter is written to "
            f"models/loras/{ADAPTER}.safetensors (SimpleTuner/LyCORIS format, lycoris_config in the metadata); "
            "02 and 03 load it.\n\n"
            "The tiny model has random weights: it stands in for a real checkpoint so the whole job runs "
            "anywhere in seconds.")},
        {"id": 21, "column": -1, "title": "With a real model", "size": [360, 250], "text": SWAP_FLUX2},
    ]
    groups = [
        {"title": "Model and data (dev stand-ins)", "nodes": ["1", "2", "3"]},
        {"title": "Train", "nodes": ["4", "5", "6", "7", "8", "13", "14"]},
        {"title": "Look at it", "nodes": ["9", "10", "11", "12", "15"]},
    ]
    columns = {"1": 0, "2": 0, "3": 0, "4": 1, "5": 1, "6": 1, "13": 1, "14": 1, "7": 2, "8": 3, "9": 4, "10": 4,
               "15": 4, "11": 5, "12": 5}
    return {"prompt": graph, "notes": notes, "groups": groups, "columns": columns}


def flux2_apply_ab() -> dict:
    graph = {
        "1": node("LycorisTinyModel", "Tiny Flux 2 (swap: Load Diffusion Model)", **TINY_FLUX2),
        "2": node("LycorisTinyTextEncode", "Prompt (swap: CLIP Text Encode)", model=["1", 0], text=CAPTION, tokens=4),
        "3": node("FluxGuidance", conditioning=["2", 0], guidance=1.0),
        "4": node("LycorisTinyTextEncode", "Negative (unused at cfg 1)", model=["1", 0], text="", tokens=4),
        "5": node("EmptyFlux2LatentImage", width=RES, height=RES, batch_size=1),
        "6": node("LycorisLoad", model=["1", 0], lora_name=f"{ADAPTER}.safetensors", strict=True),
        "7": node("LycorisApply", model=["1", 0], adapter=["6", 0], strength=1.0),
        "8": sampler(["7", 0], ["3", 0], ["4", 0], ["5", 0]),
        "9": preview(["8", 0]),
        "10": node("SaveImage", "Save applied sample", images=["9", 0], filename_prefix="lycoris-demo/applied"),
        "11": node("LycorisAB", model=["1", 0], adapter=["6", 0], strengths="0, 0.5, 1", latent=["5", 0]),
        "12": sampler(["11", 0], ["3", 0], ["4", 0], ["11", 1]),
        "13": preview(["12", 0]),
        "14": node("LycorisStrengthGrid", images=["13", 0], strengths=["11", 2]),
        "15": node("SaveImage", "Save A/B grid", images=["14", 0], filename_prefix="lycoris-demo/ab_grid"),
        "16": node("SaveLatent", "Save A/B latents", samples=["12", 0], filename_prefix="lycoris-demo/ab_samples"),
    }
    notes = [
        {"id": 20, "column": -1, "title": "About this workflow", "size": [360, 330], "text": (
            f"Apply the adapter trained by 01 (models/loras/{ADAPTER}.safetensors; run 01 first) and compare "
            "strengths.\n\n"
            "Apply LyCORIS adds it in bypass: the base weights are never written, and moving the strength "
            "slider re-runs only the sampler.\n\n"
            "LyCORIS A/B renders strengths 0, 0.5 and 1 in ONE sampler run (each latent repeated per strength, "
            "same noise); LyCORIS Strength Grid labels the columns. Strength 0 is exactly the base model.\n\n"
            "Flux Guidance 1.0 matches the guidance the adapter was trained with.")},
        {"id": 21, "column": -1, "title": "With a real model", "size": [360, 250], "text": SWAP_FLUX2},
    ]
    groups = [
        {"title": "Model and prompt (dev stand-ins)", "nodes": ["1", "2", "3", "4", "5"]},
        {"title": "Apply at one strength", "nodes": ["6", "7", "8", "9", "10"]},
        {"title": "A/B: strengths in one batch", "nodes": ["11", "12", "13", "14", "15", "16"]},
    ]
    columns = {"1": 0, "2": 0, "3": 1, "4": 1, "5": 1, "6": 2, "7": 2, "8": 3, "9": 4, "10": 5,
               "11": 2, "12": 3, "13": 4, "14": 5, "15": 6, "16": 6}
    return {"prompt": graph, "notes": notes, "groups": groups, "columns": columns}


def flux2_merge_save() -> dict:
    graph = {
        "1": node("LycorisTinyModel", "Tiny Flux 2 (swap: Load Diffusion Model)", **TINY_FLUX2),
        "2": node("LycorisLoad", model=["1", 0], lora_name=f"{ADAPTER}.safetensors", strict=True),
        "3": node("LycorisMerge", model=["1", 0], adapter=["2", 0], strength=1.0, tlora_timestep=-1),
        "4": node("ModelSave", "Save merged model", model=["3", 0], filename_prefix="lycoris-demo/merged_flux2"),
        "5": node("LycorisSave", "Export the adapter", adapter=["2", 0], filename="lycoris-demo/exported_flux2_lokr",
                  folder="output", overwrite=True),
        "6": node("LycorisTinyTextEncode", "Prompt (swap: CLIP Text Encode)", model=["1", 0], text=CAPTION, tokens=4),
        "7": node("FluxGuidance", conditioning=["6", 0], guidance=1.0),
        "8": node("EmptyFlux2LatentImage", width=RES, height=RES, batch_size=1),
        "9": sampler(["3", 0], ["7", 0], ["7", 0], ["8", 0]),
        "10": node("SaveLatent", "Save merged sample", samples=["9", 0], filename_prefix="lycoris-demo/merged_sample"),
        "11": preview(["9", 0]),
        "12": node("SaveImage", "Save merged sample preview", images=["11", 0],
                   filename_prefix="lycoris-demo/merged_sample"),
    }
    notes = [
        {"id": 20, "column": -1, "title": "About this workflow", "size": [360, 300], "text": (
            f"Bake the adapter from 01 (models/loras/{ADAPTER}.safetensors) into the model and save it.\n\n"
            "Merge LyCORIS computes the exact weight delta itself (not LyCORIS's merge_to, which scales LoHa "
            "and decomposed LoKr twice) and adds it through ComfyUI's patches: unpatching restores the base "
            "bit for bit. Save Model writes the merged diffusion model to output/; its samples match Apply "
            "LyCORIS at the same strength.\n\n"
            "Save LyCORIS exports the adapter (a LyCORIS/SimpleTuner file) to output/.")},
        {"id": 21, "column": -1, "title": "With a real model", "size": [360, 250], "text": SWAP_FLUX2},
    ]
    groups = [
        {"title": "Model (dev stand-in)", "nodes": ["1"]},
        {"title": "Merge and save", "nodes": ["2", "3", "4", "5"]},
        {"title": "Sample the merged model", "nodes": ["6", "7", "8", "9", "10", "11", "12"]},
    ]
    columns = {"1": 0, "2": 1, "3": 2, "4": 3, "5": 3, "6": 1, "7": 2, "8": 2, "9": 3, "10": 4, "11": 4, "12": 5}
    return {"prompt": graph, "notes": notes, "groups": groups, "columns": columns}


def tlora_train_mask() -> dict:
    graph = {
        "1": node("LycorisTinyModel", "Tiny Flux 2 (swap: Load Diffusion Model)", **TINY_FLUX2),
        "2": node("LycorisTinyLatents", "Training images (swap: Load Image + VAE Encode)", model=["1", 0],
                  width=RES, height=RES, count=1, seed=2),
        "3": node("LycorisTinyTextEncode", "Caption (swap: CLIP Text Encode)", model=["1", 0], text=CAPTION,
                  tokens=4),
        "4": node("LycorisLatentDataset", latents=["2", 0], conditioning=["3", 0], repeats=1, caption_dropout=0.0),
        "5": node("LycorisConfig", preset="tlora", config_json=""),
        "6": train(["1", 0], ["4", 0], ["5", 0], 10, "lycoris-demo/tlora", lr=0.001, save_every=5),
        "7": node("LycorisJob", job=["6", 0], wait=True),
        "8": node("SaveImage", "Save loss curve", images=["7", 1], filename_prefix="lycoris-demo/tlora_loss"),
        "9": node("LycorisTLoraMaskVisualizer", rank=64, min_rank=1, alpha=1.0, compare_alphas="0.5, 2",
                  scheduler="simple", steps=8, denoise=1.0, width=768, height=512, model=["1", 0], config=["5", 0]),
        "10": node("SaveImage", "Save mask plot", images=["9", 0], filename_prefix="lycoris-demo/tlora_mask"),
        "11": node("LycorisApply", model=["1", 0], adapter=["7", 0], strength=1.0),
        "12": node("FluxGuidance", conditioning=["3", 0], guidance=1.0),
        "13": node("EmptyFlux2LatentImage", width=RES, height=RES, batch_size=1),
        "14": sampler(["11", 0], ["12", 0], ["12", 0], ["13", 0]),
        "15": preview(["14", 0]),
        "16": node("SaveImage", "Save sample", images=["15", 0], filename_prefix="lycoris-demo/tlora_sample"),
    }
    notes = [
        {"id": 20, "column": -1, "title": "About this workflow", "size": [360, 330], "text": (
            "Train a T-LoRA (preset tlora: rank 64, alpha 32, min rank 1) and see its timestep mask.\n\n"
            "T-LoRA uses few ranks at high timesteps (early, noisy steps) and all of them at low ones, which "
            "limits overfitting on small datasets. The trainer masks ranks from each sample's timestep; Apply "
            "LyCORIS does the same from the sampler's sigma at every step.\n\n"
            "T-LoRA Mask Visualizer reads rank / min rank / alpha from the config and marks the steps this "
            "model's sampler runs (simple, 8 steps); compare_alphas overlays other schedules.")},
        {"id": 21, "column": -1, "title": "With a real model", "size": [360, 250], "text": SWAP_FLUX2},
    ]
    groups = [
        {"title": "Model (dev stand-in)", "nodes": ["1"]},
        {"title": "Train T-LoRA", "nodes": ["2", "3", "4", "5", "6", "7", "8"]},
        {"title": "Timestep mask", "nodes": ["9", "10"]},
        {"title": "Sample with it", "nodes": ["11", "12", "13", "14", "15", "16"]},
    ]
    columns = {"1": 0, "2": 1, "3": 1, "4": 2, "5": 2, "6": 3, "7": 4, "8": 4, "9": 3, "10": 4,
               "11": 5, "12": 5, "13": 5, "14": 6, "15": 7, "16": 8}
    return {"prompt": graph, "notes": notes, "groups": groups, "columns": columns}


def sdxl_attention_lokr() -> dict:
    graph = {
        "1": node("LycorisTinyModel", "Tiny SDXL (swap: Load Checkpoint)", **TINY_SDXL),
        "2": node("LycorisTinyLatents", "Training images (swap: Load Image + VAE Encode)", model=["1", 0],
                  width=64, height=64, count=2, seed=3),
        "3": node("LycorisTinyTextEncode", "Caption (swap: CLIP Text Encode)", model=["1", 0], text=CAPTION,
                  tokens=4),
        "4": node("LycorisLatentDataset", latents=["2", 0], conditioning=["3", 0], repeats=1, caption_dropout=0.0),
        "5": node("LycorisConfig", preset="sdxl_lokr_attention", config_json=""),
        "6": node("LycorisPlan", model=["1", 0], config=["5", 0]),
        "7": train(["1", 0], ["4", 0], ["5", 0], 10, "lycoris-demo/sdxl_attention_lokr", lr=0.001, save_every=5),
        "8": node("LycorisJob", job=["7", 0], wait=True),
        "9": node("SaveImage", "Save loss curve", images=["8", 1], filename_prefix="lycoris-demo/sdxl_loss"),
        "10": node("LycorisApply", model=["1", 0], adapter=["8", 0], strength=1.0),
        "11": node("LycorisTinyTextEncode", "Negative (swap: CLIP Text Encode)", model=["1", 0], text="", tokens=4),
        "12": node("EmptyLatentImage", width=64, height=64, batch_size=1),
        "13": node("KSampler", model=["10", 0], positive=["3", 0], negative=["11", 0], latent_image=["12", 0],
                   seed=7, steps=8, cfg=4.0, sampler_name="euler", scheduler="normal", denoise=1.0),
        "14": preview(["13", 0]),
        "15": node("SaveImage", "Save sample", images=["14", 0], filename_prefix="lycoris-demo/sdxl_sample"),
    }
    notes = [
        {"id": 20, "column": -1, "title": "About this workflow", "size": [360, 300], "text": (
            "Train an SDXL LoKr on attention only (preset sdxl_lokr_attention: full-matrix LoKr, factor 16, on "
            "every self- and cross-attention q/k/v/out).\n\n"
            "FeedForward targets are left out on purpose: on SDXL they can drive the loss to NaN. LyCORIS Plan "
            "lists what the config adapts on this model, resolved as SimpleTuner would.\n\n"
            "The objective follows the model: epsilon prediction for SDXL (v-prediction checkpoints train with "
            "v).")},
        {"id": 21, "column": -1, "title": "With a real model", "size": [360, 230], "text": SWAP_SDXL},
    ]
    groups = [
        {"title": "Model (dev stand-in)", "nodes": ["1"]},
        {"title": "Train (attention only)", "nodes": ["2", "3", "4", "5", "6", "7", "8", "9"]},
        {"title": "Sample with it", "nodes": ["10", "11", "12", "13", "14", "15"]},
    ]
    columns = {"1": 0, "2": 1, "3": 1, "4": 2, "5": 2, "6": 2, "7": 3, "8": 4, "9": 4,
               "10": 5, "11": 5, "12": 5, "13": 6, "14": 7, "15": 8}
    return {"prompt": graph, "notes": notes, "groups": groups, "columns": columns}


def load_simpletuner() -> dict:
    graph = {
        "1": node("LycorisTinyModel", "Tiny Flux 2 (swap: Load Diffusion Model)", **TINY_FLUX2),
        "2": node("LycorisLoad", "Load the SimpleTuner file", model=["1", 0], lora_name=SIMPLETUNER_FILE, strict=True),
        "3": node("LycorisTinyTextEncode", "Prompt (swap: CLIP Text Encode)", model=["1", 0], text=CAPTION, tokens=4),
        "4": node("FluxGuidance", conditioning=["3", 0], guidance=1.0),
        "5": node("EmptyFlux2LatentImage", width=RES, height=RES, batch_size=1),
        "6": node("LycorisAB", model=["1", 0], adapter=["2", 0], strengths="0, 1", latent=["5", 0]),
        "7": sampler(["6", 0], ["4", 0], ["4", 0], ["6", 1], steps=4),
        "8": preview(["7", 0]),
        "9": node("LycorisStrengthGrid", images=["8", 0], strengths=["6", 2]),
        "10": node("SaveImage", "Save A/B grid", images=["9", 0], filename_prefix="lycoris-demo/simpletuner_ab"),
        "11": node("SaveLatent", "Save A/B latents", samples=["7", 0], filename_prefix="lycoris-demo/simpletuner_ab"),
    }
    notes = [
        {"id": 20, "column": -1, "title": "About this workflow", "size": [360, 330], "text": (
            "Use an adapter trained by SimpleTuner (or LyCORIS + diffusers) as it is: put the .safetensors file "
            f"in models/loras (here: {SIMPLETUNER_FILE}) and pick it in Load LyCORIS.\n\n"
            "Keys are diffusers module paths (lycoris_transformer_blocks_0_attn_to_q.lokr_w1, ...) with the "
            "lycoris_config JSON in the metadata; Load LyCORIS maps them onto ComfyUI's fused q/k/v and "
            "single-block layers. strict on: any module without a place in this model is an error (off: "
            "listed on the node).\n\n"
            "The A/B grid shows the base (0) next to the adapter (1) from the same noise.")},
        {"id": 21, "column": -1, "title": "With a real model", "size": [360, 250], "text": SWAP_FLUX2},
    ]
    groups = [
        {"title": "Model and prompt (dev stand-ins)", "nodes": ["1", "3", "4", "5"]},
        {"title": "SimpleTuner / LyCORIS file -> ComfyUI", "nodes": ["2", "6", "7", "8", "9", "10", "11"]},
    ]
    columns = {"1": 0, "2": 2, "3": 0, "4": 1, "5": 1, "6": 3, "7": 4, "8": 5, "9": 6, "10": 7, "11": 7}
    return {"prompt": graph, "notes": notes, "groups": groups, "columns": columns}


VARIANT_LOOKS = (  # workflow 07: (name, block preset, early-steps schedule)
    ("full", "all blocks", False), ("double blocks only", "Flux: double blocks only", False),
    ("single blocks only", "Flux: single blocks only", False), ("early steps only", "all blocks", True))


def flux2_variants_ab() -> dict:
    graph = {
        "1": node("LycorisTinyModel", "Tiny Flux 2 (swap: Load Diffusion Model)", **TINY_FLUX2),
        "2": node("LycorisTinyTextEncode", "Prompt (swap: CLIP Text Encode)", model=["1", 0], text=CAPTION, tokens=4),
        "3": node("FluxGuidance", conditioning=["2", 0], guidance=1.0),
        "4": node("LycorisTinyTextEncode", "Negative (unused at cfg 1)", model=["1", 0], text="", tokens=4),
        "5": node("EmptyFlux2LatentImage", width=RES, height=RES, batch_size=1),
        "6": node("LycorisLoad", "Load the SimpleTuner file (06's)", model=["1", 0], lora_name=SIMPLETUNER_FILE,
                  strict=True),
        "7": node("LycorisStrengthSchedule", "Early steps only (the composition)", mode="window", start=0.0, end=0.4,
                  ramp=0.05, keyframes="0 = 1\n0.4 = 1\n0.5 = 0", steps=8, scheduler="simple", model=["1", 0]),
    }
    previous = None
    for i, (name, preset, early) in enumerate(VARIANT_LOOKS):
        extra = {"schedule": ["7", 0]} if early else {}
        if previous:
            extra["variants"] = [previous, 0]
        previous = str(8 + i)
        graph[previous] = node("LycorisVariant", f"Variant: {name}", name=name, strength=1.0, block_preset=preset,
                               block_strengths="", **extra)
    graph.update({
        "12": node("LycorisAB", model=["1", 0], adapter=["6", 0], strengths="0, 1", latent=["5", 0],
                   variants=[previous, 0]),
        "13": sampler(["12", 0], ["3", 0], ["4", 0], ["12", 1]),
        "14": preview(["13", 0]),
        "15": node("LycorisStrengthGrid", images=["14", 0], strengths=["12", 2]),
        "16": node("SaveImage", "Save variants grid", images=["15", 0], filename_prefix="lycoris-demo/variants_grid"),
        "17": node("SaveLatent", "Save variant latents", samples=["13", 0], filename_prefix="lycoris-demo/variants"),
        "18": node("SaveImage", "Save schedule plot", images=["7", 1], filename_prefix="lycoris-demo/schedule"),
    })
    notes = [
        {"id": 20, "column": -1, "title": "About this workflow", "size": [360, 360], "text": (
            "Four looks of one adapter in ONE sampler run, same noise: the whole adapter, its double blocks only, "
            "its single blocks only, and the whole adapter in the early (composition-setting) steps only.\n\n"
            "Each LyCORIS Variant names a look: a strength, per-block strengths (a preset or 'pattern = "
            "multiplier' lines; Load LyCORIS lists the adapter's blocks) and an optional LyCORIS Strength "
            "Schedule. Chain them (variants -> variants) into LyCORIS A/B; the Strength Grid labels each column "
            "with its variant's name.\n\n"
            "Nothing is re-patched: every look runs in bypass from each sample's own strength, block and sigma. "
            "The schedule node draws its curve over the sampler's steps live as you edit it.\n\n"
            "The adapter is 06's SimpleTuner LoKr file (shipped in example_workflows/loras).")},
        {"id": 21, "column": -1, "title": "With a real model", "size": [360, 250], "text": SWAP_FLUX2},
    ]
    groups = [
        {"title": "Model, prompt and adapter (dev stand-ins)", "nodes": ["1", "2", "3", "4", "5", "6"]},
        {"title": "Four named variants", "nodes": ["7", "8", "9", "10", "11"]},
        {"title": "A/B: every variant in one batch", "nodes": ["12", "13", "14", "15", "16", "17", "18"]},
    ]
    columns = {"1": 0, "2": 0, "3": 1, "4": 1, "5": 1, "6": 1, "7": 2, "8": 2, "9": 2, "10": 3, "11": 3,
               "12": 4, "13": 5, "14": 6, "15": 6, "16": 7, "17": 7, "18": 7}
    return {"prompt": graph, "notes": notes, "groups": groups, "columns": columns}

# File names are the template browser's titles: numbered in the order to follow ("NN_" keeps
# `make demo`'s glob), then what the workflow does.
WORKFLOWS = {
    "01_Train a Flux 2 LoKr": flux2_lokr_train,
    "02_Apply it - one strength and an A-B grid": flux2_apply_ab,
    "03_Merge it into the model and save": flux2_merge_save,
    "04_Train a T-LoRA and plot its timestep mask": tlora_train_mask,
    "05_Train an SDXL LoKr on attention only": sdxl_attention_lokr,
    "06_Load a SimpleTuner LyCORIS file": load_simpletuner,
    "07_Compare looks - blocks and schedules in one batch": flux2_variants_ab,
}

# The image each workflow's thumbnail is made from: the title (part) of one of its Save Image nodes.
THUMBNAILS = {
    "01_Train a Flux 2 LoKr": "loss curve",
    "02_Apply it - one strength and an A-B grid": "A/B grid",
    "03_Merge it into the model and save": "merged sample preview",
    "04_Train a T-LoRA and plot its timestep mask": "mask plot",
    "05_Train an SDXL LoKr on attention only": "loss curve",
    "06_Load a SimpleTuner LyCORIS file": "A/B grid",
    "07_Compare looks - blocks and schedules in one batch": "variants grid",
}
THUMB_SIZE = (512, 384)

# What the pack's web extension and core previews add to a node when no browser measures it: (min width,
# extra height). Image outputs get room for their picture (Nodes 2.0 grows the node to show it).
WIDGET_EXTRAS = {"LycorisTrain": (360, 330), "LycorisJob": (360, 290), "LycorisTLoraMaskVisualizer": (360, 460),
                 "LycorisStrengthSchedule": (320, 190),
                 "LycorisPlan": (420, 200), "LycorisConfig": (340, 120), "LycorisLoad": (320, 90),
                 "LycorisLatentDataset": (320, 90), "LycorisMerge": (320, 90), "LycorisSave": (320, 90)}
# Room for the text a node shows after a run (the pack's text results): (min width, extra height).
TEXT_ROOM = {"LycorisPlan": (460, 150), "LycorisConfig": (400, 30), "LycorisLoad": (400, 40),
             "LycorisTrain": (0, 20), "LycorisJob": (0, 20)}
IMAGE_ROOM = 220  # a Save / Preview Image node's picture after a run
IMAGE_NODES = {"SaveImage", "PreviewImage", "LycorisTLoraMaskVisualizer"}
SIZE_MARGIN = 20  # a node configured from a workflow can draw a little taller than a fresh one

NODE_GAP_X, NODE_GAP_Y = 40, 60  # between nodes (the title bar is drawn above a node's position)
GROUP_PAD, GROUP_TITLE = 20, 65  # a group's frame around its nodes, and its title above them
BLOCK_GAP = 40  # between groups
VIEW = (1600, 1000)  # the window fit-to-view is judged for


def estimated_sizes(prompt: dict, object_info: dict) -> dict[str, list[int]]:
    out = {}
    for node_id, entry in prompt.items():
        width, height = node_size(object_info[entry["class_type"]])
        min_width, extra = WIDGET_EXTRAS.get(entry["class_type"], (0, 0))
        if entry["class_type"] in IMAGE_NODES:
            extra += IMAGE_ROOM
        out[node_id] = [max(width, min_width), height + extra]
    return out


def pack_metadata() -> tuple[str, str]:
    """(registry id, version) of this pack, from pyproject.toml."""
    project = (REPO / "pyproject.toml").read_text().split("[project]", 1)[1].split("\n[", 1)[0]
    name, version = (re.search(rf'^{key}\s*=\s*"([^"]+)"', project, re.MULTILINE).group(1) for key in ("name", "version"))
    return name, version


def tag_nodes(workflow: dict, object_info: dict, core_version: str) -> None:
    """`properties.cnr_id` / `ver` on every node (as the frontend saves them): no registry look-up on load."""
    pack_id, pack_version = pack_metadata()
    for entry in workflow["nodes"]:
        info = object_info.get(entry["type"])
        if info is None:  # frontend-only (Note)
            continue
        module = str(info.get("python_module", ""))
        custom = module.startswith("custom_nodes")
        entry["properties"] = {**entry.get("properties", {}), "cnr_id": pack_id if custom else "comfy-core",
                               "ver": pack_version if custom else core_version}


def _block(members: list[str], columns: dict, size_of: dict, max_height: int) -> tuple[dict, list[int]]:
    """Positions of a group's nodes relative to its block and the block's [width, height] (group frame and
    title included). Nodes go in data-flow order (the workflow's columns, then id) down a column, and on to
    the next column once `max_height` would be passed; each column is as wide as its widest node."""
    order = sorted(members, key=lambda m: (columns.get(m, 0), int(m)))
    stacks: list[list[str]] = [[]]
    height = 0
    for nid in order:
        h = size_of[nid][1] + NODE_GAP_Y
        if stacks[-1] and height + h - NODE_GAP_Y > max_height:
            stacks.append([])
            height = 0
        stacks[-1].append(nid)
        height += h
    pos, x, tallest = {}, GROUP_PAD, 0
    for stack in stacks:
        y = GROUP_TITLE
        for nid in stack:
            pos[nid] = [x, y]
            y += size_of[nid][1] + NODE_GAP_Y
        tallest = max(tallest, y - NODE_GAP_Y)
        x += max(size_of[nid][0] for nid in stack) + NODE_GAP_X
    return pos, [x - NODE_GAP_X + GROUP_PAD, tallest + GROUP_PAD]


def _shelves(blocks: list[list[int]], max_width: int) -> tuple[list[list[int]], list[int]]:
    """Blocks placed left to right, a new row when `max_width` is passed: their offsets and the total size."""
    offsets, x, y, row_h, width = [], 0, 0, 0, 0
    for w, h in blocks:
        if x and x + w > max_width:
            x, y, row_h = 0, y + row_h + BLOCK_GAP, 0
        offsets.append([x, y])
        x += w + BLOCK_GAP
        row_h = max(row_h, h)
        width = max(width, x - BLOCK_GAP)
    return offsets, [width, y + row_h]


def _stacks(blocks: list[list[int]], max_height: int) -> tuple[list[list[int]], list[int]]:
    """Blocks placed top to bottom, a new column of blocks when `max_height` is passed: offsets, total size."""
    offsets, x, y, col_w, height = [], 0, 0, 0, 0
    for w, h in blocks:
        if y and y + h > max_height:
            x, y, col_w = x + col_w + BLOCK_GAP, 0, 0
        offsets.append([x, y])
        y += h + BLOCK_GAP
        col_w = max(col_w, w)
        height = max(height, y - BLOCK_GAP)
    return offsets, [x + col_w, height]


def arrange(workflow: dict, spec: dict, size_of: dict) -> None:
    """Re-places the nodes and groups of `workflow` so that fit-to-view in a VIEW window is as large as it can
    be: each group (the notes and each ungrouped node make one too) is a block of node columns no taller
    than a common height; blocks go in rows, or in columns of blocks. Every column height and row width is
    tried; the best is kept."""
    columns = {str(k): v for k, v in spec["columns"].items()}
    notes = [str(n["id"]) for n in spec["notes"]]
    grouped = [[str(n) for n in g["nodes"]] for g in spec["groups"]]
    in_groups = {m for g in grouped for m in g}
    loose = [str(n["id"]) for n in workflow["nodes"] if str(n["id"]) not in in_groups and str(n["id"]) not in notes]
    blocks = [(notes, None), *(([m], None) for m in loose), *((members, i) for i, members in enumerate(grouped))]
    blocks = [(members, index) for members, index in blocks if members]
    heights = [size_of[n][1] for members, _ in blocks for n in members]
    best = None
    for max_height in range(max(heights), sum(h + NODE_GAP_Y for h in heights) + 50, 50):
        laid = [_block(members, columns, size_of, max_height) for members, _ in blocks]
        widest = max(size[0] for _, size in laid)
        total = sum(size[0] + BLOCK_GAP for _, size in laid)
        tallest = max(size[1] for _, size in laid)
        candidates = [_shelves([size for _, size in laid], row_width) for row_width in range(widest, total + 1, 40)]
        candidates += [_stacks([size for _, size in laid], column_height)
                       for column_height in range(tallest, tallest + sum(size[1] for _, size in laid) + 1, 50)]
        for offsets, (w, h) in candidates:
            scale = min(VIEW[0] * 0.95 / w, VIEW[1] * 0.95 / h)
            if best is None or scale > best[0] + 1e-9:
                best = (scale, laid, offsets)
    scale, laid, offsets = best
    by_id = {str(n["id"]): n for n in workflow["nodes"]}
    for (members, index), (rel, size), (ox, oy) in zip(blocks, laid, offsets):
        for nid in members:
            by_id[nid]["pos"] = [ox + rel[nid][0], oy + rel[nid][1]]
            by_id[nid]["size"] = list(size_of[nid])
        if index is not None:
            workflow["groups"][index]["bounding"] = [ox, oy, size[0], size[1]]
    workflow["extra"]["ds"] = {"scale": round(scale, 3), "offset": [20, 40]}


def write_sample_file(path: Path = SAMPLE_LORAS / SIMPLETUNER_FILE) -> Path:
    """Workflow 06's adapter: a Flux 2 LoKr (preset flux2_lokr) that LyCORIS itself makes and saves on the
    diffusers twin of the tiny model, every parameter seeded random; bf16, about 70 KB. Same bytes each time."""
    from comfyenv import install_import_paths

    install_import_paths()
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from lycoris_reference import lycoris_network

    from comfyui_lycoris.core.config import parse_config
    from comfyui_lycoris.core.families import profile_named
    from comfyui_lycoris.core.tiny import TinySizes, unet_config

    sizes = TinySizes(**{k: v for k, v in TINY_FLUX2.items() if k != "dtype"})
    config = parse_config((REPO / "configs" / "flux2_lokr.json").read_text())
    network = lycoris_network(config, profile_named("flux2").build_skeleton(unet_config(sizes), device="cpu"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in network.loras:
            for name, p in lora.named_parameters():
                if not name.startswith("org_"):
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    network.apply_to()
    path.parent.mkdir(parents=True, exist_ok=True)
    network.save_weights(str(path), torch.bfloat16, {"lycoris_config": config.to_json()})
    path.chmod(0o644)
    return path


MEASURE = r"""
async (specs) => {
  const app = window.comfyAPI?.app?.app ?? window.app;
  const setting = app.extensionManager?.setting;
  const frames = () => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
  const sizes = {};
  for (const vue of [false, true]) {
    if (setting) await setting.set('Comfy.VueNodes.Enabled', vue);
    for (const node of [...app.graph.nodes]) app.graph.remove(node);
    app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0];
    const made = specs.map((spec, i) => {
      const node = LiteGraph.createNode(spec.type);
      if (spec.title) node.title = spec.title;
      const least = node.computeSize(); // a long title widens the node, as loading a workflow does
      node.setSize([Math.max(node.size[0], least[0]), Math.max(node.size[1], least[1])]);
      node.pos = [40 + (i % 4) * 900, 60 + Math.floor(i / 4) * 1400];
      app.graph.add(node);
      return [spec.key, node];
    });
    app.canvas.setDirty(true, true);
    await frames();
    await new Promise((done) => setTimeout(done, vue ? 1500 : 300));
    const canvasBox = app.canvas.canvas.getBoundingClientRect();
    for (const [key, node] of made) {
      let size = [node.size[0], node.size[1]];
      if (vue) {
        const el = document.querySelector(`[data-node-id="${node.id}"]`);
        if (!el) continue;
        const r = el.getBoundingClientRect();
        size = [r.width / app.canvas.ds.scale, r.height / app.canvas.ds.scale - LiteGraph.NODE_TITLE_HEIGHT];
      }
      const seen = sizes[key] ?? [0, 0];
      sizes[key] = [Math.max(seen[0], Math.ceil(size[0])), Math.max(seen[1], Math.ceil(size[1]))];
    }
  }
  if (setting) await setting.set('Comfy.VueNodes.Enabled', false);
  for (const node of [...app.graph.nodes]) app.graph.remove(node);
  return sizes;
}
"""


def measured_sizes(url: str, prompts: dict[str, dict]) -> dict[str, dict[str, list[int]]] | None:
    """Node sizes as the server's frontend draws them (the larger of classic and Nodes 2.0), per workflow;
    None without playwright and Chromium."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        return None
    specs = [{"key": f"{name}/{nid}", "type": entry["class_type"], "title": entry.get("_meta", {}).get("title")}
             for name, prompt in prompts.items() for nid, entry in prompt.items()]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=["--headless", "--no-sandbox",
                                                                          "--disable-gpu", "--no-first-run"])
        page = browser.new_page(viewport={"width": VIEW[0], "height": VIEW[1]})
        page.goto(url)
        page.wait_for_function("() => !!((window.comfyAPI?.app?.app ?? window.app)?.graph && "
                               "window.LiteGraph?.registered_node_types?.LycorisApply)", timeout=60_000, polling=250)
        page.wait_for_timeout(3000)
        page.keyboard.press("Escape")  # a first visit's Templates browser
        sizes = page.evaluate(MEASURE, specs)
        browser.close()
    out: dict[str, dict[str, list[int]]] = {}
    for key, size in sizes.items():
        name, nid = key.rsplit("/", 1)
        entry = prompts[name][nid]
        extra = IMAGE_ROOM if entry["class_type"] in IMAGE_NODES else 0
        out.setdefault(name, {})[nid] = [size[0], size[1] + extra + SIZE_MARGIN]
    return out


def write_all(object_info: dict, out_dir: Path = OUT_DIR, core_version: str = "0.3.75",
              sizes: dict[str, dict[str, list[int]]] | None = None) -> list[Path]:
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, build in WORKFLOWS.items():
        spec = build()
        size_of = estimated_sizes(spec["prompt"], object_info)
        for nid, (w, h) in (sizes or {}).get(name, {}).items():  # measured, plus room for a longer result text
            min_width, text = TEXT_ROOM.get(spec["prompt"][nid]["class_type"], (0, 0))
            size_of[nid] = [max(w, min_width), h + text]
        workflow = api_to_ui(spec["prompt"], object_info, notes=spec["notes"], groups=spec["groups"],
                             columns=spec["columns"], sizes=size_of)
        size_of.update({str(n["id"]): list(n["size"]) for n in workflow["nodes"] if n["type"] == "Note"})
        arrange(workflow, spec, size_of)
        tag_nodes(workflow, object_info, core_version)
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(workflow, indent=1) + "\n")
        written.append(path)
    for stale in set(out_dir.glob("*.json")) - set(written):  # a renamed workflow leaves no old copy behind
        stale.unlink()
        stale.with_suffix(".jpg").unlink(missing_ok=True)
    return written


def write_thumbnails(server, object_info: dict, out_dir: Path = OUT_DIR) -> list[Path]:
    """Runs every workflow (in order: 02 and 03 load what 01 trains) and keeps one of its images as
    `<name>.jpg`, scaled to fit THUMB_SIZE and letterboxed on the canvas colour."""
    from PIL import Image
    from workflow_api import ui_to_api

    written = []
    for name in WORKFLOWS:
        prompt = ui_to_api(json.loads((out_dir / f"{name}.json").read_text()), object_info)
        outputs = server.run(prompt, timeout=900)
        wanted = THUMBNAILS[name].lower()
        node_id = next(i for i, n in prompt.items() if n["class_type"] == "SaveImage"
                       and wanted in n.get("_meta", {}).get("title", "").lower())
        item = outputs[node_id]["images"][0]
        image = Image.open(server.base / item.get("type", "output") / item["subfolder"] / item["filename"])
        image = image.convert("RGB")
        scale = min(THUMB_SIZE[0] / image.width, THUMB_SIZE[1] / image.height)  # small previews are enlarged
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.LANCZOS if scale < 1 else Image.BICUBIC)
        canvas = Image.new("RGB", THUMB_SIZE, (30, 31, 36))
        canvas.paste(image, ((THUMB_SIZE[0] - image.width) // 2, (THUMB_SIZE[1] - image.height) // 2))
        buffer = io.BytesIO()
        canvas.save(buffer, "JPEG", quality=85, optimize=True)
        path = out_dir / f"{name}.jpg"
        path.write_bytes(buffer.getvalue())
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="read /object_info from this running ComfyUI instead of starting one")
    parser.add_argument("--no-measure", action="store_true", help="estimate node sizes instead of measuring them")
    parser.add_argument("--thumbnails", action="store_true",
                        help="also run every workflow and write its thumbnail (<name>.jpg)")
    args = parser.parse_args()
    print(write_sample_file().relative_to(REPO))

    def generate(server_url: str, info: dict, version: str, server=None) -> None:
        prompts = {name: build()["prompt"] for name, build in WORKFLOWS.items()}
        sizes = None if args.no_measure else measured_sizes(server_url, prompts)
        if sizes is None and not args.no_measure:
            print("note: no playwright/Chromium: node sizes are estimated", file=sys.stderr)
        for path in write_all(info, core_version=version, sizes=sizes):
            print(path.relative_to(REPO))
        if args.thumbnails:
            if server is None:
                raise SystemExit("--thumbnails runs the workflows on a server this script starts (drop --url)")
            for path in write_thumbnails(server, info):
                print(path.relative_to(REPO))

    if args.url:
        info = fetch_object_info(args.url)
        generate(args.url, info, _core_version(args.url))
        return 0
    from comfyserver import ComfyServer

    with tempfile.TemporaryDirectory() as base:
        server = ComfyServer(Path(base))
        server.start()
        try:
            generate(server.url, server.get("/object_info"), _core_version(server.url), server)
        finally:
            server.stop()
    return 0


def _core_version(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url.rstrip("/") + "/system_stats", timeout=30) as resp:
        return json.loads(resp.read())["system"]["comfyui_version"]


if __name__ == "__main__":
    raise SystemExit(main())
