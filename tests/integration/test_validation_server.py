"""Validation previews while training, through the live server.

A job with validation every 5 of 20 steps renders steps 0, 5, 10, 15, 20 at each strength into its
folder and lists them; the step-0 preview is the base model's sample (a plain KSampler prompt with
the same seed, through the same Tiny Latent Preview projection and PNG encoding); the last one is
a KSampler prompt with the final adapter file applied at that strength. A prompt queued while the
job trains is not held up by pending previews; cancel during a preview keeps a checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from graphs import train_prompt
from PIL import Image
from safetensors.torch import load_file

from comfyui_lycoris.core.latent_preview import preview_image
from comfyui_lycoris.trainer.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.integration
ACTIVE = ("queued", "running", "waiting")
SEED, STEPS = 7, 3


def with_validation(prompt: dict, strengths: str, every: int, steps: int = STEPS) -> dict:
    prompt = dict(prompt)
    prompt.update({
        "empty": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "validation": {"class_type": "LycorisValidation", "inputs": {
            "positive": ["cond", 0], "latent": ["empty", 0], "sampler_name": "euler", "scheduler": "simple",
            "steps": steps, "cfg": 1.0, "guidance": 0.0, "seed": SEED, "strengths": strengths, "every": every}},
    })
    prompt["train"]["inputs"]["validation"] = ["validation", 0]
    return prompt


def sampling_prompt(prefix: str, adapter_file: str | None = None, strength: float = 1.0) -> dict:
    prompt = train_prompt(1, "unused")
    for key in ("train", "data", "config", "latents"):
        del prompt[key]
    model = ["model", 0]
    if adapter_file is not None:
        prompt["load"] = {"class_type": "LycorisLoad", "inputs": {"model": model, "lora_name": adapter_file,
                                                                  "strict": True}}
        prompt["apply"] = {"class_type": "LycorisApply", "inputs": {"model": model, "adapter": ["load", 0],
                                                                    "strength": strength}}
        model = ["apply", 0]
    prompt.update({
        "empty": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["cond", 0], "negative": ["cond", 0], "latent_image": ["empty", 0],
            "seed": SEED, "steps": STEPS, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}},
    })
    return prompt


def sampled_pixels(server, outputs) -> np.ndarray:
    """The prompt's latent through the previews' projection and PNG quantisation."""
    saved = outputs["save"]["latents"][0]
    latent = load_file(str(server.base / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    image = preview_image(latent.float(), scale=8, normalize="fixed")[0]
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def png(server, entry: dict) -> np.ndarray:
    path = server.base / entry["type"] / entry["subfolder"] / entry["filename"]
    return np.asarray(Image.open(path).convert("RGB"))


def wait_end(server, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while (job := server.get(f"/lycoris/jobs/{job_id}"))["state"] in ACTIVE:
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


def test_previews_every_5_steps_match_plain_sampling_prompts(comfy_server):
    outputs = comfy_server.run(with_validation(train_prompt(20, "validation/run", save_every=10), "0, 1", every=5))
    job = wait_end(comfy_server, outputs["train"]["job_id"][0])
    assert job["state"] == "done", job["message"]
    found = {(v["step"], v["strength"]): v for v in job["validation"]}
    assert sorted(found) == [(s, k) for s in (0, 5, 10, 15, 20) for k in (0.0, 1.0)]
    assert all(v["filename"] == f"step-{v['step']:06d}_s{v['strength']:g}.png" for v in found.values())
    assert job["render_s"] > 0
    base = sampled_pixels(comfy_server, comfy_server.run(sampling_prompt("validation/base")))
    assert np.array_equal(png(comfy_server, found[(0, 1.0)]), base), "step 0 is the base model's sample"
    assert np.array_equal(png(comfy_server, found[(20, 0.0)]), base), "strength 0 is the base model"
    adapter = Path(job["message"].split("adapter saved to ")[1].splitlines()[0])
    name = adapter.relative_to(comfy_server.base / "models" / "loras").as_posix()
    final = sampled_pixels(comfy_server, comfy_server.run(sampling_prompt("validation/final", name, 1.0)))
    assert np.array_equal(png(comfy_server, found[(20, 1.0)]), final), "the last preview is the final adapter's"
    assert not np.array_equal(final, base), "training changed the samples"
    # The LyCORIS Job node returns the latest previews as an IMAGE batch (one per strength).
    prompt = with_validation(train_prompt(20, "validation/run", save_every=10), "0, 1", every=5)
    prompt["job"] = {"class_type": "LycorisJob", "inputs": {"job": ["train", 0], "wait": True}}
    prompt["save_previews"] = {"class_type": "SaveImage", "inputs": {"images": ["job", 2],
                                                                     "filename_prefix": "validation/latest"}}
    saved = comfy_server.run(prompt)["save_previews"]["images"]
    assert len(saved) == 2


def test_a_queued_prompt_goes_before_pending_previews_and_cancel_keeps_a_checkpoint(comfy_server):
    outputs = comfy_server.run(with_validation(train_prompt(100000, "validation/busy", save_every=50), "1",
                                               every=2, steps=8))
    job_id = outputs["train"]["job_id"][0]
    deadline = time.monotonic() + 120
    while not comfy_server.get(f"/lycoris/jobs/{job_id}")["validation"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.time()
    comfy_server.run(sampling_prompt("validation/between"))
    ended = time.time()
    job = comfy_server.get(f"/lycoris/jobs/{job_id}")
    folder = Path(job["folder"]) / "validation"
    during = sorted({p.name.split("_")[0] for p in folder.glob("*.png") if started < p.stat().st_mtime < ended})
    assert len(during) <= 1, f"previews rendered while the prompt ran: {during}"  # one may have been under way
    # Cancel while previews are being rendered: the job stops after it and writes a checkpoint.
    count = len(job["validation"])
    while len(comfy_server.get(f"/lycoris/jobs/{job_id}")["validation"]) == count:
        time.sleep(0.01)
    comfy_server.post(f"/lycoris/jobs/{job_id}/cancel", {})
    job = wait_end(comfy_server, job_id)
    assert job["state"] == "cancelled"
    checkpoints = list_checkpoints(job["folder"])
    assert checkpoints and load_checkpoint(checkpoints[-1][1]).step == job["step"]
