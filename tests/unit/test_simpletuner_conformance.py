"""SimpleTuner conformance, to the letter: one test per row of issue 17's table, and the files SimpleTuner writes.

The reference is SimpleTuner 4.10.1's own code, run here: the lines that read a LyCORIS config
(casts, required keys, the keys removed before saving), its T-LoRA mask function and its flow
timestep, each taken from the installed package's source by file and line (`pip install --no-deps
simpletuner==4.10.1`; scripts/setup.sh does it) and executed, on top of LyCORIS 4.1.3 itself. Its
package cannot be imported as a whole without its heavy dependencies (accelerate, ...), so files
are loaded by path. Without the package the same lines, quoted below, are executed instead;
`test_quotes_are_simpletuners_own_lines` checks the quotes against the package when it is there.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib.util
import json
import math
import os
import shutil
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lycoris import LycorisNetwork, create_lycoris, create_lycoris_from_weights
from lycoris.modules.tlora import TLoraModule, clear_timestep_mask, compute_timestep_mask, set_timestep_mask
from lycoris_reference import _LOCK
from model_pairs import make_pair
from safetensors.torch import save_file
from test_targets import assert_same_as_lycoris, comfy_unet_config

from comfyui_lycoris.core import api, host
from comfyui_lycoris.core import config as cfgmod
from comfyui_lycoris.core.adapter_file import read_adapter
from comfyui_lycoris.core.config import DEFAULT_TARGET_MODULES, ConfigError, parse_config
from comfyui_lycoris.core.families import profile_named
from comfyui_lycoris.core.lycoris_modules import build_adapter, skip_lycoris_gc
from comfyui_lycoris.core.targets import resolve
from comfyui_lycoris.core.tlora import integer_timestep, module_mask, simpletuner_timestep, timestep_from_sigma_flow

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(p for p in CONFIGS.glob("*.json") if p.name != "schema.json")

# -- SimpleTuner 4.10.1's own lines ---------------------------------------------------------------

# (file inside the simpletuner package, first line, last line): the text, as quoted from 4.10.1.
QUOTES = {
    "casts": ("helpers/training/trainer.py", 3474, 3478, """\
            multiplier = int(self.lycoris_config.get("multiplier", 1))
            linear_dim = int(self.lycoris_config.get("linear_dim", 4))
            linear_alpha = int(self.lycoris_config.get("linear_alpha", 1))
            tlora_min_rank = int(self.lycoris_config.get("tlora_min_rank", 1))
            tlora_alpha = float(self.lycoris_config.get("tlora_alpha", 1.0))
"""),
    "strip": ("helpers/training/trainer.py", 3491, 3494, """\
            keys_to_remove = ["multiplier", "linear_dim", "linear_alpha", "tlora_min_rank", "tlora_alpha"]
            for key in keys_to_remove:
                if key in self.lycoris_config:
                    del self.lycoris_config[key]
"""),
    "tlora_config": ("helpers/training/trainer.py", 3572, 3576, """\
                self._tlora_config = {
                    "max_rank": linear_dim,
                    "min_rank": tlora_min_rank,
                    "alpha": tlora_alpha,
                }
"""),
    "final_save": ("helpers/training/trainer.py", 7832, 7840, """\
                            save_file(
                                final_lycoris_state_dict,
                                os.path.join(self.config.output_dir, LORA_SAFETENSORS_FILENAME),
                                {"lycoris_config": json.dumps(self.lycoris_config)},  # metadata
                            )
                            shutil.copy2(
                                self.config.lycoris_config,
                                os.path.join(self.config.output_dir, "lycoris_config.json"),
                            )
"""),
    "checkpoint_save": ("helpers/training/save_hooks.py", 917, 921, """\
        lycoris_config = None
        with open(self.args.lycoris_config, "r") as f:
            lycoris_config = json.load(f)

        base_metadata = {"lycoris_config": json.dumps(lycoris_config)}
"""),
    "checkpoint_sidecar": ("helpers/training/save_hooks.py", 945, 945, """\
        shutil.copy2(self.args.lycoris_config, os.path.join(output_dir, "lycoris_config.json"))
"""),
    "required": ("helpers/configuration/cmd_args.py", 1206, 1213, """\
        assert lycoris_config is not None, "lycoris_config could not be parsed as JSON"
        assert "algo" in lycoris_config, "lycoris_config JSON must contain algo key"
        assert "multiplier" in lycoris_config, "lycoris_config JSON must contain multiplier key"
        if "full_matrix" not in lycoris_config or lycoris_config.get("full_matrix") is not True:
            assert (
                "linear_dim" in lycoris_config
            ), "lycoris_config JSON must contain linear_dim key if full_matrix is not set."
        assert "linear_alpha" in lycoris_config, "lycoris_config JSON must contain linear_alpha key"
"""),
    "flow_timesteps": ("helpers/models/common.py", 5049, 5049, """\
        timesteps = sigmas * 1000.0
"""),
    "mask": ("helpers/training/lycoris.py", 29, 31, """\
    masks = torch.stack(
        [compute_timestep_mask(int(t), max_timestep, max_rank, min_rank, alpha).squeeze(0) for t in timesteps.tolist()]
    )  # (batch, max_rank)
"""),
    "validation_mask": ("helpers/models/flux2/pipeline.py", 1500, 1506, """\
                    apply_tlora_inference_mask(
                        timestep=int(t),
                        max_timestep=self.scheduler.config.num_train_timesteps,
                        max_rank=_tlora_cfg["max_rank"],
                        min_rank=_tlora_cfg["min_rank"],
                        alpha=_tlora_cfg["alpha"],
                    )
"""),
}


def simpletuner_dir() -> Path | None:
    """The installed simpletuner package folder, found without importing it (its __init__ needs accelerate)."""
    spec = importlib.util.find_spec("simpletuner")
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def source(name: str) -> str:
    """SimpleTuner's lines for `name`, from the installed package when there (else the quote), dedented."""
    rel, first, last, quoted = QUOTES[name]
    root = simpletuner_dir()
    text = quoted
    if root is not None:
        text = "".join((root / rel).read_text().splitlines(keepends=True)[first - 1:last])
    return textwrap.dedent(text)


def run(name: str, **scope) -> dict:
    exec(compile(source(name), f"simpletuner:{QUOTES[name][0]}", "exec"), scope)
    return scope


def simpletuner_mask_function():
    """`apply_tlora_timestep_mask` of helpers/training/lycoris.py, loaded by path (it imports torch and LyCORIS
    only); without the package, the same function rebuilt around the quoted lines."""
    root = simpletuner_dir()
    if root is not None:
        spec = importlib.util.spec_from_file_location("simpletuner_lycoris", root / "helpers/training/lycoris.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.apply_tlora_timestep_mask

    def apply_tlora_timestep_mask(timesteps, max_timestep, max_rank, min_rank=1, alpha=1.0):
        scope = run("mask", torch=torch, compute_timestep_mask=compute_timestep_mask, timesteps=timesteps,
                    max_timestep=max_timestep, max_rank=max_rank, min_rank=min_rank, alpha=alpha)
        set_timestep_mask(scope["masks"])
    return apply_tlora_timestep_mask


def simpletuner_reads(raw: dict) -> dict:
    """SimpleTuner's config check and casts: {'error': ...} or the five values it reads."""
    try:
        run("required", lycoris_config=raw)
        return {k: v for k, v in run("casts", self=SimpleNamespace(lycoris_config=raw)).items()
                if k in cfgmod.SIMPLETUNER_CASTS}
    except (AssertionError, TypeError, ValueError) as err:
        return {"error": str(err) or type(err).__name__}


@contextlib.contextmanager
def fresh_lycoris_state():
    """LycorisNetwork's class state as in a fresh SimpleTuner process, restored afterwards."""
    names = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX", "MODULE_ALGO_MAP",
             "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    fresh = (True, list(DEFAULT_TARGET_MODULES), [], "lycoris", {}, {}, False, [])
    with _LOCK, skip_lycoris_gc():
        saved = {n: getattr(LycorisNetwork, n) for n in names}
        for n, v in zip(names, fresh, strict=True):
            setattr(LycorisNetwork, n, copy.deepcopy(v))
        try:
            yield
        finally:
            for n, v in saved.items():
                setattr(LycorisNetwork, n, v)


def simpletuner_network(raw: dict, model: torch.nn.Module) -> LycorisNetwork:
    """What trainer.py builds (lines 3474-3561): casts, apply_preset, keys removed, create_lycoris(**rest)."""
    owner = SimpleNamespace(lycoris_config=copy.deepcopy(raw))
    values = run("casts", self=owner)
    apply_preset = owner.lycoris_config.get("apply_preset", None)
    with fresh_lycoris_state():
        if apply_preset is not None and apply_preset != {}:
            LycorisNetwork.apply_preset(apply_preset)
        run("strip", self=owner)
        return create_lycoris(model, values["multiplier"], values["linear_dim"], values["linear_alpha"],
                              **owner.lycoris_config)


def plan_and_simpletuner(raw: dict, family: str = "flux2"):
    profile = profile_named(family)
    ucfg = comfy_unet_config(family)
    plan = resolve(parse_config(raw), profile.build_skeleton(ucfg), profile, ucfg)
    return plan, simpletuner_network(raw, profile.build_skeleton(ucfg, device="cpu"))


def test_quotes_are_simpletuners_own_lines():
    root = simpletuner_dir()
    if root is None:
        pytest.skip("simpletuner 4.10.1 is not installed (scripts/setup.sh installs it with --no-deps)")
    assert importlib.metadata.version("simpletuner") == cfgmod.SIMPLETUNER_VERSION
    for name, (rel, first, last, quoted) in QUOTES.items():
        lines = (root / rel).read_text().splitlines(keepends=True)[first - 1:last]
        assert "".join(lines) == quoted, f"{name}: {rel} lines {first}-{last} changed"


# -- row 1: the final T-LoRA file (metadata without the T-LoRA keys) and its side-car ----------

TLORA = {"algo": "tlora", "multiplier": 1.0, "linear_dim": 16, "linear_alpha": 8, "tlora_min_rank": 4,
         "tlora_alpha": 2, "apply_preset": {"target_module": ["Flux2Attention", "Flux2FeedForward"]}}


@pytest.fixture(scope="module")
def pair():
    made = make_pair("flux2")
    # sample 0 sits where float32 truncation and rounding part ways (900 in SimpleTuner, 901 when rounded)
    inputs = {**made.inputs, "sigma": torch.tensor([0.90099996, 0.6173], dtype=torch.float32)}
    return dataclasses.replace(made, inputs=inputs)


def fresh_diffusers(pair) -> torch.nn.Module:
    model = pair.profile.build_skeleton(pair.unet_config, device="cpu")
    model.load_state_dict(pair.diffusers.state_dict())
    return model.eval()


@torch.no_grad()
def trained_state(pair, raw: dict) -> dict[str, torch.Tensor]:
    """The state dict of a network SimpleTuner built for `raw`, every parameter random (as if trained)."""
    network = simpletuner_network(raw, fresh_diffusers(pair))
    gen = torch.Generator().manual_seed(5)
    for lora in network.loras:
        for pname, p in lora.named_parameters():
            if not pname.startswith("org_"):
                p.copy_(torch.randn(p.shape, generator=gen) * (0.15 if p.ndim < 2 else 0.15 / p.shape[-1] ** 0.25))
    network.apply_to()
    return {k: v.detach().to(torch.float32).contiguous() for k, v in network.state_dict().items()}


def user_config(raw: dict, folder: Path) -> Path:
    """The user's --lycoris_config file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "my_lycoris_config.json"
    path.write_text(json.dumps(raw, indent=2))
    return path


def simpletuner_final_file(pair, raw: dict, folder: Path, sidecar: bool = True,
                           name: str = "pytorch_lora_weights.safetensors") -> Path:
    """A T-LoRA saved by SimpleTuner's own final-save lines (QUOTES strip, final_save). `sidecar` off: only the
    weights were copied (into models/loras, say)."""
    owner = SimpleNamespace(lycoris_config=copy.deepcopy(raw),
                            config=SimpleNamespace(output_dir=str(folder), lycoris_config=str(user_config(raw, folder.parent))))
    run("strip", self=owner)
    folder.mkdir(parents=True, exist_ok=True)
    copy2 = shutil.copy2 if sidecar else (lambda src, dst: None)
    run("final_save", self=owner, save_file=save_file, os=os, json=json, shutil=SimpleNamespace(copy2=copy2),
        LORA_SAFETENSORS_FILENAME=name, final_lycoris_state_dict=trained_state(pair, raw))
    return folder / name


def simpletuner_sample(pair, path: Path, raw: dict) -> torch.Tensor:
    """diffusers + LyCORIS with SimpleTuner's T-LoRA mask per sample: its timestep (`sigmas * 1000.0`,
    float32) and its `apply_tlora_timestep_mask` with the trainer's _tlora_config (max_rank = linear_dim)."""
    scope = run("casts", self=SimpleNamespace(lycoris_config=dict(raw)))
    values = {k: scope[k] for k in cfgmod.SIMPLETUNER_CASTS}
    tlora_config = run("tlora_config", self=SimpleNamespace(), **values)["self"]._tlora_config
    timesteps = run("flow_timesteps", sigmas=pair.inputs["sigma"].clone())["timesteps"]
    apply_mask = simpletuner_mask_function()
    model = fresh_diffusers(pair)
    with skip_lycoris_gc():
        network, _ = create_lycoris_from_weights(1.0, str(path), model)
    network.apply_to()
    outs = []
    for i in range(timesteps.shape[0]):
        apply_mask(timesteps[i:i + 1], 1000, tlora_config["max_rank"], tlora_config["min_rank"],
                   tlora_config["alpha"])
        try:
            outs.append(pair.reference_denoised(model)[i])
        finally:
            clear_timestep_mask()
    return torch.stack(outs)


def close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return float((out - ref).abs().max()) <= 2e-4 * float(ref.abs().max()) + 1e-5


def load_node(pair, path: Path, monkeypatch, min_rank=-1, alpha=-1.0):
    import folder_paths

    from comfyui_lycoris.nodes.adapter_nodes import LoadLycoris

    monkeypatch.setattr(folder_paths, "get_full_path_or_raise", lambda kind, name: str(path.parent / name))
    assert LoadLycoris.validate_inputs(min_rank, alpha) is True
    out = LoadLycoris.execute(pair.patcher, path.name, True, min_rank, alpha)
    return out.result[0], out.ui.as_dict()["text"][0]


def test_row1_final_tlora_file_reads_its_sidecar(pair, tmp_path):
    path = simpletuner_final_file(pair, TLORA, tmp_path / "run")
    meta = json.loads(read_adapter(path).metadata["lycoris_config"])
    assert not set(cfgmod.SIMPLETUNER_STRIPPED) & set(meta), "the file is saved as SimpleTuner saves it"
    adapter = read_adapter(path)
    assert adapter.sidecar == path.parent / "lycoris_config.json" and adapter.config is not None
    settings = adapter.tlora_settings
    assert (settings.min_rank, settings.alpha, settings.linear_dim) == (4, 2.0, 16)
    assert "lycoris_config.json beside the file" in settings.source and adapter.warnings == []
    # renamed beside other adapters in models/loras: `<name>.lycoris_config.json` is found first
    other = simpletuner_final_file(pair, {**TLORA, "tlora_min_rank": 2}, tmp_path / "loras", sidecar=False,
                                   name="mine.safetensors")
    (tmp_path / "loras" / "mine.lycoris_config.json").write_text(json.dumps({**TLORA, "tlora_min_rank": 2}))
    (tmp_path / "loras" / "lycoris_config.json").write_text(json.dumps({**TLORA, "algo": "lokr"}))
    assert read_adapter(other).tlora_settings.min_rank == 2
    # a lycoris_config.json for another algorithm belongs to another adapter: not used, and said
    (tmp_path / "loras" / "mine.lycoris_config.json").unlink()
    lone = read_adapter(other)
    assert lone.sidecar is None and not lone.tlora_settings.known
    assert any("for algo 'lokr'" in w for w in lone.warnings)


def test_row1_final_tlora_file_samples_with_its_schedule(pair, tmp_path, monkeypatch):
    """min rank 4 / alpha 2 from the side-car: the same output as SimpleTuner's mask on LyCORIS."""
    path = simpletuner_final_file(pair, TLORA, tmp_path / "run")
    adapter, text = load_node(pair, path, monkeypatch)
    assert (adapter.tlora.min_rank, adapter.tlora.alpha) == (4, 2.0)
    assert "T-LoRA: min rank 4, alpha 2 (lycoris_config.json beside the file)" in text
    ref = simpletuner_sample(pair, path, TLORA)
    out = pair.comfy_denoised(api.apply(pair.patcher, adapter, 1.0))
    assert close(out, ref), f"max diff {float((out - ref).abs().max()):.3g}"
    # the defaults the pack fell back to before give another output: the test can tell them apart
    wrong = simpletuner_sample(pair, path, {**TLORA, "tlora_min_rank": 1, "tlora_alpha": 1.0})
    assert not close(out, wrong)


def test_row1_without_sidecar_the_schedule_is_unknown_and_can_be_given(pair, tmp_path, monkeypatch):
    path = simpletuner_final_file(pair, TLORA, tmp_path / "run", sidecar=False)
    adapter, text = load_node(pair, path, monkeypatch)
    assert "T-LoRA schedule unknown" in text and "tlora_min_rank / tlora_alpha" in text
    assert any(w.startswith("T-LoRA schedule unknown") for w in adapter.warnings)
    assert (adapter.tlora.min_rank, adapter.tlora.alpha) == (1, 1.0)  # SimpleTuner's defaults, said aloud
    given, text = load_node(pair, path, monkeypatch, min_rank=4, alpha=2.0)
    assert "T-LoRA: min rank 4, alpha 2 (tlora_min_rank and tlora_alpha given on the node)" in text
    out = pair.comfy_denoised(api.apply(pair.patcher, given, 1.0))
    assert close(out, simpletuner_sample(pair, path, TLORA))
    from comfyui_lycoris.nodes.adapter_nodes import LoadLycoris

    assert isinstance(LoadLycoris.validate_inputs(-1, -0.5), str) and isinstance(LoadLycoris.validate_inputs(-2, -1), str)
    # a copy saved from the unknown load does not record a guessed schedule
    saved = read_adapter(api.save_adapter(adapter, tmp_path / "out", "copy"))
    assert not saved.tlora_settings.known
    resaved = read_adapter(api.save_adapter(given, tmp_path / "out", "given"))
    assert (resaved.tlora_settings.min_rank, resaved.tlora_settings.alpha) == (4, 2.0)


def test_row1_mid_training_checkpoint_and_ema_file(pair, tmp_path):
    """Checkpoints keep the whole config (save_hooks.py) with the side-car; EMA weights sit in ema/."""
    raw = {**TLORA, "linear_dim": "16"}  # as the user wrote it: SimpleTuner saves the file's JSON as it is
    raw.pop("tlora_alpha")  # left out: SimpleTuner's default 1.0 applies
    folder = tmp_path / "output" / "checkpoint-500"
    (folder / "ema").mkdir(parents=True)
    owner = SimpleNamespace(args=SimpleNamespace(lycoris_config=str(user_config(raw, tmp_path))))
    metadata = run("checkpoint_save", self=owner, json=json)["base_metadata"]
    tensors = trained_state(pair, raw)
    path = folder / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path), {**metadata, "modelspec.title": "x"})  # save_hooks adds ModelSpec keys
    save_file(tensors, str(folder / "ema" / "ema_model.safetensors"), dict(metadata))
    run("checkpoint_sidecar", self=owner, shutil=shutil, os=os, output_dir=str(folder))
    for file in (path, folder / "ema" / "ema_model.safetensors"):
        adapter = read_adapter(file)
        assert adapter.config is not None and adapter.config.linear_dim == 16
        assert (adapter.tlora_settings.min_rank, adapter.tlora_settings.alpha) == (4, 1.0)
        assert "SimpleTuner's defaults" in adapter.tlora_settings.source
    assert read_adapter(folder / "ema" / "ema_model.safetensors").sidecar == folder / "lycoris_config.json"


# -- row 2: one mask of width linear_dim, cut or padded per module ----------------------------

@functools.cache
def _probe(module_rank: int) -> TLoraModule:
    with skip_lycoris_gc():  # its init runs an SVD (~0.5 s): one module per rank
        return TLoraModule("probe", torch.nn.Linear(128, 128, bias=False), lora_dim=module_rank, use_data_init=False)


def lycoris_module_mask(t: int, module_rank: int, linear_dim: int, min_rank: int, alpha: float) -> torch.Tensor:
    """LyCORIS's own: SimpleTuner's mask (max_rank = linear_dim) through TLoraModule._get_mask."""
    module = _probe(module_rank)
    set_timestep_mask(compute_timestep_mask(t, 1000, linear_dim, min_rank, alpha))
    try:
        return module._get_mask(torch.device("cpu"))
    finally:
        clear_timestep_mask()


@pytest.mark.parametrize("min_rank, alpha", [(1, 1.0), (4, 2.0), (1, 0.5), (70, 1.0)])
def test_row2_module_mask_is_lycoris_own(min_rank, alpha):
    timesteps = list(range(0, 1001, 7)) + [600, 999, 1000]
    for module_rank in (8, 32, 64, 128):
        ours = module_mask(torch.tensor(timesteps), module_rank, 64, min_rank, alpha)
        theirs = torch.cat([lycoris_module_mask(t, module_rank, 64, min_rank, alpha) for t in timesteps])
        assert torch.equal(ours, theirs), f"module rank {module_rank}"


def test_row2_the_issue_numbers():
    """At t=600, linear_dim 64: a dim-32 module has 26 ranks on, a dim-128 module 90 (its own schedule: 13, 51)."""
    assert module_mask([600], 32, 64, 1, 1.0).sum().item() == 26
    assert module_mask([600], 128, 64, 1, 1.0).sum().item() == 90
    assert module_mask([600], 32, None, 1, 1.0).sum().item() == 13  # None: the module's own rank
    assert lycoris_module_mask(600, 32, 64, 1, 1.0).sum().item() == 26


MIXED = {**TLORA, "apply_preset": {"target_module": ["Flux2Attention", "Flux2FeedForward",
                                                     "Flux2ParallelSelfAttention"],
                                   "module_algo_map": {"Flux2FeedForward": {"dim": 4},
                                                       "Flux2ParallelSelfAttention": {"dim": 24}}}}


def test_row2_mixed_ranks_sample_like_simpletuner(pair, tmp_path, monkeypatch):
    """Modules of rank 4, 16 and 24 under linear_dim 16: cut and padded as LyCORIS does (needs the runtime to use
    core.tlora.module_mask with the schedule's linear_dim)."""
    path = simpletuner_final_file(pair, MIXED, tmp_path / "run")
    ranks = {m.rank for m in (b.adapter for b in api.load_adapter(path, pair.patcher).bindings.values())}
    assert ranks == {4, 16, 24}
    adapter, _ = load_node(pair, path, monkeypatch)
    out = pair.comfy_denoised(api.apply(pair.patcher, adapter, 1.0))
    ref = simpletuner_sample(pair, path, MIXED)
    assert close(out, ref), f"max diff {float((out - ref).abs().max()):.3g}"


# -- row 3: the flow timestep is float32 `sigmas * 1000.0`, truncated by int() -----------------

def test_row3_flow_timestep_is_simpletuners(pair):
    gen = torch.Generator().manual_seed(0)
    grid = torch.linspace(0, 1, 200_001, dtype=torch.float64).to(torch.float32)
    near = torch.tensor([k / 1000 for k in range(1001)], dtype=torch.float32)
    ulps = torch.cat([torch.nextafter(near, near + 1), torch.nextafter(near, near - 1).clamp(min=0)])
    sigmas = torch.cat([grid, torch.rand(100_000, generator=gen), near, ulps, torch.tensor([0.90099996])])
    theirs = torch.tensor([int(t) for t in run("flow_timesteps", sigmas=sigmas)["timesteps"].tolist()])
    assert torch.equal(simpletuner_timestep(sigmas), theirs)
    assert torch.equal(timestep_from_sigma_flow(sigmas), theirs)  # training (trainer/objectives)
    assert simpletuner_timestep(0.90099996) == 900 and integer_timestep(1000 * 0.9009999632835388) == 900
    # at inference: ComfyUI's Flux 2 model sampling, through the host, gives the same integers
    sampling = pair.patcher.model.model_sampling
    assert torch.equal(host.sampling_timesteps(sampling, sigmas[::50]), theirs[::50])


# -- row 4: every key LyCORIS accepts passes --------------------------------------------------

def test_row4_keys_lycoris_accepts_pass():
    raw = {"algo": "lokr", "multiplier": 1, "linear_dim": 8, "linear_alpha": 4, "factor": 4,
           "train_llm_adapter": False, "warn_on_unmatched": False, "note": "from my SimpleTuner run",
           "apply_preset": {"target_module": ["Flux2Attention"], "unet_target_module": ["Flux2FeedForward"],
                            "module_algo_map": {"Flux2Attention": {"factor": 2, "my_key": 1}}}}
    config = parse_config(raw)
    text = " | ".join(config.warnings)
    assert "config: unknown key 'note' (create_lycoris ignores it)" in text
    assert "apply_preset.unet_target_module: accepted by LyCORIS's apply_preset but never applied" in text
    assert "unknown key 'my_key' (the LyCORIS module ignores it)" in text
    assert config.source["note"] == "from my SimpleTuner run", "kept in the saved config"
    plan, network = plan_and_simpletuner(raw)
    assert_same_as_lycoris(plan, network)
    with pytest.raises(ConfigError, match="LyCORIS's apply_preset refuses it"):
        parse_config({**raw, "apply_preset": {"target_modul": ["Flux2Attention"]}})


# -- row 5: top-level use_scalar reaches every module -----------------------------------------

def test_row5_top_level_use_scalar_reaches_every_module():
    raw = {"algo": "lora", "multiplier": 1, "linear_dim": 4, "linear_alpha": 2, "use_scalar": True,
           "apply_preset": {"target_module": ["Flux2Attention"]}}
    plan, network = plan_and_simpletuner(raw)
    assert_same_as_lycoris(plan, network)
    assert all(isinstance(m.scalar, torch.nn.Parameter) for m in network.loras)
    assert all(t.module_kwargs["use_scalar"] is True for t in plan.targets)
    built = build_adapter(plan.targets[0], torch.nn.Linear(plan.targets[0].weight_shape[1],
                                                           plan.targets[0].weight_shape[0], bias=False))
    assert isinstance(built.scalar, torch.nn.Parameter), "the pack builds the module LyCORIS builds"
    assert not any(w.startswith("use_scalar") for w in parse_config(raw).warnings), "trained as LyCORIS does"


# -- row 6: `preset` naming a preset file -----------------------------------------------------

def test_row6_preset_file(tmp_path, monkeypatch):
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "attn_ff.toml").write_text('target_module = ["Flux2FeedForward"]\nenable_conv = false\n'
                                         '[module_algo_map.Flux2FeedForward]\nfactor = 2\n')
    monkeypatch.setattr(cfgmod, "EXTRA_PRESET_FOLDERS", [folder])
    raw = {"algo": "lokr", "multiplier": 1, "linear_dim": 8, "linear_alpha": 4, "factor": 4,
           "preset": "attn_ff.toml", "apply_preset": {"target_module": ["Flux2Attention"]}}
    config = parse_config(raw)
    assert config.preset.target_module == ("Flux2FeedForward",) and config.enable_conv is False
    assert any("attn_ff.toml replaces apply_preset's target_module" in w for w in config.warnings)
    # LyCORIS reads the file itself (create_lycoris: read_preset) after SimpleTuner's apply_preset
    plan, network = plan_and_simpletuner({**raw, "preset": str(folder / "attn_ff.toml")})
    assert_same_as_lycoris(plan, network)
    assert {t.owner_class for t in plan.targets} == {"Flux2FeedForward"}
    assert parse_config({**raw, "preset": "attn-only"}).enable_conv is False  # built-in names as before
    outside = tmp_path / "elsewhere.toml"
    outside.write_text('target_module = ["Flux2FeedForward"]\n')
    for name in (str(outside), "../elsewhere.toml"):
        with pytest.raises(ConfigError, match="^preset: "):
            parse_config({**raw, "preset": name})


# -- row 7: numbers are cast as SimpleTuner casts them ----------------------------------------

NUMBER_CASES = [{"linear_dim": "16"}, {"linear_dim": 16.7}, {"linear_alpha": 0.5}, {"linear_alpha": "8"},
                {"multiplier": 1.9}, {"multiplier": "1"}, {"tlora_min_rank": "3", "algo": "tlora"},
                {"tlora_alpha": "2", "algo": "tlora"}, {"tlora_alpha": 1.5, "algo": "tlora"}, {"linear_alpha": True}]


@pytest.mark.parametrize("change", NUMBER_CASES, ids=lambda c: json.dumps(c))
def test_row7_numbers_read_as_simpletuner_reads_them(change):
    raw = {"algo": "lora", "multiplier": 1, "linear_dim": 16, "linear_alpha": 8, **change}
    theirs = simpletuner_reads(raw)
    config = parse_config(raw)
    ours = {"multiplier": config.multiplier, "linear_dim": config.linear_dim, "linear_alpha": config.linear_alpha,
            "tlora_min_rank": config.tlora_min_rank, "tlora_alpha": config.tlora_alpha}
    assert ours == theirs and all(type(ours[k]) is type(theirs[k]) or k == "multiplier" for k in ours)
    key = next(iter(change))
    if isinstance(change[key], (str, bool)) or change[key] != theirs[key]:
        assert any(w.startswith(f"{key}: ") for w in config.warnings), "a cast that changes the value is said"


def test_row7_linear_alpha_half_trains_at_scale_one_as_in_simpletuner():
    raw = {"algo": "lora", "multiplier": 1, "linear_dim": 4, "linear_alpha": 0.5,
           "apply_preset": {"target_module": ["Flux2Attention"]}}
    config = parse_config(raw)
    assert "linear_alpha: 0.5 becomes 0 in SimpleTuner: LyCORIS then uses alpha = dim (scale 1)" in config.warnings
    plan, network = plan_and_simpletuner(raw)
    assert_same_as_lycoris(plan, network)
    assert all(float(m.scale) == 1.0 for m in network.loras) and all(t.alpha == t.dim for t in plan.targets)


@pytest.mark.parametrize("change", [{"linear_dim": "16.5"}, {"multiplier": 0.5}, {"tlora_min_rank": "x"},
                                    {"linear_alpha": None}])
def test_row7_what_simpletuner_cannot_use_is_refused(change):
    raw = {"algo": "lora", "multiplier": 1, "linear_dim": 16, "linear_alpha": 8, **change}
    with pytest.raises(ConfigError, match=f"^{next(iter(change))}: "):
        parse_config(raw)
    if "multiplier" not in change:
        assert "error" in simpletuner_reads(raw)
    else:  # SimpleTuner trains it at multiplier int(0.5) = 0: the adapter is off while training
        assert simpletuner_reads(raw)["multiplier"] == 0


# -- row 8: the keys SimpleTuner requires -----------------------------------------------------

REQUIRED_CASES = [
    {}, {"algo": None}, {"multiplier": None}, {"linear_alpha": None}, {"linear_dim": None},
    {"linear_dim": None, "full_matrix": True}, {"linear_dim": None, "full_matrix": "true"},
    {"linear_dim": None, "full_matrix": 1}, {"algo": None, "linear_dim": None, "full_matrix": True},
]


@pytest.mark.parametrize("drop", REQUIRED_CASES, ids=lambda c: json.dumps(c))
def test_row8_required_keys_are_simpletuners(drop):
    raw = {"algo": "lokr", "multiplier": 1, "linear_dim": 16, "linear_alpha": 8, "factor": 4}
    raw = {**{k: v for k, v in raw.items() if k not in drop}, **{k: v for k, v in drop.items() if v is not None}}
    theirs = simpletuner_reads(raw)
    try:
        ours = parse_config(raw)
    except ConfigError as err:
        assert "error" in theirs, f"SimpleTuner accepts it, the pack says {err}"
        assert str(err).split(":")[0] in theirs["error"]
    else:
        assert "error" not in theirs, f"SimpleTuner refuses it: {theirs['error']}"
        assert ours.linear_dim == theirs["linear_dim"]


# -- what the pack writes validates in SimpleTuner's rules ------------------------------------

OVERRIDES = [None, {"linear_dim": 32}, {"factor": 8}, {"linear_alpha": 2, "multiplier": 1},
             {"tlora_min_rank": 2, "tlora_alpha": 1.5}]


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_presets_and_node_configs_pass_simpletuners_rules(path):
    for overrides in OVERRIDES:
        if overrides and "tlora_min_rank" in overrides and "tlora" not in path.stem:
            continue
        config = parse_config(path.read_text(), overrides)
        written = json.loads(config.to_json())  # what Config's json output and saved files carry
        theirs = simpletuner_reads(written)
        assert "error" not in theirs, theirs
        assert theirs["linear_dim"] == config.linear_dim and theirs["linear_alpha"] == config.linear_alpha
        assert theirs["multiplier"] == config.multiplier
        if config.algo == "tlora":
            assert (theirs["tlora_min_rank"], theirs["tlora_alpha"]) == (config.tlora_min_rank, config.tlora_alpha)
        assert parse_config(written).source == config.source, "reading it back changes nothing"


def test_simpletuners_own_default_configs():
    """lycoris_defaults.py (the WebUI's templates): what SimpleTuner itself accepts parses here, what it refuses
    is refused here too."""
    root = simpletuner_dir()
    if root is None:
        pytest.skip("simpletuner 4.10.1 is not installed (scripts/setup.sh installs it with --no-deps)")
    spec = importlib.util.spec_from_file_location("simpletuner_lycoris_defaults", root / "lycoris_defaults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accepted = []
    for name, raw in module.lycoris_defaults.items():
        theirs = simpletuner_reads(copy.deepcopy(raw))
        if "error" in theirs:
            with pytest.raises(ConfigError):
                parse_config(raw)
            continue
        config = parse_config(raw)
        assert (config.linear_dim, config.linear_alpha) == (theirs["linear_dim"], theirs["linear_alpha"])
        accepted.append(name)
    assert accepted == ["lora", "loha", "lokr", "full", "dylora", "tlora"]


def test_module_mask_parameters_are_checked():
    for args, field in [((0, 8, 1, 1.0), "module_rank"), ((8, 0, 1, 1.0), None), ((8, 8, -1, 1.0), "min_rank"),
                        ((8, 8, 1, math.nan), "alpha")]:
        if field is None:  # linear_dim 0 / None: the module's own rank
            assert module_mask([0], *args).shape == (1, 8)
            continue
        with pytest.raises(ValueError, match=field):
            module_mask([0], *args)
