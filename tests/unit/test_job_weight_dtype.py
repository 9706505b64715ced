"""Load Diffusion Model's `weight_dtype` in exported jobs (issue 16).

The Export node reads it from the connected MODEL, the job file keeps it (old files without the
field read as "default"), and the headless loader loads the file through core's UNETLoader with
it. The real load uses the smallest Flux 1 file ComfyUI 0.3.75 detects (hidden 3072 is fixed by its
24 heads x 128; one double block, no single block, small text inputs, no guidance embedder: 379 M
parameters, 379 MB in fp8), written once per module; the real-width Flux 1 (545 M) goes through
export and a headless run in tests/integration/test_real_models_server.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import model_files as mf
import pytest
import torch

from comfyui_lycoris.core import host
from comfyui_lycoris.core.config import parse_config
from comfyui_lycoris.core.tiny import TinySizes, pattern_latents
from comfyui_lycoris.trainer import headless
from comfyui_lycoris.trainer.data import from_latent_batch
from comfyui_lycoris.trainer.jobfile import WEIGHT_DTYPES, JobFileError, ModelRef, read_job, write_job
from comfyui_lycoris.trainer.spec import JobSpec

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SIZES = TinySizes(family="flux1", width=64, heads=2, depth=1, single_depth=1, context_dim=32, seed=3)
SMALLEST_FLUX1 = mf.flux1_shapes(depth=1, single_depth=0, context_in_dim=16, vec_in_dim=16, guidance=False)
SEED = 5


def tiny_set(model):
    cond = host.tiny_conditioning(model, "a red square", 4)
    return from_latent_batch({"samples": pattern_latents(16, 8, 8, 1, seed=1)}, cond, 1, 0.0, None)


def spec() -> JobSpec:
    return JobSpec(config_json=(CONFIGS / "flux1_lokr.json").read_text(), steps=1, batch_size=1, output_name="t")


def file_ref(path: Path, weight_dtype: str = "fp8_e4m3fn") -> ModelRef:
    return ModelRef("diffusion_model", file=path.name, path=str(path), architecture="a", weight_dtype=weight_dtype)


def test_job_file_keeps_the_weight_dtype_and_old_files_read_as_default(tmp_path):
    model = host.build_tiny_model(SIZES)
    reference = file_ref(tmp_path / "model.safetensors")
    target = write_job(tmp_path / "job", spec(), tiny_set(model), reference)
    document = json.loads(target.read_text())
    assert document["model"]["weight_dtype"] == "fp8_e4m3fn"
    assert read_job(target).model == reference
    assert reference.describe() == "diffusion_model model.safetensors (weight_dtype fp8_e4m3fn)"
    del document["model"]["weight_dtype"]  # a job exported before the field existed
    target.write_text(json.dumps(document))
    assert read_job(target).model == file_ref(tmp_path / "model.safetensors", "default")


@pytest.mark.parametrize("change, message", [
    ({"weight_dtype": "fp16"}, "model.weight_dtype: must be one of default, fp8_e4m3fn, fp8_e4m3fn_fast, fp8_e5m2"),
    ({"weight_dtype": 8}, "model.weight_dtype: must be a string (got 8)"),
    ({"kind": "checkpoint"}, "model.weight_dtype: only a diffusion_model file is loaded with a weight dtype"),
])
def test_unusable_weight_dtype_names_the_field(tmp_path, capsys, change, message):
    model = host.build_tiny_model(SIZES)
    target = write_job(tmp_path / "job", spec(), tiny_set(model), file_ref(tmp_path / "model.safetensors"))
    document = json.loads(target.read_text())
    document["model"].update(change)
    target.write_text(json.dumps(document))
    with pytest.raises(JobFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_job(target)
    assert headless.main(["run", str(tmp_path / "job")]) == headless.EXIT_USAGE
    assert message in capsys.readouterr().err
    with pytest.raises(JobFileError, match="only a diffusion_model file"):
        ModelRef("tiny", SIZES, weight_dtype="fp8_e5m2")


def test_job_weight_dtypes_are_core_load_diffusion_models_choices():
    assert list(WEIGHT_DTYPES) == host.unet_weight_dtypes()


@pytest.mark.parametrize("dtype, folder, expected", [
    (torch.float32, "diffusion_models", "default"),
    (torch.bfloat16, "diffusion_models", "default"),
    (torch.float8_e4m3fn, "diffusion_models", "fp8_e4m3fn"),
    (torch.float8_e5m2, "diffusion_models", "fp8_e5m2"),
    (torch.float8_e4m3fn, "checkpoints", "default"),  # Load Checkpoint has no weight_dtype
])
def test_export_reads_the_weight_dtype_from_the_model(tmp_path, monkeypatch, dtype, folder, expected):
    """The Export node's job says how the connected model holds its weights (a model stored in fp8 is
    computed in float32 on a CPU, as ComfyUI's loader sets it up)."""
    import folder_paths

    from comfyui_lycoris.nodes.export_nodes import ExportLycorisJob

    models = tmp_path / folder
    models.mkdir()
    (models / "base.safetensors").write_bytes(b"")  # the export only references the file
    monkeypatch.setitem(folder_paths.folder_names_and_paths, folder, ([str(models)], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "out"))
    model = host.build_tiny_model(SIZES, dtype, None if dtype in (torch.float32, torch.bfloat16) else torch.float32)
    settings = dict(steps=1, batch_size=1, grad_accumulation=1, learning_rate=1e-3, lr_schedule="constant",
                    warmup_steps=0, optimizer="adamw", seed=0, dtype="float32", gradient_checkpointing=False,
                    save_every=1, keep_last=1, nan_policy="stop", output_name=f"weights_{expected}")
    config = parse_config((CONFIGS / "flux1_lokr.json").read_text())
    out = ExportLycorisJob.execute(model, tiny_set(model), config, **settings, base_model=f"{folder}/base.safetensors",
                                   tiny_seed=0)
    written = json.loads((Path(out.result[0]) / "job.json").read_text())["model"]
    assert written["weight_dtype"] == expected and written["file"] == "base.safetensors", written


# -- the real load, through core's Load Diffusion Model ---------------------------------------------

@pytest.fixture(scope="module")
def smallest_flux1(tmp_path_factory) -> Path:
    """The smallest Flux 1 file 0.3.75's detection loads, stored in fp8 e4m3fn."""
    assert mf.detected_unet_config(SMALLEST_FLUX1)["depth_single_blocks"] == 0
    folder = tmp_path_factory.mktemp("diffusion_models")
    return mf.write_model_file(folder / "flux1_smallest.safetensors", SMALLEST_FLUX1, SEED, torch.float8_e4m3fn)


def expected_weight(key: str, dtype: torch.dtype) -> torch.Tensor:
    """The file's value of `key` (an independent regeneration from its seed), held in `dtype`."""
    stored = mf.tensor_value(key, SMALLEST_FLUX1[key], SEED, torch.float8_e4m3fn)
    return stored.to(torch.float32).to(dtype)


@pytest.mark.parametrize("weight_dtype, linear, compute", [
    ("default", torch.float32, torch.float32),  # on a CPU ComfyUI holds an fp8 file in float32
    ("fp8_e4m3fn_fast", torch.float8_e4m3fn, torch.float32),
])
def test_headless_loader_holds_the_weights_in_the_jobs_dtype(smallest_flux1, tmp_path, weight_dtype, linear, compute):
    """Through core's UNETLoader, this file even when another of the same name is in an earlier
    diffusion_models folder; the folder list is left as it was; the export reads the choice back."""
    import folder_paths

    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / smallest_flux1.name).write_bytes(b"not this one")
    folder_paths.add_model_folder_path("diffusion_models", str(decoy), is_default=True)
    try:
        before = folder_paths.get_folder_paths("diffusion_models")
        patcher = headless.load_model(ModelRef("diffusion_model", path=str(smallest_flux1), weight_dtype=weight_dtype))
        assert folder_paths.get_folder_paths("diffusion_models") == before
    finally:
        folder_paths.folder_names_and_paths["diffusion_models"][0].remove(str(decoy))
    assert host.linear_weight_dtypes(patcher) == [str(linear).removeprefix("torch.")]
    assert host.memory_settings(patcher)["compute_dtype"] == compute
    key = "double_blocks.0.img_attn.qkv.weight"
    assert torch.equal(patcher.model.diffusion_model.get_parameter(key).to(torch.float32),
                       expected_weight(key, linear).to(torch.float32)), "this file's values, in that dtype"
    assert host.model_weight_dtype(patcher) == weight_dtype, "an export of this model records the same choice"
