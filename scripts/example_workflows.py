"""The source of `example_workflows/*.json`: each workflow as an API graph plus notes, groups, layout.

`python scripts/example_workflows.py` starts a headless ComfyUI with this pack (or reads
`--url`'s `/object_info`), lays every graph out in the frontend's UI format with
`workflow_api.api_to_ui`, and writes the files. The JSON files are the product (they load by
drag and drop, `make demo` and the tests run them); this script only keeps them consistent when
a node changes. Edit a workflow in the frontend and save it over the file just as well.
"""

from __future__ import annotations

import argparse
import json
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
SIMPLETUNER_FILE = "simpletuner_flux2_lokr.safetensors"
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


WORKFLOWS = {
    "01_flux2_lokr_train": flux2_lokr_train,
    "02_flux2_lokr_apply_ab_grid": flux2_apply_ab,
    "03_flux2_lokr_merge_and_save": flux2_merge_save,
    "04_tlora_train_and_mask": tlora_train_mask,
    "05_sdxl_attention_lokr": sdxl_attention_lokr,
    "06_load_simpletuner_file": load_simpletuner,
}


# What the pack's web extension and core previews add to a node: (min width, extra height).
WIDGET_EXTRAS = {"LycorisTrain": (340, 210), "LycorisJob": (340, 210), "LycorisTLoraMaskVisualizer": (340, 200),
                 "LycorisPlan": (320, 120), "LycorisConfig": (320, 60)}


def sizes(prompt: dict, object_info: dict) -> dict[str, list[int]]:
    out = {}
    for node_id, entry in prompt.items():
        width, height = node_size(object_info[entry["class_type"]])
        min_width, extra = WIDGET_EXTRAS.get(entry["class_type"], (0, 0))
        out[node_id] = [max(width, min_width), height + extra]
    return out


def write_all(object_info: dict, out_dir: Path = OUT_DIR) -> list[Path]:
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, build in WORKFLOWS.items():
        spec = build()
        workflow = api_to_ui(spec["prompt"], object_info, notes=spec["notes"], groups=spec["groups"],
                             columns=spec["columns"], sizes=sizes(spec["prompt"], object_info))
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(workflow, indent=1) + "\n")
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="read /object_info from this running ComfyUI instead of starting one")
    args = parser.parse_args()
    if args.url:
        info = fetch_object_info(args.url)
    else:
        from comfyserver import ComfyServer

        with tempfile.TemporaryDirectory() as base:
            server = ComfyServer(Path(base))
            server.start()
            try:
                info = server.get("/object_info")
            finally:
                server.stop()
    for path in write_all(info):
        print(path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
