"""Interoperability: adapters written by LyCORIS on diffusers models, applied here on ComfyUI models.

For Flux 2, Flux 1 and SDXL tiny models and each algorithm LyCORIS loads back: LyCORIS itself
creates the adapter (apply_preset + create_lycoris, random non-zero weights, alpha != dim) and
saves it; this pack loads and applies it on the ComfyUI model with converted weights; outputs
must equal diffusers + LyCORIS (its non-bypass rebuild forward) at strengths 0, 0.5, 1 and -1.
Files saved here must load back in LyCORIS with the same outputs; merge must equal bypass.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from lycoris import create_lycoris_from_weights
from lycoris.modules.tlora import clear_timestep_mask, set_timestep_mask
from lycoris_reference import lycoris_network
from model_pairs import make_pair

from comfyui_lycoris.core import api, host
from comfyui_lycoris.core.config import parse_config
from comfyui_lycoris.core.lycoris_modules import skip_lycoris_gc
from comfyui_lycoris.core.tlora import rank_mask

FAMILIES = ("flux2", "flux1", "sdxl")
STRENGTHS = (0.0, 0.5, 1.0, -1.0)
BASE = {"multiplier": 1.0, "linear_dim": 4, "linear_alpha": 3}
ALGOS = {
    "lora": {"algo": "lora"},
    "lora-dora": {"algo": "lora", "dora_wd": True},
    "loha": {"algo": "loha"},
    "lokr-full": {"algo": "lokr", "factor": 4, "full_matrix": True, "linear_dim": 10000, "linear_alpha": 1},
    "lokr-decomposed": {"algo": "lokr", "factor": 4, "linear_dim": 2},
    "full": {"algo": "full"},
    "glora": {"algo": "glora"},
    "diag-oft": {"algo": "diag-oft", "linear_dim": 8},
    "boft": {"algo": "boft", "linear_dim": 32},
    "tlora": {"algo": "tlora", "linear_dim": 8, "linear_alpha": 4, "tlora_min_rank": 2, "tlora_alpha": 1.0},
}
TARGETS = {"flux2": ["Linear"], "flux1": ["Linear"], "sdxl": ["Linear", "Conv2d"]}
CONV_ALGOS = ("lora", "loha", "lokr-full", "lokr-decomposed", "full")



@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    return make_pair(request.param)


def fresh_diffusers(pair) -> torch.nn.Module:
    model = pair.profile.build_skeleton(pair.unet_config, device="cpu")
    model.load_state_dict(pair.diffusers.state_dict())
    return model.eval()


def config_for(pair, name: str):
    targets = TARGETS[pair.family] if name in CONV_ALGOS else ["Linear"]
    return parse_config({**BASE, **ALGOS[name], "apply_preset": {"target_module": targets}})


@torch.no_grad()
def lycoris_file(pair, name: str, path) -> str:
    """An adapter made and saved by LyCORIS itself, every parameter random and non-zero."""
    config = config_for(pair, name)
    network = lycoris_network(config, fresh_diffusers(pair))
    gen = torch.Generator().manual_seed(11)
    for lora in network.loras:
        for pname, p in lora.named_parameters():
            if pname.startswith("org_"):
                continue
            noise = torch.randn(p.shape, generator=gen)
            if pname.endswith("dora_scale"):  # a weight norm: keep LyCORIS's init, perturb it
                p.mul_(1 + 0.1 * noise)
            elif pname.endswith("oft_blocks"):  # rotations: far from identity the model turns chaotic
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise * (0.15 if p.ndim < 2 else 0.15 / p.shape[-1] ** 0.25))
    network.apply_to()  # registers the modules: state_dict() is empty before
    network.save_weights(str(path), torch.float32, {"lycoris_config": config.to_json()})
    return str(path)


@contextlib.contextmanager
def tlora_mask_for(pair, config, sample: int):
    """LyCORIS's global T-LoRA mask for one sample's timestep (its own store holds one mask)."""
    if config.algo != "tlora":
        yield
        return
    t = host.sampling_timesteps(pair.patcher.model.model_sampling, pair.inputs["sigma"])[sample]
    set_timestep_mask(rank_mask(t.view(1), config.linear_dim, config.tlora_min_rank, config.tlora_alpha))
    try:
        yield
    finally:
        clear_timestep_mask()


def reference(pair, path: str, strength: float, config) -> torch.Tensor:
    """diffusers + LyCORIS rebuild forward (not bypass) at `strength`, per sample for T-LoRA masks."""
    model = fresh_diffusers(pair)
    with skip_lycoris_gc():
        network, _ = create_lycoris_from_weights(strength, path, model)
    network.apply_to()
    outs = []
    for i in range(pair.inputs["x"].shape[0]):
        with tlora_mask_for(pair, config, i):
            outs.append(pair.reference_denoised(model)[i])
    return torch.stack(outs)


def close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return float((out - ref).abs().max()) <= 2e-4 * float(ref.abs().max()) + 1e-5


@pytest.mark.parametrize("name", list(ALGOS))
def test_lycoris_file_applies_like_lycoris(pair, name, tmp_path):
    config = config_for(pair, name)
    path = lycoris_file(pair, name, tmp_path / f"{name}.safetensors")
    adapter = api.load_adapter(path, pair.patcher, strict=True)
    base = pair.comfy_denoised()
    # BOFT is a polynomial in strength: outside 0..1 its stages stop being rotations and the tiny
    # SDXL becomes ill-conditioned (our own bypass and merge, which differ only in rounding order,
    # then differ as much as they differ from LyCORIS), so it is compared where it is a rotation.
    for strength in STRENGTHS if name != "boft" else (0.0, 0.5, 1.0):
        out = pair.comfy_denoised(api.apply(pair.patcher, adapter, strength))
        ref = reference(pair, path, strength, config)
        assert close(out, ref), f"{name} at strength {strength}: max diff {float((out - ref).abs().max()):.3g}"
        if strength != 0:
            assert not close(out, base), "the adapter changes the output"
    assert torch.equal(pair.comfy_denoised(), base), "the base model is untouched by its clones"


@pytest.mark.parametrize("name", ["lokr-full", "lora-dora", "tlora"])
def test_per_sample_strengths_in_one_batch(pair, name, tmp_path):
    config = config_for(pair, name)
    path = lycoris_file(pair, name, tmp_path / f"{name}.safetensors")
    adapter = api.load_adapter(path, pair.patcher)
    out = pair.comfy_denoised(api.apply_sweep(pair.patcher, adapter, (0.5, -1.0)))
    assert close(out[0], reference(pair, path, 0.5, config)[0])
    assert close(out[1], reference(pair, path, -1.0, config)[1])


@pytest.mark.parametrize("name", ["lora", "lokr-decomposed", "loha", "tlora", "diag-oft"])
def test_saved_file_loads_in_lycoris(pair, name, tmp_path):
    config = config_for(pair, name)
    path = lycoris_file(pair, name, tmp_path / "source.safetensors")
    adapter = api.load_adapter(path, pair.patcher)
    saved = api.save_adapter(adapter, tmp_path, "roundtrip")
    ours = pair.comfy_denoised(api.apply(pair.patcher, adapter, 0.8))
    assert close(ours, reference(pair, str(saved), 0.8, config))


@pytest.mark.parametrize("name", list(ALGOS))
def test_merge_equals_bypass_and_unpatch_restores(pair, name, tmp_path):
    path = lycoris_file(pair, name, tmp_path / f"{name}.safetensors")
    adapter = api.load_adapter(path, pair.patcher)
    # T-LoRA merges one timestep's mask: take sample 0's, and compare sample 0 only.
    t0 = int(host.sampling_timesteps(pair.patcher.model.model_sampling, pair.inputs["sigma"])[0])
    samples = slice(0, 1) if name == "tlora" else slice(None)
    before = {k: v.clone() for k, v in pair.patcher.model.diffusion_model.state_dict().items()}
    merged, _ = api.merge(pair.patcher, adapter, 0.7, tlora_timestep=t0 if name == "tlora" else None)
    merged.patch_model()
    try:
        merged_out = pair.comfy_denoised(merged)
    finally:
        merged.unpatch_model()
    bypass_out = pair.comfy_denoised(api.apply(pair.patcher, adapter, 0.7))
    assert close(merged_out[samples], bypass_out[samples])
    assert not close(merged_out, pair.comfy_denoised()), "the merge changed the model"
    after = pair.patcher.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "unpatching restores the base bit for bit"
