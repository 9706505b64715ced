"""core.memory_estimate: exact parameter counts, a saved-tensor ledger that matches the real blocks,
and a peak within 15% of the trainer's measured step on the tiny models (CPU, float32)."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_lycoris.core import host
from comfyui_lycoris.core import memory_estimate as me
from comfyui_lycoris.core.tiny import TinySizes

TOLERANCE = 0.15
PRESETS = {"flux2": "flux2_lokr", "flux1": "flux1_lokr", "sdxl": "sdxl_lokr_attention"}
# Latent cells (height, width): Flux 2 16x16 = 256 image tokens, Flux 1 32x32 = 256 (2x2 patches), SDXL 16x16.
LATENTS = {"flux2": (16, 16), "flux1": (32, 32), "sdxl": (16, 16)}
SIZES = {
    "flux2": TinySizes(family="flux2"),
    "flux1": TinySizes(family="flux1"),
    "sdxl": TinySizes(family="sdxl", width=32),
}


def _model(family: str):
    return host.build_tiny_model(SIZES[family])


# -- parameters and resident terms ----------------------------------------------------------------

@pytest.mark.parametrize("family", list(SIZES))
def test_parameter_count_is_exact(family):
    patcher = _model(family)
    real = list(patcher.model.diffusion_model.parameters())
    unet_config = host.model_unet_config(patcher)
    assert me.model_parameter_count(unet_config) == sum(p.numel() for p in real)
    plan = me.preset_plan(unet_config, PRESETS[family])
    est = me.estimate_training_memory(unet_config, plan, width=256, height=256, weight_dtype=torch.float32)
    assert est.resident[0].name == "weights"
    assert est.resident[0].bytes == sum(p.numel() * p.element_size() for p in real)


def test_optimizer_state():
    shapes = [(64, 32), (16,)]
    numel = 64 * 32 + 16
    assert me.optimizer_state_bytes("adamw", shapes, 4) == 2 * numel * 4
    assert me.optimizer_state_bytes("adamw", shapes, 2) == 2 * numel * 2  # torch keeps states in the param dtype
    assert me.optimizer_state_bytes("prodigy", shapes, 4) == 4 * numel * 4
    assert me.optimizer_state_bytes("adafactor", shapes, 4) == (64 + 32 + 16) * 4
    big = [(256, 256)]
    assert me.optimizer_state_bytes("adamw8bit", big, 4) == 2 * 65536 + 2 * 4 * 256
    with pytest.raises(ValueError, match="optimizer"):
        me.optimizer_state_bytes("sgd", shapes, 4)


def test_names_and_errors():
    assert me.attention_kind("attention_pytorch") == "sdpa"
    assert me.attention_kind("attention_sub_quad") == "sub_quad"
    assert me.attention_kind("attention_split") == "sub_quad"
    assert me.dtype_bytes("bf16") == 2 and me.dtype_bytes(torch.float8_e4m3fn) == 1
    unet_config, preset = me.REFERENCE_MODELS["Flux 2 Klein 4B"]
    plan = me.preset_plan(unet_config, preset)
    with pytest.raises(ValueError, match="attention"):
        me.estimate_training_memory(unet_config, plan, width=512, height=512, attention="flash9")
    with pytest.raises(ValueError, match="dtype"):
        me.estimate_training_memory(unet_config, plan, width=512, height=512, weight_dtype="int3")


# -- the saved-tensor ledger against the real blocks ------------------------------------------------

def _saved_bytes_per_unit(patcher, step) -> dict[str, int]:
    """Bytes autograd saves per unit in one plain forward, each save counted as the trainer copies it."""
    from comfyui_lycoris.trainer.checkpointing import _private, checkpoint_units
    from comfyui_lycoris.trainer.step import batch_loss

    root = patcher.model.diffusion_model
    names = {id(m): n for n, m in root.named_modules()}
    current = ["stem"]
    handles = []

    def tag(name):
        return lambda module, args: current.__setitem__(0, name)

    for unit in checkpoint_units(root):  # SDXL's units are the layers of a block; the ledger counts per block
        name = names[id(unit)]
        block = ".".join(name.split(".")[:2]) if name.startswith(("input_blocks", "output_blocks")) else \
            name.split(".")[0] if name.startswith("middle_block") else name
        handles.append(unit.register_forward_pre_hook(tag(block)))
    for head in ("final_layer", "out"):
        if hasattr(root, head):
            handles.append(getattr(root, head).register_forward_pre_hook(tag("head")))
    saved: dict[str, int] = {}

    def pack(t):
        if _private(t) is not t:  # what the trainer copies
            saved[current[0]] = saved.get(current[0], 0) + t.numel() * t.element_size()
        return t

    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            batch_loss(step.predict, step.objective, step.batch, torch.Generator().manual_seed(0))
    finally:
        for handle in handles:
            handle.remove()
    return saved


@pytest.mark.parametrize("family", list(SIZES))
def test_ledger_matches_saved_tensors(family):
    """Per unit, what the ledger says autograd saves (each save copied) is what the real blocks save."""
    from comfyui_lycoris.bench.memory_estimate import TrainingStep

    patcher = _model(family)
    step = TrainingStep.build(patcher, PRESETS[family], LATENTS[family])
    traced = _saved_bytes_per_unit(patcher, step)
    z = me._Sizes(1, 4, 4, me.attention_kind(_comfy_attention()), False)
    costs = me._adapter_costs(step.plan)
    tokens = me._tokens(family, step.unet_config, *step.pixels)
    build = me._sdxl_units if family == "sdxl" else me._flux_units
    units, _, _, _ = build(step.unet_config, z, costs, tokens, step.text_tokens)
    compared = 0
    for unit in units:
        led = unit.ledger_no_grad_inputs
        expected, got = led.per_save + led.weights, traced.get(unit.name, 0)
        if got < 64 * 1024 and expected < 64 * 1024:
            continue  # units before the first adapter (SDXL's first blocks) save nothing
        assert abs(expected - got) <= 0.05 * got, f"{unit.name}: ledger {expected} B, traced {got} B"
        compared += 1
    assert compared >= 2


def _comfy_attention() -> str:
    import comfy.ldm.flux.math as flux_math

    return getattr(flux_math.optimized_attention, "__name__", "")


# -- the whole step ---------------------------------------------------------------------------

CASES = [(family, ckpt) for family in SIZES for ckpt in (True, False)]


@pytest.mark.parametrize("family,checkpointing", CASES, ids=[f"{f}-{'ckpt' if c else 'no_ckpt'}" for f, c in CASES])
def test_estimate_within_tolerance_of_measured_step(family, checkpointing):
    """The estimate of one step's peak against the trainer's real step (trainer.loop.training_step)."""
    from comfyui_lycoris.bench.memory_estimate import TrainingStep

    step = TrainingStep.build(_model(family), PRESETS[family], LATENTS[family])
    resident, added = step.measure(checkpointing)
    measured = resident + added
    est = step.estimate(checkpointing)
    error = est.peak_bytes / measured - 1
    assert abs(error) <= TOLERANCE, (f"estimate {est.peak_bytes} B vs measured {measured} B ({error:+.1%})\n"
                                     + est.summary())


# -- the real models: computed from the configs, nothing allocated --------------------------------

def test_reference_models():
    rows = {r["model"]: r for r in me.reference_estimates(1024)}
    assert set(rows) == set(me.REFERENCE_MODELS)
    flux2 = rows["Flux 2 dev"]["on_fp32"]
    assert 32.0e9 < flux2.settings["model_parameters"] < 32.5e9  # Flux 2 dev: 32 B parameters
    assert math.isclose(flux2.resident[0].bytes, flux2.settings["model_parameters"] * 2)
    assert flux2.image_tokens == 4096 and flux2.text_tokens == 512
    assert rows["Flux 1 dev"]["on_fp32"].text_tokens == 256
    for row in rows.values():
        on, off, bf16 = row["on_fp32"], row["off_fp32"], row["on_bf16"]
        assert on.peak_bytes < off.peak_bytes  # checkpointing saves memory
        assert bf16.peak_bytes <= on.peak_bytes
        assert on.peak_bytes >= on.resident_bytes
    sdxl = rows["SDXL"]["on_fp32"]
    assert sdxl.fits(24 * me.GIB) and not rows["Flux 2 dev"]["on_bf16"].fits(24 * me.GIB)
    table = me.reference_table()
    assert "Flux 2 Klein 4B" in table and table.count("\n") == len(rows) + 1


def test_estimate_grows_with_size_and_batch():
    unet_config, preset = me.REFERENCE_MODELS["Flux 2 Klein 4B"]
    plan = me.preset_plan(unet_config, preset)

    def peak(**kw):
        est = me.estimate_training_memory(unet_config, plan, **{"width": 512, "height": 512, **kw})
        return est.resident_bytes + est.activation_bytes

    assert peak() < peak(width=1024, height=1024) < peak(width=1024, height=1024, batch=2)
    est = me.estimate_training_memory(unet_config, plan, width=1024, height=1024)
    assert est.image_tokens == 4096
    text = est.summary()
    assert text.startswith("Estimated training peak:") and "weights" in text
    assert est.as_dict()["peak_bytes"] == est.peak_bytes
