"""Train LyCORIS options SimpleTuner users look for: init_lora, an EMA of the adapter, ModelSpec metadata.

Real runs of the training loop on a tiny Flux 2 (no server). References are independent: the init
file's own tensors (read back with safetensors), an EMA computed here from per-step checkpoints with
SimpleTuner 4.10.1's own `get_decay` / `should_update_ema` (taken from the installed package's
source by name and executed), and SimpleTuner's own `_build_modelspec_metadata` and the methods it
calls, executed on the settings of an equivalent SimpleTuner run.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from test_simpletuner_conformance import simpletuner_dir

from comfyui_lycoris.core import host
from comfyui_lycoris.core.adapter_file import read_adapter
from comfyui_lycoris.core.config import parse_config
from comfyui_lycoris.core.modelspec import SIMPLETUNER_FAMILIES, modelspec_metadata
from comfyui_lycoris.core.targets import plan_for
from comfyui_lycoris.core.tiny import TinySizes, pattern_latents
from comfyui_lycoris.trainer.checkpoint import list_checkpoints, load_checkpoint
from comfyui_lycoris.trainer.data import from_latent_batch
from comfyui_lycoris.trainer.init_lora import InitLoraError, check_init_file, load_init_lora
from comfyui_lycoris.trainer.jobs import JobCancelled, JobStopped
from comfyui_lycoris.trainer.loop import Folders, run_training
from comfyui_lycoris.trainer.spec import JobSpec, SpecError
from comfyui_lycoris.trainer.trainable import TrainableAdapter, comfy_base_weights

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SIZES = TinySizes(family="flux2", width=64, heads=2, depth=1, single_depth=1, context_dim=32, seed=2)


class Recorder:
    """A Reporter (trainer.loop) that keeps what the loop says and cancels before a given step."""

    def __init__(self, cancel_at: int | None = None):
        self.cancel_at, self.steps, self.messages = cancel_at, 0, []

    def cancelled(self) -> bool:
        return self.cancel_at is not None and self.steps >= self.cancel_at

    def pause_while_busy(self) -> None:
        pass

    def report(self, step: int, loss: float, lr: float) -> None:
        self.steps = step

    def publish(self, adapter, checkpoint) -> None:
        pass

    def say(self, message: str) -> None:
        self.messages.append(message)

    def preview(self, previews, seconds) -> None:
        pass


@pytest.fixture(scope="module")
def setup():
    model = host.build_tiny_model(SIZES)
    data = from_latent_batch({"samples": pattern_latents(128, 4, 4, 2, seed=1)},
                             host.tiny_conditioning(model, "a red square", 4))
    return model, data


def spec(preset: str = "flux2_lokr", **overrides) -> JobSpec:
    return JobSpec(config_json=(CONFIGS / f"{preset}.json").read_text(), **{
        "steps": 4, "learning_rate": 1e-2, "save_every": 1, "keep_last": 100, "seed": 4, "output_name": "t",
        **overrides})


def train(setup, tmp_path: Path, name: str, job: JobSpec, reporter: Recorder | None = None, resume: bool = False,
          init: Path | None = None):
    model, data = setup
    folders = Folders(tmp_path / name / "checkpoints", tmp_path / name / "loras", init)
    return run_training(job, name, model, data, folders, reporter or Recorder(), resume=resume), folders


def file_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


# -- init_lora -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_file(setup, tmp_path_factory):
    """A LyCORIS file this pack trained (3 steps of flux2_lokr): the init file of the tests below."""
    outcome, _ = train(setup, tmp_path_factory.mktemp("source"), "source", spec(steps=3, seed=9))
    return outcome.path


def test_init_lora_is_the_state_at_step_0(setup, tmp_path, trained_file):
    """Cancelled before its first step, a run saves its step-0 adapter: exactly the init file's tensors."""
    job = spec(init_lora="source/t.safetensors")
    with pytest.raises(JobCancelled):
        train(setup, tmp_path, "init", job, Recorder(cancel_at=0), init=trained_file)
    step0 = load_checkpoint(list_checkpoints(tmp_path / "init" / "checkpoints")[0][1])
    assert step0.step == 0
    wanted, _ = file_tensors(trained_file)
    assert set(step0.adapter) == set(wanted)
    assert all(torch.equal(step0.adapter[k], wanted[k]) for k in wanted)
    # Without it the run starts elsewhere (LyCORIS's init: LoKr's w2 at zero), so the check above means something.
    with pytest.raises(JobCancelled):
        train(setup, tmp_path, "fresh", spec(), Recorder(cancel_at=0))
    fresh = load_checkpoint(list_checkpoints(tmp_path / "fresh" / "checkpoints")[0][1]).adapter
    assert any(not torch.equal(fresh[k], wanted[k]) for k in wanted)


def test_init_lora_then_training_goes_on_and_is_recorded(setup, tmp_path, trained_file):
    reporter = Recorder()
    outcome, _ = train(setup, tmp_path, "init", spec(steps=2, init_lora="source/t.safetensors"), reporter,
                       init=trained_file)
    assert any("init_lora: started from source/t.safetensors" in m for m in reporter.messages), reporter.messages
    _, meta = file_tensors(outcome.path)
    assert meta["lycoris_pack.init_lora"] == "source/t.safetensors"
    # Resuming does not take the file again: the checkpoint has the state (the file may be gone meanwhile).
    again = Recorder()
    train(setup, tmp_path, "init", spec(steps=3, init_lora="source/t.safetensors"), again, resume=True, init=None)
    assert not any("init_lora" in m for m in again.messages)


def test_init_lora_that_does_not_fit_the_config_is_refused(setup, tmp_path, trained_file):
    model, _ = setup
    unet_config = host.model_unet_config(model)
    check_init_file(trained_file, plan_for(parse_config((CONFIGS / "flux2_lokr.json").read_text()), unet_config))
    lora = plan_for(parse_config((CONFIGS / "lora.json").read_text()), unet_config)
    with pytest.raises(InitLoraError, match=r"init_lora: t\.safetensors: does not fit the config: lycoris_\w+\.\w+: "):
        check_init_file(trained_file, lora)
    # The same file at run time (a job file edited by hand): the run stops with the same kind of message.
    with pytest.raises(JobStopped, match=r"init_lora: t\.safetensors: does not fit the config: lycoris_"):
        train(setup, tmp_path, "bad", spec("lora", init_lora="source/t.safetensors"), init=trained_file)
    # A tensor of another shape is named with both shapes.
    tensors, meta = file_tensors(trained_file)
    key = sorted(k for k in tensors if k.endswith("lokr_w1"))[0]
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    from safetensors.torch import save_file

    bent = tmp_path / "bent.safetensors"
    save_file(tensors, str(bent), meta)
    with pytest.raises(InitLoraError, match=re.escape(key) + r": shape \[\d+, \d+\] in the file, \[\d+, \d+\] for"):
        check_init_file(bent, plan_for(parse_config((CONFIGS / "flux2_lokr.json").read_text()), unet_config))
    config = parse_config((CONFIGS / "flux2_lokr.json").read_text())
    trainable = TrainableAdapter.from_plan(plan_for(config, unet_config), unet_config,
                                           comfy_base_weights(model.model.diffusion_model), config)
    with pytest.raises(InitLoraError, match=re.escape(key)):
        load_init_lora(bent, trainable)


def test_init_lora_names_only_safetensors_in_the_loras_folder():
    for bad, said in (("x.ckpt", "only .safetensors"), ("../x.safetensors", "'..'"), ("/x.safetensors", "absolute")):
        with pytest.raises(SpecError, match=f"init_lora: .*{re.escape(said)}"):
            spec(init_lora=bad)
    assert spec(init_lora="a/b.safetensors").init_lora == "a/b.safetensors"


# -- EMA -----------------------------------------------------------------------------------------

def simpletuner_ema_functions() -> SimpleNamespace:
    """SimpleTuner 4.10.1's `should_update_ema` and `EMAModel.get_decay`, from its source, executed here."""
    root = simpletuner_dir()
    assert root is not None, "simpletuner 4.10.1 is installed by scripts/setup.sh (pip install --no-deps)"
    tree = ast.parse((root / "helpers/training/ema.py").read_text())
    wanted = {"should_update_ema", "get_decay"}
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {n.name for n in nodes} == wanted
    scope: dict = {"logger": SimpleNamespace(debug=lambda *a: None)}
    for node in nodes:
        exec(compile(ast.Module([node], []), "simpletuner/helpers/training/ema.py", "exec"), scope)
    return SimpleNamespace(**{name: scope[name] for name in wanted})


def reference_ema(initial: dict[str, torch.Tensor], per_step: list[dict[str, torch.Tensor]], decay: float,
                  interval: int) -> dict[str, torch.Tensor]:
    """SimpleTuner's EMA update after each optimizer step (global_step 1, 2, ...), on the given snapshots."""
    st = simpletuner_ema_functions()
    ema = SimpleNamespace(decay=decay, min_decay=0.0, update_after_step=0, warmup_steps=0, use_ema_warmup=False,
                          inv_gamma=1.0, power=2 / 3, optimization_step=0)
    args = SimpleNamespace(ema_update_interval=interval)
    shadow = {k: v.double() for k, v in initial.items()}
    for step, params in enumerate(per_step, start=1):
        if not st.should_update_ema(args, step):
            continue
        d = st.get_decay(ema, step)
        shadow = {k: s - (1 - d) * (s - params[k].double()) for k, s in shadow.items()}
    return shadow


def step0_adapter(setup, job: JobSpec) -> dict[str, torch.Tensor]:
    """The adapter a run starts from (LyCORIS's init with the job's seed), built as the loop builds it."""
    model, _ = setup
    config = parse_config(job.config_json)
    unet_config = host.model_unet_config(model)
    trainable = TrainableAdapter.from_plan(plan_for(config, unet_config), unet_config,
                                           comfy_base_weights(model.model.diffusion_model), config, seed=job.seed)
    return trainable.state_dict()


@pytest.mark.parametrize("interval", [1, 2])
def test_ema_file_is_the_ema_of_the_steps(setup, tmp_path, interval):
    job = spec(steps=5, ema_decay=0.6, ema_update_interval=interval)
    outcome, folders = train(setup, tmp_path, "ema", job)
    snapshots = [load_checkpoint(p).adapter for _, p in list_checkpoints(folders.checkpoints)]
    assert len(snapshots) == 5
    ema_path = folders.adapters / "ema" / "t.safetensors"
    assert outcome.path == folders.adapters / "t.safetensors" and ema_path.is_file()
    got, meta = file_tensors(ema_path)
    trained = {k for k in got if k.rpartition(".")[2] not in ("alpha",)}
    expected = reference_ema({k: step0_adapter(setup, job)[k] for k in trained}, snapshots, 0.6, interval)
    final, final_meta = file_tensors(outcome.path)
    for key in trained:
        assert torch.allclose(got[key].double(), expected[key], atol=1e-6, rtol=1e-5), key
    assert any(not torch.allclose(got[k], final[k]) for k in trained), "the EMA is not the adapter"
    assert all(torch.equal(got[k], final[k]) for k in got if k not in trained)  # alpha is the adapter's
    assert meta["lycoris_pack.ema_decay"] == "0.6" and meta["lycoris_config"] == final_meta["lycoris_config"]
    # core.adapter_file reads the ema/ layout, as Load LyCORIS does.
    assert read_adapter(ema_path).config is not None


def test_ema_resume_equals_an_uninterrupted_run(setup, tmp_path):
    # Cancelled at step 4, an epoch boundary of this 2-item set (the data order restarts its epoch on resume).
    job = spec(steps=7, save_every=3, ema_decay=0.7, ema_update_interval=1)
    whole, whole_folders = train(setup, tmp_path, "whole", job)
    with pytest.raises(JobCancelled):
        train(setup, tmp_path, "parts", job, Recorder(cancel_at=4))
    saved = load_checkpoint(list_checkpoints(tmp_path / "parts" / "checkpoints")[-1][1])
    assert saved.step == 4 and saved.ema, "the cancel checkpoint holds the EMA"
    resumed, parts_folders = train(setup, tmp_path, "parts", job, resume=True)
    ours, _ = file_tensors(parts_folders.adapters / "ema" / "t.safetensors")
    theirs, _ = file_tensors(whole_folders.adapters / "ema" / "t.safetensors")
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    final_whole, final_parts = file_tensors(whole.path)[0], file_tensors(resumed.path)[0]
    assert all(torch.equal(final_whole[k], final_parts[k]) for k in final_whole)
    assert any(not torch.equal(ours[k], final_parts[k]) for k in ours), "the EMA is not the adapter"


def test_ema_settings_are_checked():
    for field, value in (("ema_decay", 1.0), ("ema_decay", -0.1), ("ema_update_interval", 0)):
        with pytest.raises(SpecError, match=field):
            spec(**{field: value})


# -- ModelSpec -----------------------------------------------------------------------------------

def _class_attribute(path: Path, name: str) -> str:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not in {path}")


def simpletuner_modelspec(family: str, title: str, step: int, instance_prompts: list[str]) -> dict[str, str]:
    """SimpleTuner 4.10.1's `_build_modelspec_metadata` (save_hooks.py) with the methods it calls, executed on a
    LyCORIS run of that model family given by path (no flavour), named `title`, with one dataset per prompt.
    `ss_tag_frequency` (counted from caption text, which a job does not hold) is left empty."""
    root = simpletuner_dir()
    assert root is not None, "simpletuner 4.10.1 is installed by scripts/setup.sh (pip install --no-deps)"
    source = root / "helpers/training/save_hooks.py"
    tree = ast.parse(source.read_text())
    methods = {"_build_modelspec_metadata", "_derive_modelspec_architecture", "_derive_modelspec_title",
               "_derive_modelspec_resolution", "_build_trigger_words_metadata", "_collect_trigger_words"}
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in methods]
    assert {n.name for n in nodes} == methods
    st_family = SIMPLETUNER_FAMILIES[family][0]
    model_py = root / f"helpers/models/{st_family}/model.py"
    registered = re.findall(r'ModelRegistry\.register\("([^"]+)"', model_py.read_text())
    assert registered == [st_family], (model_py, registered)
    backends = {f"ds{i}": {"config": {"instance_prompt": p}} for i, p in enumerate(instance_prompts)}
    scope = {"os": os, "json": json, "MODEL_SPEC_VERSION": _class_attribute(source, "MODEL_SPEC_VERSION"),
             "StateTracker": SimpleNamespace(get_global_step=lambda: step, get_data_backends=lambda: backends)}
    for node in nodes:
        exec(compile(ast.Module([node], []), str(source), "exec"), scope)
    hooks = SimpleNamespace(
        args=SimpleNamespace(model_family=st_family, model_flavour=None, model_type="lora", controlnet=False,
                             pretrained_model_name_or_path="/models/base.safetensors", tracker_run_name=title,
                             resolution=None, modelspec_comment=None),
        model=SimpleNamespace(MODEL_DESCRIPTION=_class_attribute(model_py, "MODEL_DESCRIPTION"),
                              NAME=_class_attribute(model_py, "NAME")),
        _build_tag_frequency_from_captions=lambda: {})
    for name in methods:
        setattr(hooks, name, scope[name].__get__(hooks))
    return hooks._build_modelspec_metadata(checkpoint_dir="/out/checkpoint-7")


@pytest.mark.parametrize("family", sorted(SIMPLETUNER_FAMILIES))
def test_modelspec_is_simpletuners(family):
    ours = modelspec_metadata(family, "my_style", 7, "ohwx person")
    assert ours == simpletuner_modelspec(family, "my_style", 7, ["ohwx person"])
    # Several words: SimpleTuner joins its prompts with ", "; blanks and repeats are dropped here.
    assert (modelspec_metadata(family, "s", 1, " ohwx,  blue hat ,ohwx,\n")["trained_words"]
            == simpletuner_modelspec(family, "s", 1, ["ohwx", "blue hat"])["trained_words"])
    assert "trained_words" not in modelspec_metadata(family, "s", 1, " , ")


def test_saved_files_carry_modelspec(setup, tmp_path):
    job = spec(steps=2, output_name="styles/my_style", trigger_words="ohwx, blue hat", ema_decay=0.5)
    outcome, folders = train(setup, tmp_path, "meta", job)
    expected = simpletuner_modelspec("flux2", "my_style", 2, ["ohwx, blue hat"])
    for path in (outcome.path, folders.adapters / "styles" / "ema" / "my_style.safetensors"):
        _, meta = file_tensors(path)
        assert {k: meta.get(k) for k in expected} == expected, path
    for step, path in list_checkpoints(folders.checkpoints):
        meta = load_checkpoint(path).file_metadata
        assert meta == simpletuner_modelspec("flux2", "my_style", step, ["ohwx, blue hat"]), path
