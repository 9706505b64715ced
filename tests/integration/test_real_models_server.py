"""Real-width model files through ComfyUI's own loaders, on the live server (issue 16).

`scripts/model_files.py` writes, once per session, files in the layouts users download, every
layer at its real width but only a few blocks deep, with seeded random weights (bf16):
- Flux 1 (`flux1-dev.safetensors` keys; hidden 3072, 24 heads, T5 4096 / CLIP 768 inputs; 1 double
  + 1 single block: 545 M parameters, 1.1 GB) in models/diffusion_models, for core's **Load
  Diffusion Model** (`UNETLoader`, default and `fp8_e4m3fn`);
- an SDXL-family checkpoint (`model.diffusion_model.*` keys) in models/checkpoints, for core's
  **Load Checkpoint**: the Segmind Vega block layout, the smallest SDXL UNet ComfyUI's detection
  knows (745 M parameters at full SDXL width: 320/640/1280 channels, text 2048); UNet only, so
  the loader gives no CLIP and a placeholder VAE.
- Flux 2 at Klein 4B's width (hidden 3072, 24 heads, Qwen3 text 7680, no guidance embedder; 1 + 1
  blocks: 563 M parameters) in models/diffusion_models. Whether it loads is the installed ComfyUI's
  detection: v0.33 reads the head count from the width and loads it (then it gets every check
  below); 0.3.75 assumes 48 heads for Flux 2 and refuses it, and then the tests check that the
  refusal reaches the user as ComfyUI's own message on the failed prompt, no job is started, and
  the server keeps serving.
On each: Load LyCORIS -> Apply / A/B / Merge, and a short Train LyCORIS job; on Flux 1 also Export
LyCORIS Job from a graph that loads it with `weight_dtype` fp8_e4m3fn and `python -m trainer run` with
the file as `base_model` (the job file records the weight dtype; the run loads the weights in fp8).

Adapter files (those fed in and those the trainer writes) must be what SimpleTuner writes for the
model: the keys and shapes LyCORIS itself creates on the diffusers twin (built on `meta` from the
config ComfyUI detected), with `lycoris_config` in the metadata.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import model_files
import pytest
import torch
from graphs import adapter_chain
from lycoris_reference import lycoris_network
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfyenv import REPO
from comfyserver import PromptError
from comfyui_lycoris.core.config import parse_config
from comfyui_lycoris.core.families import profile_named

pytestmark = pytest.mark.integration

TRAIN_STEPS = 2


@dataclass(frozen=True)
class Real:
    """One generated model file and how a user loads and samples it."""

    name: str  # key of model_files.FILES
    family: str
    folder: str  # under the server's models/
    loader: str  # core node that loads it
    file_input: str  # that node's file input
    latent: str  # core node for an empty latent of this family
    adapter: dict  # LyCORIS config of the adapter file fed to Load LyCORIS
    preset: str  # the pack preset Train LyCORIS uses
    detected: dict  # what ComfyUI's detection must report

    @property
    def file(self) -> str:
        return f"{self.name}.safetensors"


# LoRA on attention: fused q/k/v slices of both Flux block kinds; SDXL self- and cross-attention.
FLUX1 = Real("flux1_real_width_1x1", "flux1", "diffusion_models", "UNETLoader", "unet_name", "EmptySD3LatentImage",
             {"algo": "lora", "multiplier": 1.0, "linear_dim": 8, "linear_alpha": 4,
              "apply_preset": {"target_module": ["FluxAttention"]}},
             "flux1_lokr", {"image_model": "flux", "hidden_size": 3072, "num_heads": 24, "depth": 1,
                            "depth_single_blocks": 1, "context_in_dim": 4096, "vec_in_dim": 768})
FLUX2_KLEIN = Real("flux2_klein_width_1x1", "flux2", "diffusion_models", "UNETLoader", "unet_name",
                   "EmptyFlux2LatentImage",
                   {"algo": "lora", "multiplier": 1.0, "linear_dim": 8, "linear_alpha": 4,
                    "apply_preset": {"target_module": ["Flux2Attention", "Flux2ParallelSelfAttention"]}},
                   "flux2_lokr", {"image_model": "flux2", "hidden_size": 3072, "num_heads": 24, "depth": 1,
                                  "depth_single_blocks": 1, "context_in_dim": 7680, "guidance_embed": False})
SDXL = Real("sdxl_segmind_vega", "sdxl", "checkpoints", "CheckpointLoaderSimple", "ckpt_name", "EmptyLatentImage",
            {"algo": "lora", "multiplier": 1.0, "linear_dim": 8, "linear_alpha": 4,
             "apply_preset": {"target_module": ["Attention"]}},
            "sdxl_lokr_attention", {"model_channels": 320, "context_dim": 2048, "adm_in_channels": 2816,
                                    "transformer_depth": [0, 0, 1, 1, 2, 2], "channel_mult": [1, 2, 4]})


def free(server) -> None:
    """POST /free: ComfyUI unloads its models and drops cached node outputs (its worker does it at once)."""
    request = urllib.request.Request(server.url + "/free", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"unload_models": True, "free_memory": True}).encode())
    urllib.request.urlopen(request, timeout=30).read()


@dataclass
class Loaded:
    real: Real
    path: Path
    unet_config: dict  # what ComfyUI's detection gives the file ({} when it refuses it)
    twin: torch.nn.Module | None  # the diffusers model of that config, on meta
    refusal: str = ""  # ComfyUI's own message when this ComfyUI cannot load the file


def _generated(server, real: Real):
    """The file in the server's models folder for one module; then the server's copy freed, the file removed.

    One large model in the server at a time (Flux 1: 2.2 GB, SDXL: 3 GB once loaded in fp32). Detection
    runs here in the test process, on the same ComfyUI as the server; a refusal keeps ComfyUI's message."""
    free(server)
    path = model_files.ensure_file(server.base / "models" / real.folder, real.name)
    try:
        unet_config = model_files.detected_unet_config(model_files.read_shapes(path))
    except ValueError as err:
        assert err.__cause__ is not None, err  # ComfyUI raised: detection or its model class refused the file
        yield Loaded(real, path, {}, None, str(err.__cause__))
    else:
        yield Loaded(real, path, unet_config, profile_named(real.family).build_skeleton(unet_config, device="meta"))
    free(server)
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def flux1(comfy_server):
    yield from _generated(comfy_server, FLUX1)


@pytest.fixture(scope="module")
def sdxl(comfy_server):
    yield from _generated(comfy_server, SDXL)


@pytest.fixture(scope="module")
def flux2_klein(comfy_server):
    yield from _generated(comfy_server, FLUX2_KLEIN)


# -- adapter files as SimpleTuner writes them ------------------------------------------------------

def lycoris_keys(config_source: dict, twin: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the file LyCORIS (called as SimpleTuner calls it) writes for a config on the twin."""
    network = lycoris_network(parse_config(config_source), twin)
    network.apply_to()
    try:
        return {k: tuple(v.shape) for k, v in network.state_dict().items()}
    finally:
        network.restore()


def file_keys(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def write_adapter(server, loaded: Loaded) -> str:
    """A LoRA made and saved by LyCORIS itself on the diffusers twin, random weights (delta ~20% of each weight)."""
    name = f"real_width/{loaded.real.name}_lora.safetensors"
    path = server.base / "models" / "loras" / name
    if path.is_file():
        return name
    network = lycoris_network(parse_config(loaded.real.adapter), loaded.twin)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for lora in network.loras:
            for pname, p in lora.named_parameters():
                if not pname.startswith("org_"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    network.apply_to()
    path.parent.mkdir(parents=True, exist_ok=True)
    network.save_weights(str(path), torch.float32, {"lycoris_config": json.dumps(loaded.real.adapter)})
    network.restore()
    assert file_keys(path) == lycoris_keys(loaded.real.adapter, loaded.twin)
    return name


def preset_source(real: Real) -> dict:
    return json.loads((REPO / "configs" / f"{real.preset}.json").read_text())


def assert_simpletuner_file(path, loaded: Loaded) -> None:
    """A trained file: LyCORIS's keys and shapes for the preset on this model, its config in the metadata."""
    expected = lycoris_keys(preset_source(loaded.real), loaded.twin)
    assert file_keys(path) == expected, "the trained file has LyCORIS's keys and shapes for this model"
    with safe_open(str(path), framework="pt") as fh:
        config = json.loads(fh.metadata()["lycoris_config"])
    assert config["algo"] == "lokr" and config["apply_preset"] == preset_source(loaded.real)["apply_preset"]
    assert all(torch.isfinite(t).all() for t in load_file(str(path)).values())


# -- graphs ----------------------------------------------------------------------------------------

def model_nodes(real: Real, weight_dtype: str = "default") -> dict:
    inputs = {real.file_input: real.file}
    if real.loader == "UNETLoader":
        inputs["weight_dtype"] = weight_dtype
    return {
        "loader": {"class_type": real.loader, "inputs": inputs},
        "pos": {"class_type": "LycorisTinyTextEncode", "inputs": {"model": ["loader", 0], "text": "a cat", "tokens": 4}},
        "neg": {"class_type": "LycorisTinyTextEncode", "inputs": {"model": ["loader", 0], "text": "", "tokens": 4}},
    }


def sample_graph(real: Real, adapter_name: str | None = None, strength: float = 1.0, *, ab: str | None = None,
                 merge: bool = False, prefix: str = "rw", steps: int = 2, weight_dtype: str = "default") -> dict:
    """Loader -> [Load LyCORIS -> Apply / A/B / Merge] -> KSampler (cfg 1, a 16x16 latent) -> Save Latent."""
    g = model_nodes(real, weight_dtype)
    g["latent"] = {"class_type": real.latent, "inputs": {"width": 128, "height": 128, "batch_size": 1}}
    model, latent = ["loader", 0], ["latent", 0]
    model, latent = adapter_chain(g, model, latent, adapter_name, strength, ab=ab, merge=merge)
    g["sample"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": latent, "seed": 7,
        "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    g["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0],
                                                        "filename_prefix": f"{real.name}/{prefix}"}}
    return g


def run_latent(server, prompt, outputs: dict | None = None) -> torch.Tensor:
    """The sampled latent; the prompt's outputs go into `outputs` when given."""
    result = server.run(prompt)
    if outputs is not None:
        outputs.update(result)
    item = result["save"]["latents"][0]
    return load_file(str(server.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def check_report(outputs: dict, server, adapter: str) -> None:
    """Load LyCORIS matched every module of the file."""
    modules = len({k.split(".")[0] for k in file_keys(server.base / "models" / "loras" / adapter)})
    report = outputs["load"]["text"][0]
    assert f"{modules} of {modules} modules matched" in report and "not in this model" not in report, report


def train_inputs(output_name: str) -> dict:
    return {"model": ["loader", 0], "dataset": ["data", 0], "config": ["config", 0], "steps": TRAIN_STEPS,
            "batch_size": 1, "grad_accumulation": 1, "learning_rate": 1e-4, "lr_schedule": "constant",
            "warmup_steps": 0, "optimizer": "adamw", "seed": 0, "dtype": "float32", "gradient_checkpointing": True,
            "save_every": TRAIN_STEPS, "keep_last": 1, "nan_policy": "stop", "output_name": output_name}


def train_graph(real: Real, node: dict, weight_dtype: str = "default") -> dict:
    """Loader -> Tiny Training Latents (one 128x128 item) + Tiny Text Encode -> dataset, preset -> `node`."""
    g = model_nodes(real, weight_dtype)
    g.update({
        "latents": {"class_type": "LycorisTinyLatents", "inputs": {"model": ["loader", 0], "width": 128,
                                                                    "height": 128, "count": 1, "seed": 1}},
        "data": {"class_type": "LycorisLatentDataset", "inputs": {"latents": ["latents", 0], "conditioning": ["pos", 0],
                                                                   "repeats": 1, "caption_dropout": 0.0}},
        "config": {"class_type": "LycorisConfig", "inputs": {"preset": real.preset, "config_json": ""}},
        "node": node,
    })
    return g


# -- the checks, per file --------------------------------------------------------------------------

def detected(loaded: Loaded) -> None:
    assert {k: loaded.unet_config.get(k) for k in loaded.real.detected} == loaded.real.detected
    assert profile_named(loaded.real.family).matches(loaded.unet_config)


def load_apply_ab_merge(server, loaded: Loaded) -> None:
    """Every LyCORIS node on the loaded file (fp32 on a CPU), 2 sampler steps per run."""
    real, adapter, outputs = loaded.real, write_adapter(server, loaded), {}
    zero = run_latent(server, sample_graph(real, adapter, 0.0, prefix="s0"), outputs)
    check_report(outputs, server, adapter)
    base = run_latent(server, sample_graph(real, prefix="base"))
    assert torch.isfinite(base).all()
    assert torch.equal(zero, base), "strength 0 is exactly the base model"
    applied = run_latent(server, sample_graph(real, adapter, 0.8, prefix="s08"))
    effect = rel(applied, base)  # random weights: SDXL's output is mostly the noise it removes, Flux's less so
    both = run_latent(server, sample_graph(real, adapter, ab="0, 0.8", prefix="ab"))
    merged = run_latent(server, sample_graph(real, adapter, 0.8, merge=True, prefix="merge"))
    print(f"{real.name}: adapter effect {effect:.2e}, A/B {rel(both[0], base[0]):.2e} / {rel(both[1], applied[0]):.2e}, "
          f"merge vs apply {rel(merged, applied):.2e}")
    assert effect > 1e-4, "the adapter changes the result"
    assert both.shape[0] == 2
    assert rel(both[0], base[0]) < 0.01 * effect and rel(both[1], applied[0]) < 0.01 * effect, "A/B == separate runs"
    assert rel(merged, applied) < 0.05 * effect, f"merge {rel(merged, applied):.2e} from apply, effect {effect:.2e}"
    after = run_latent(server, sample_graph(real, prefix="base2"))
    assert torch.equal(after, base), "unpatching restored the base"


def train_job(server, loaded: Loaded) -> None:
    """A 2-step Train LyCORIS job with the family's preset on the loaded file; its file is SimpleTuner's."""
    output = f"real_width/{loaded.real.name}_trained"
    outputs = server.run(train_graph(loaded.real, {"class_type": "LycorisTrain",
                                                   "inputs": {**train_inputs(output), "resume": False}}))
    job_id = outputs["node"]["job_id"][0]
    deadline = time.monotonic() + 600
    while (job := server.get(f"/lycoris/jobs/{job_id}"))["state"] in ("queued", "running", "waiting"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job["state"] == "done", job["message"]
    assert job["step"] == TRAIN_STEPS and all(loss is not None for _, loss in job["losses"])
    written = sorted((server.base / "models" / "loras").glob(f"{output}*.safetensors"))
    assert len(written) == 1, written
    assert_simpletuner_file(written[0], loaded)


# -- Flux 1 at real width (Load Diffusion Model) ------------------------------------------------------

def test_flux1_detected(flux1):
    detected(flux1)


def test_flux1_load_apply_ab_merge(comfy_server, flux1):
    load_apply_ab_merge(comfy_server, flux1)


def test_flux1_fp8_weights(comfy_server, flux1):
    """Load Diffusion Model with weight_dtype fp8_e4m3fn (weights stored in fp8, computed in fp32).

    One sampler step per run: on a CPU each forward casts all 545 M fp8 weights (several seconds),
    and core's merge re-rounds every merged weight to fp8 (stochastically; tens of seconds)."""
    real, adapter, outputs = FLUX1, write_adapter(comfy_server, flux1), {}
    graph = functools.partial(sample_graph, real, steps=1, weight_dtype="fp8_e4m3fn")
    both = run_latent(comfy_server, graph(adapter, ab="0, 0.8", prefix="fp8_ab"), outputs)
    check_report(outputs, comfy_server, adapter)
    base = run_latent(comfy_server, graph(prefix="fp8_base"))
    assert torch.isfinite(both).all() and torch.isfinite(base).all()
    assert rel(both[0], base[0]) < 1e-4, "strength 0 in the A/B batch is the fp8 base model"
    assert rel(both[1], base[0]) > 1e-2, "the adapter changes the fp8 model's result"
    merged = run_latent(comfy_server, graph(adapter, 0.8, merge=True, prefix="fp8_merge"))
    # The merged weight is rounded to fp8 again (noise on every adapted weight); the bypass adds the
    # exact delta to the fp8 layer's output. The merge must land near the bypass, far from the base.
    assert rel(merged[0], both[1]) < 0.5 * rel(base[0], both[1]), (
        f"merge {rel(merged[0], both[1]):.2e} from apply, base {rel(base[0], both[1]):.2e} from apply")


def test_flux1_train_job(comfy_server, flux1):
    train_job(comfy_server, flux1)


def test_flux1_export_and_headless_run(comfy_server, flux1, tmp_path):
    """Export from a graph that loads the file with weight_dtype fp8_e4m3fn: the job file says so, and
    the headless run loads it so through core's Load Diffusion Model (it reports the dtype its linear
    layers hold; a default load on a CPU holds float32) and trains in it."""
    node = {"class_type": "LycorisExportJob", "inputs": {**train_inputs("real_width/exported"),
                                                          "base_model": f"diffusion_models/{FLUX1.file}", "tiny_seed": 0}}
    folder = Path(comfy_server.run(train_graph(FLUX1, node, "fp8_e4m3fn"))["node"]["text"][0].splitlines()[0]
                  .removeprefix("job written to "))
    job = json.loads((folder / "job.json").read_text())
    assert job["model"]["kind"] == "diffusion_model" and job["model"]["file"] == FLUX1.file
    assert job["model"]["weight_dtype"] == "fp8_e4m3fn", job["model"]
    free(comfy_server)  # one copy at a time
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, "-m", "trainer", "run", str(folder), "--loras", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(weight_dtype fp8_e4m3fn)" in done.stdout, done.stdout[-2000:]
    assert "base model loaded: linear weights float8_e4m3fn, computed in float32" in done.stdout, done.stdout[-2000:]
    written = sorted(tmp_path.rglob("*.safetensors"))
    assert len(written) == 1, (written, done.stdout[-2000:])
    assert_simpletuner_file(written[0], flux1)


# -- SDXL at real width (Load Checkpoint) ------------------------------------------------------------

def test_sdxl_detected(sdxl):
    detected(sdxl)


def test_sdxl_load_apply_ab_merge(comfy_server, sdxl):
    load_apply_ab_merge(comfy_server, sdxl)


def test_sdxl_train_job(comfy_server, sdxl):
    train_job(comfy_server, sdxl)


# -- Flux 2 at Klein width (Load Diffusion Model): loaded where detection allows, else a clear refusal -------

def assert_refused(server, loaded: Loaded, graph: dict) -> None:
    """The prompt fails at the loader with ComfyUI's own message; no job starts; the server keeps serving."""
    assert loaded.refusal, "this ComfyUI's detection refused the file, with a message"
    jobs_before = len(server.get("/lycoris/jobs")["jobs"])
    with pytest.raises(PromptError) as failed:
        server.run(graph)
    assert f"node loader ({loaded.real.loader}): " in str(failed.value), str(failed.value)
    assert loaded.refusal in str(failed.value), (loaded.refusal, str(failed.value))
    assert server.proc is not None and server.proc.poll() is None, "the server is still running"
    assert server.get("/queue") == {"queue_running": [], "queue_pending": []}
    assert len(server.get("/lycoris/jobs")["jobs"]) == jobs_before, "no training job was started"
    after = server.run({"c": {"class_type": "LycorisConfig", "inputs": {"preset": loaded.real.preset,
                                                                         "config_json": ""}},
                        "p": {"class_type": "PreviewAny", "inputs": {"source": ["c", 0]}}})
    assert after, "the next prompt runs"


def test_flux2_klein_detected(comfy_server, flux2_klein):
    if flux2_klein.refusal:  # 0.3.75: 48 heads assumed, so 3072 wide is a 64-wide head its rotary axes do not fit
        import comfy.model_detection

        layout = model_files.read_shapes(flux2_klein.path)
        guessed = comfy.model_detection.model_config_from_unet(model_files.meta_state_dict(layout), "").unet_config
        assert guessed["num_heads"] != FLUX2_KLEIN.detected["num_heads"], guessed
        assert_refused(comfy_server, flux2_klein, sample_graph(FLUX2_KLEIN, prefix="refused"))
    else:
        detected(flux2_klein)


def test_flux2_klein_load_apply_ab_merge(comfy_server, flux2_klein):
    if flux2_klein.refusal:  # a user's Klein adapter in loras; the loader fails before Load LyCORIS runs
        name = "real_width/klein_unused.safetensors"
        (comfy_server.base / "models" / "loras" / name).parent.mkdir(parents=True, exist_ok=True)
        save_file({"lycoris_transformer_blocks_0_attn_to_q.lora_down.weight": torch.zeros(8, 3072)},
                  str(comfy_server.base / "models" / "loras" / name))
        assert_refused(comfy_server, flux2_klein, sample_graph(FLUX2_KLEIN, name, prefix="refused_apply"))
    else:
        load_apply_ab_merge(comfy_server, flux2_klein)


def test_flux2_klein_train_job(comfy_server, flux2_klein):
    if flux2_klein.refusal:
        node = {"class_type": "LycorisTrain", "inputs": {**train_inputs("real_width/klein_refused"), "resume": False}}
        assert_refused(comfy_server, flux2_klein, train_graph(FLUX2_KLEIN, node))
    else:
        train_job(comfy_server, flux2_klein)

