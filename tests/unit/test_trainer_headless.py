"""Headless jobs without a server: job folders round-trip, rank slices add up to the global batch,
the Export node writes a folder that `python -m trainer run` trains (cancel keeps a checkpoint,
the rerun resumes and writes the adapter), and failures are one line with a non-zero exit code."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from comfyui_lycoris.core import host
from comfyui_lycoris.core.adapter_file import read_adapter
from comfyui_lycoris.core.config import parse_config
from comfyui_lycoris.core.targets import plan_for
from comfyui_lycoris.core.tiny import TinySizes, pattern_latents
from comfyui_lycoris.trainer import headless
from comfyui_lycoris.trainer.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from comfyui_lycoris.trainer.checkpointing import gradient_checkpointing
from comfyui_lycoris.trainer.data import TrainingSet, from_latent_batch
from comfyui_lycoris.trainer.distributed import World
from comfyui_lycoris.trainer.jobfile import JobFileError, ModelRef, load_dataset, read_job, save_dataset, write_job
from comfyui_lycoris.trainer.predict import ComfyPredictor, encode_conditioning, objective_for_model, stack_conditioning
from comfyui_lycoris.trainer.spec import JobSpec
from comfyui_lycoris.trainer.step import Batch, batch_loss
from comfyui_lycoris.trainer.trainable import TrainableAdapter, comfy_base_weights

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
SIZES = TinySizes(family="flux2", width=64, heads=2, depth=1, single_depth=1, context_dim=32, seed=3)


@pytest.fixture(scope="module")
def model():
    return host.build_tiny_model(SIZES)


def tiny_set(model, count: int = 2, dropout: float = 0.0) -> TrainingSet:
    cond = host.tiny_conditioning(model, "a red square", 4)
    empty = host.tiny_conditioning(model, "", 4) if dropout else None
    return from_latent_batch({"samples": pattern_latents(128, 4, 4, count, seed=1)}, cond, 2, dropout, empty)


def spec(**overrides) -> JobSpec:
    return JobSpec(config_json=(CONFIGS / "flux2_lokr.json").read_text(), **{
        "steps": 4, "batch_size": 2, "learning_rate": 3e-3, "save_every": 2, "seed": 4, "output_name": "t",
        **overrides})


def test_job_folder_round_trip(model, tmp_path):
    data = tiny_set(model, dropout=0.5)
    data.conditionings[0][0][1].update({"strength": 0.5, "note": None})
    reference = ModelRef("tiny", SIZES, "float32", architecture="arch")
    write_job(tmp_path / "job", spec(), data, reference, name="my job")
    folder = read_job(tmp_path / "job" / "job.json")
    assert folder.spec == spec() and folder.model == reference and folder.name == "my job"
    loaded = load_dataset(folder.dataset)
    assert all(torch.equal(a, b) for a, b in zip(loaded.latents, data.latents, strict=True))
    (cond, extras), = loaded.conditionings[0]
    assert torch.equal(cond, data.conditionings[0][0][0]) and extras["strength"] == 0.5 and extras["note"] is None
    assert torch.equal(extras["pooled_output"], data.conditionings[0][0][1]["pooled_output"])
    assert (loaded.repeats, loaded.caption_dropout) == (2, 0.5)
    assert torch.equal(loaded.empty_conditioning[0][0], data.empty_conditioning[0][0])
    with pytest.raises(JobFileError, match="already holds a job"):
        write_job(tmp_path / "job", spec(), data, reference)


def test_job_file_errors_name_the_field(model, tmp_path):
    with pytest.raises(JobFileError, match="no job file"):
        read_job(tmp_path / "nothing")
    write_job(tmp_path / "job", spec(), tiny_set(model), ModelRef("tiny", SIZES))
    document = json.loads((tmp_path / "job" / "job.json").read_text())
    for change, message in [({"spec": {**document["spec"], "steps": 0}}, "spec.steps"),
                            ({"model": {**document["model"], "kind": "onnx"}}, "model.kind"),
                            ({"format": "other"}, "format")]:
        (tmp_path / "job" / "job.json").write_text(json.dumps({**document, **change}))
        with pytest.raises(JobFileError, match=message):
            read_job(tmp_path / "job")
    bad = tiny_set(model)
    bad.conditionings[0][0][1]["control"] = object()
    with pytest.raises(JobFileError, match="'control' is a object"):
        save_dataset(tmp_path / "bad.safetensors", bad)


@pytest.mark.parametrize("total,size", [(8, 2), (3, 2), (1, 2), (5, 3), (7, 8)])
def test_rank_slices_cover_the_batch_once(total, size):
    parts = [World(rank, size).shard(total) for rank in range(size)]
    assert [i for p in parts for i in range(total)[p]] == list(range(total))
    assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


@pytest.mark.parametrize("total", [3, 1])
def test_rank_losses_and_gradients_add_up_to_the_global_batch(total):
    """Each rank's share-weighted loss and gradient sum to one process's, even for uneven or empty slices.

    In float64, so the check is exact up to rounding (float32 differs by ~1e-5 through cancellation).
    """
    model = host.build_tiny_model(SIZES, torch.float64)
    config = parse_config((CONFIGS / "flux2_lokr.json").read_text())
    unet_config = host.model_unet_config(model)
    trainable = TrainableAdapter.from_plan(plan_for(config, unet_config), unet_config,
                                           comfy_base_weights(model.model.diffusion_model), config, seed=1,
                                           dtype=torch.float64)
    with torch.no_grad():  # a non-zero delta, so every factor gets a gradient
        for p in trainable.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.05)
    base, params = model.model, trainable.parameters()
    objective, predict = objective_for_model(base, "flux2"), ComfyPredictor(base, trainable)
    latents = pattern_latents(128, 4, 4, total, seed=2).double()
    cond = stack_conditioning([encode_conditioning(base, host.tiny_conditioning(model, f"item {i}", 4),
                                                   latents[i:i + 1], 1.0) for i in range(total)])
    batch = Batch(latents, {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                            for k, v in cond.items()})

    def gradients(loss: torch.Tensor | None) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        if loss is not None:
            loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    with gradient_checkpointing(base.diffusion_model):
        full = batch_loss(predict, objective, batch, torch.Generator().manual_seed(9))
        expected = gradients(full)
        summed_loss, summed = 0.0, [torch.zeros_like(p) for p in params]
        for rank in range(2):
            loss, share = World(rank, 2)._local_loss(predict, objective, batch, torch.Generator().manual_seed(9))
            summed_loss += float(loss.detach()) * share if loss is not None else 0.0
            grads = gradients(loss * share if loss is not None else None)
            summed = [a + b for a, b in zip(summed, grads, strict=True)]
    assert abs(summed_loss - float(full.detach())) < 1e-6 * float(full.detach())  # the loss itself is float32
    for got, want in zip(summed, expected, strict=True):
        assert float((got - want).norm()) <= 1e-10 * float(want.norm()) + 1e-15


def test_cli_failures_are_one_line(tmp_path, capsys):
    assert headless.main(["run", str(tmp_path / "missing")], out=io.StringIO()) == headless.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no job file" in err and "\n" not in err


def _trainer(folder: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "trainer", "run", str(folder)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_exported_job_trains_headless_cancels_and_resumes(model, tmp_path):
    import folder_paths

    from comfyui_lycoris.nodes.export_nodes import TINY, ExportLycorisJob

    folder_paths.set_output_directory(str(tmp_path))
    settings = dict(steps=12, batch_size=2, grad_accumulation=1, learning_rate=3e-3, lr_schedule="constant",
                    warmup_steps=0, optimizer="adamw", seed=0, dtype="float32", gradient_checkpointing=True,
                    save_every=50, keep_last=2, nan_policy="stop", output_name="exported/run")
    config = parse_config((CONFIGS / "flux2_lokr.json").read_text())
    with pytest.raises(ValueError, match="not a Tiny Model with seed 4"):
        ExportLycorisJob.execute(model, tiny_set(model), config, **settings, base_model=TINY, tiny_seed=4)
    out = ExportLycorisJob.execute(model, tiny_set(model), config, **settings, base_model=TINY, tiny_seed=3)
    folder = Path(out.result[0])
    assert folder == tmp_path / "lycoris_jobs" / "exported" / "run" and (folder / "dataset.safetensors").is_file()
    assert read_job(folder).model.tiny == SIZES

    run = _trainer(folder)  # cancelled by SIGTERM after a few steps: a checkpoint, no adapter
    for line in run.stdout:
        if line.startswith("step 2/"):
            run.send_signal(signal.SIGTERM)
            break
    out_text, err_text = run.communicate(timeout=300)
    assert run.returncode == headless.EXIT_CANCELLED, err_text
    assert "cancelled at step" in err_text and not (folder / "loras").exists()
    saved = load_checkpoint(latest_checkpoint(folder / "checkpoints"))
    assert 2 <= saved.step < 12

    run = _trainer(folder)
    out_text, err_text = run.communicate(timeout=300)
    assert run.returncode == 0, err_text
    assert f"from checkpoint-{saved.step:08d}" in out_text and f"step {saved.step + 1}/12" in out_text
    assert "step 12/12" in out_text and "adapter saved to" in out_text
    adapter = read_adapter(folder / "loras" / "exported" / "run.safetensors")
    assert adapter.modules and adapter.config is not None and adapter.config.algo == "lokr"


# -- unusable job folders and finished jobs ------------------------------------------------------

def _tiny_job(model, folder: Path, **overrides) -> Path:
    write_job(folder, spec(**overrides), tiny_set(model), ModelRef("tiny", SIZES))
    return folder


def _edit_job(folder: Path, edit) -> None:
    document = json.loads((folder / "job.json").read_text())
    edit(document)
    (folder / "job.json").write_text(json.dumps(document))


def _run_in_process(folder: Path, capsys) -> tuple[int, str, str]:
    out = io.StringIO()
    code = headless.main(["run", str(folder)], out=out)
    return code, out.getvalue(), capsys.readouterr().err


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["spec"].update(steps="ten"), "spec.steps: must be an integer (got 'ten')"),
    (lambda d: d["spec"].update(learning_rate=True), "spec.learning_rate: must be a number (got True)"),
    (lambda d: d["spec"].pop("config_json"), "spec.config_json: missing"),
    (lambda d: d["spec"].update(config_json="{not json"), "spec.config_json: config: malformed JSON at line 1"),
    (lambda d: d["spec"].update(config_json='{"algo": "lokr", "multiplier": "x"}'), "spec.config_json: multiplier"),
    (lambda d: d["spec"].update(optimizer="sgd"), "spec.optimizer: must be one of"),
    (lambda d: d.update(spec=[1]), "spec: must be an object"),
    (lambda d: d["model"]["tiny"].update(width=60, heads=7), "model.tiny.width: 60 is not divisible by heads=7"),
    (lambda d: d["model"]["tiny"].update(width="wide"), "model.tiny.width: must be an integer (got 'wide')"),
    (lambda d: d["model"]["tiny"].update(family="sd3"), "model.tiny.family: 'sd3' is not one of"),
    (lambda d: d["model"].update(tiny=3), "model.tiny: must be an object (got 3)"),
    (lambda d: d["model"].update(dtype="float64"), "model.dtype: must be one of"),
    (lambda d: d.update(dataset=5), "dataset: must be a string (got 5)"),
])
def test_unusable_job_fields_exit_2_naming_the_field(model, tmp_path, capsys, edit, message):
    folder = _tiny_job(model, tmp_path / "job")
    _edit_job(folder, edit)
    code, out, err = _run_in_process(folder, capsys)
    assert code == headless.EXIT_USAGE, err
    assert err.startswith(f"error: job.json: {message}") and err.count("\n") == 1, err
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.safetensors", "job.json"]  # nothing written


def test_wrongly_typed_field_exits_2_from_the_command_line(model, tmp_path):
    folder = _tiny_job(model, tmp_path / "job")
    _edit_job(folder, lambda d: d["spec"].update(steps="ten"))
    run = _trainer(folder)
    out_text, err_text = run.communicate(timeout=300)
    assert run.returncode == headless.EXIT_USAGE
    assert err_text == "error: job.json: spec.steps: must be an integer (got 'ten')\n"


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_finished_job_rerun_changes_nothing_and_corrupt_checkpoints_are_handled(model, tmp_path, capsys):
    folder = _tiny_job(model, tmp_path / "job", steps=2, save_every=1, keep_last=5)
    checkpoints, adapter = folder / "checkpoints", (folder / "loras" / "t.safetensors").resolve()
    code, out, err = _run_in_process(folder, capsys)
    assert code == 0 and adapter.is_file(), err
    assert [s for s, _ in list_checkpoints(checkpoints)] == [1, 2]

    before = _files(folder)  # run again: it says so, names the adapter, and writes nothing
    code, out, err = _run_in_process(folder, capsys)
    assert code == 0 and "already complete (2 of 2 steps, checkpoint-00000002.safetensors)" in out, out + err
    assert f"adapter: {adapter}" in out and "step 1/" not in out and "step 2/" not in out
    assert _files(folder) == before

    adapter.unlink()  # finished, adapter gone: still complete, says the adapter is missing, writes nothing
    before = _files(folder)
    code, out, err = _run_in_process(folder, capsys)
    assert code == 0 and "already complete" in out and "no adapter of 2 steps named t in" in out, out + err
    assert _files(folder) == before

    final = checkpoints / "checkpoint-00000002.safetensors"  # newest checkpoint damaged: resume from the one before
    with open(final, "r+b") as fh:
        fh.truncate(final.stat().st_size - 100)
    code, out, err = _run_in_process(folder, capsys)
    assert code == 0, err
    assert "warning: skipped checkpoint-00000002.safetensors: truncated" in err and "step 1/" not in out
    assert "from checkpoint-00000001.safetensors" in out and "step 2/2" in out
    assert load_checkpoint(final).step == 2 and read_adapter(adapter).metadata["lycoris_pack.steps"] == "2"

    for path in (final, checkpoints / "checkpoint-00000001.safetensors"):  # all corrupt: exit 2, nothing restarts
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 2)
    before = _files(folder)
    code, out, err = _run_in_process(folder, capsys)
    assert code == headless.EXIT_USAGE and err.count("\n") == 1, err
    assert err.startswith("error: checkpoints: ") and "no intact checkpoint" in err
    assert "checkpoint-00000002.safetensors: truncated" in err and "checkpoint-00000001.safetensors: truncated" in err
    assert _files(folder) == before


def test_headless_runs_render_the_exported_validation(model, tmp_path, capsys):
    """An exported Validation travels in the job folder; the headless run renders it at 0, every N and the end,
    and the step-0 preview is the base model's sample (the same one a fresh render of the base gives)."""
    from comfyui_lycoris.trainer.validation import Validation, decode, file_name

    latent = {"samples": torch.zeros(1, 128, 4, 4)}
    cond = host.tiny_conditioning(model, "a red square", 4)
    validation = Validation(cond, cond, latent, "euler", "simple", 2, 1.0, 5, (0.0, 1.0), 2)
    write_job(tmp_path, spec(steps=4), tiny_set(model), ModelRef("tiny", SIZES), validation=validation)
    again = read_job(tmp_path).validation
    assert again.strengths == (0.0, 1.0) and again.every == 2 and torch.equal(again.latent["samples"],
                                                                                latent["samples"])
    code, out, err = _run_in_process(tmp_path, capsys)
    assert code == 0, err
    rendered = sorted(p.name for p in (tmp_path / "checkpoints" / "validation").glob("*.png"))
    assert rendered == sorted(file_name(s, k) for s in (0, 2, 4) for k in (0.0, 1.0))
    assert out.count("validation step") == 6
    with torch.no_grad():
        base = decode(None, host.ksample(model, cond, cond, latent, 5, 2, 1.0, "euler", "simple"))
    from PIL import Image
    png = torch.from_numpy(np.array(Image.open(tmp_path / "checkpoints" / "validation" / file_name(0, 1.0))))
    assert torch.equal(png, (base[0].clamp(0, 1) * 255).round().to(torch.uint8))
