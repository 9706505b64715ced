"""The job layer in-process: a real tiny training job through JobQueue + run_training (no server).

Loss falls; cancel leaves a loadable checkpoint; resume continues at the saved step and ends
with the same adapter as an uninterrupted run; a NaN stops the job keeping the last checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from comfyui_lycoris.core import host
from comfyui_lycoris.core.tiny import TinySizes, pattern_latents
from comfyui_lycoris.trainer.checkpoint import latest_checkpoint, load_checkpoint
from comfyui_lycoris.trainer.data import from_latent_batch
from comfyui_lycoris.trainer.jobs import JobQueue
from comfyui_lycoris.trainer.loop import Folders, run_training
from comfyui_lycoris.trainer.spec import JobSpec

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = host.build_tiny_model(TinySizes(family="flux2", width=64, heads=2, depth=1, single_depth=1,
                                            context_dim=32, seed=2))
    cond = host.tiny_conditioning(model, "a red square", 4)
    data = from_latent_batch({"samples": pattern_latents(128, 4, 4, 2, seed=1)}, cond)
    return model, data


def spec(**overrides) -> JobSpec:
    return JobSpec(config_json=(CONFIGS / "flux2_lokr.json").read_text(), **{
        "steps": 30, "learning_rate": 3e-3, "save_every": 10, "seed": 4, "output_name": "t", **overrides})


def run(queue, model, data, tmp_path, job_spec, name="run", resume=False):
    folders = Folders(tmp_path / name, tmp_path / "loras")
    job = queue.submit(job_spec, lambda control: run_training(job_spec, name, model, data, folders, control,
                                                              resume=resume).message, name=name)
    return job, folders


def test_loss_falls_and_the_adapter_is_published(setup, tmp_path):
    model, data = setup
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    job, folders = run(JobQueue(), model, data, tmp_path, spec())
    assert job.done_event.wait(300), "job finished"
    assert job.state == "done", job.message
    losses = [loss for _, loss in job.losses]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert job.adapter is not None and list((tmp_path / "loras").glob("*.safetensors"))
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "training never writes base weights"


def test_cancel_then_resume_equals_uninterrupted(setup, tmp_path):
    """Six items in batches of one: the cancel lands mid-epoch (steps 7-11), so the resumed run must
    continue the data order, not start a new epoch."""
    model, _ = setup
    data = from_latent_batch({"samples": pattern_latents(128, 4, 4, 6, seed=1)},
                             host.tiny_conditioning(model, "a red square", 4))
    queue = JobQueue()
    full, _ = run(queue, model, data, tmp_path, spec(steps=20), "full")
    assert full.done_event.wait(300) and full.state == "done"
    partial, folders = run(queue, model, data, tmp_path, spec(steps=20), "resumed")
    while partial.step < 7 and not partial.done_event.is_set():
        time.sleep(0.01)
    queue.cancel(partial.id)
    assert partial.done_event.wait(300) and partial.state == "cancelled"
    saved = load_checkpoint(latest_checkpoint(folders.checkpoints))
    assert saved.step == partial.step and saved.step < 20
    assert saved.step % 6, "cancelled mid-epoch"
    resumed, _ = run(queue, model, data, tmp_path, spec(steps=20), "resumed", resume=True)
    assert resumed.done_event.wait(300) and resumed.state == "done", resumed.message
    assert resumed.losses[0][0] == saved.step + 1, "resume continues at the saved step"
    ours = load_checkpoint(latest_checkpoint(tmp_path / "resumed")).adapter
    reference = load_checkpoint(latest_checkpoint(tmp_path / "full")).adapter
    assert all(torch.allclose(ours[k], reference[k], atol=1e-5) for k in reference)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(setup, tmp_path, monkeypatch):
    model, data = setup
    import comfyui_lycoris.trainer.step as step_module

    real = step_module.batch_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 15 else loss

    monkeypatch.setattr(step_module, "batch_loss", poisoned)
    job, folders = run(JobQueue(), model, data, tmp_path, spec(steps=30), "nan")
    assert job.done_event.wait(300)
    assert job.state == "stopped" and "non-finite loss" in job.message and "last good checkpoint" in job.message
    kept = load_checkpoint(latest_checkpoint(folders.checkpoints))
    assert kept.step == 10 and all(torch.isfinite(v).all() for v in kept.adapter.values() if v.is_floating_point())
