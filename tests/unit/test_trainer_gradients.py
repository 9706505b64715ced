"""Exact gradients: checkpointed == uncheckpointed == finite differences, in float64, on every family.

ComfyUI's Flux blocks update their inputs in place, which makes a plain recomputation (core's
`torch.utils.checkpoint` wrapping) silently wrong. These tests run the trainer's own step modes
(`trainer.checkpointing.memory_mode`, what `trainer.loop.training_step` uses) on tiny models built
in float64 and compare the adapter's gradient three ways: checkpointed, uncheckpointed (every
saved tensor copied when saved) and a central finite difference of the loss along a random
direction, which knows nothing of autograd. A T-LoRA config (per-sample rank masks) and an
A/B-style per-sample strength vector are included. The frozen-base tests check that no base
weight of any family and storage dtype is ever part of the autograd graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import comfyui_lycoris.trainer.checkpointing as checkpointing_module
from comfyui_lycoris.core import host
from comfyui_lycoris.core.config import parse_config
from comfyui_lycoris.core.targets import plan_for
from comfyui_lycoris.core.tiny import TinySizes
from comfyui_lycoris.trainer.checkpointing import checkpoint_units, gradient_checkpointing, memory_mode
from comfyui_lycoris.trainer.loop import training_step
from comfyui_lycoris.trainer.predict import ComfyPredictor, encode_conditioning, objective_for_model, stack_conditioning
from comfyui_lycoris.trainer.step import Batch
from comfyui_lycoris.trainer.trainable import TrainableAdapter, comfy_base_weights

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SIZES = {
    "flux2": TinySizes(family="flux2", width=64, heads=2, depth=2, single_depth=2, context_dim=32),
    "flux1": TinySizes(family="flux1", width=64, heads=2, depth=2, single_depth=2, context_dim=32),
    "sdxl": TinySizes(family="sdxl", width=32, depth=1, context_dim=32),
}
SHAPES = {"flux2": (2, 128, 8, 8), "flux1": (2, 16, 16, 16), "sdxl": (2, 4, 8, 8)}
CASES = [  # family, preset, per-sample strengths
    ("flux2", "flux2_lokr", 1.0),
    ("flux2", "all_linear_lokr", (0.5, -1.0)),
    ("flux1", "tlora", 1.0),
    ("flux1", "flux1_lokr", (1.0, 0.25)),
    ("sdxl", "sdxl_lokr_attention", 1.0),
    ("sdxl", "tlora", (0.75, 1.5)),
]


@pytest.fixture
def float64_rope(monkeypatch):
    """ComfyUI's Flux rotary embedding is float32 whatever the model dtype; make it float64 so the
    whole loss is a float64 function of the adapter (finite differences need that precision)."""
    import comfy.ldm.flux.layers as layers

    original = layers.rope
    monkeypatch.setattr(layers, "rope", lambda *a, **k: original(*a, **k).double())


@dataclass
class Case:
    model: object
    trainable: TrainableAdapter
    predict: ComfyPredictor
    objective: object
    batch: Batch
    inputs: object


def make_case(family: str, preset: str, strength, dtype=torch.float64, compute_dtype=None,
              train_dtype=torch.float64) -> Case:
    model = host.build_tiny_model(SIZES[family], dtype=dtype, compute_dtype=compute_dtype)
    base = model.model
    host.freeze_base(model)
    config = parse_config((CONFIGS / f"{preset}.json").read_text())
    unet_config = host.model_unet_config(model)
    trainable = TrainableAdapter.from_plan(plan_for(config, unet_config), unet_config,
                                           comfy_base_weights(base.diffusion_model), config, seed=0, dtype=train_dtype)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # away from LyCORIS's zero-delta init, so every factor has a gradient
        for p in trainable.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p))
    objective = objective_for_model(base, family)
    run_dtype = compute_dtype or dtype
    latents = torch.randn(SHAPES[family], generator=torch.Generator().manual_seed(10)).to(run_dtype)
    cond = stack_conditioning([
        encode_conditioning(base, host.tiny_conditioning(model, text, 8), latents[i : i + 1],
                            getattr(objective, "guidance", None))
        for i, text in enumerate(("a red cube on a table", "a photo of a cat"))])
    cond = {k: v.to(run_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in cond.items()}
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4)).to(run_dtype)
    levels = objective.sample(latents.shape[0], torch.Generator().manual_seed(1), 64)
    inputs = objective.make_inputs(latents, noise, levels)
    return Case(model, trainable, ComfyPredictor(base, trainable, strength), objective, Batch(latents, cond), inputs)


def loss_of(case: Case) -> torch.Tensor:
    """Mean squared error in the model's dtype (the objectives' loss is float32 by design)."""
    pred = case.predict(case.inputs.model_input, case.inputs.sigma, case.batch.cond, case.inputs.timesteps)
    return (pred - case.inputs.target.to(pred)).pow(2).mean()


def gradient(case: Case, checkpointing: bool) -> torch.Tensor:
    params = case.trainable.parameters()
    for p in params:
        p.grad = None
    with torch.enable_grad(), memory_mode(case.model.model.diffusion_model, checkpointing):
        loss_of(case).backward()
    return torch.cat([p.grad.flatten() for p in params])


def directional_difference(case: Case, direction: torch.Tensor, eps: float = 1e-5) -> float:
    """(L(θ + εd) - L(θ - εd)) / 2ε, no autograd involved."""
    params = case.trainable.parameters()

    def shift(scale: float) -> None:
        offset = 0
        for p in params:
            p.add_(scale * direction[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    with torch.no_grad():
        shift(eps)
        up = float(loss_of(case))
        shift(-2 * eps)
        down = float(loss_of(case))
        shift(eps)
    return (up - down) / (2 * eps)


@pytest.mark.parametrize("family,preset,strength", CASES, ids=[f"{f}-{p}-{s}" for f, p, s in CASES])
def test_checkpointed_gradient_is_exact(family, preset, strength, float64_rope, monkeypatch):
    case = make_case(family, preset, strength)
    plain = gradient(case, checkpointing=False)
    calls = []
    original = checkpointing_module._Checkpointed.forward
    monkeypatch.setattr(checkpointing_module._Checkpointed, "forward",
                        staticmethod(lambda ctx, *a: calls.append(1) or original(ctx, *a)))
    checkpointed = gradient(case, checkpointing=True)
    units = checkpoint_units(case.model.model.diffusion_model)
    assert len(calls) == len(units), "every unit ran checkpointed (none bypassed by its caller)"
    assert float(plain.norm()) > 1e-6, "the adapter has a gradient"
    assert float((checkpointed - plain).norm() / plain.norm()) <= 1e-6
    direction = torch.randn(plain.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    analytic = float(checkpointed @ direction)
    numeric = directional_difference(case, direction)
    assert abs(analytic - numeric) <= 1e-6 * max(abs(numeric), 1e-3 * float(plain.norm() * direction.norm())), \
        (analytic, numeric)


def test_core_style_recomputation_would_be_wrong(float64_rope):
    """The trap this module avoids: recomputing Flux blocks from the caller's (since updated) tensors."""
    case = make_case("flux2", "flux2_lokr", 1.0)
    exact = gradient(case, checkpointing=False)
    units = checkpoint_units(case.model.model.diffusion_model)
    originals = [u.forward for u in units]
    for unit, forward in zip(units, originals):
        unit.forward = (lambda f: lambda *a, **k: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False,
                                                                                    **k))(forward)
    try:
        params = case.trainable.parameters()
        for p in params:
            p.grad = None
        with torch.enable_grad():
            try:
                loss_of(case).backward()
                naive = torch.cat([p.grad.flatten() for p in params])
                wrong = float((naive - exact).norm() / exact.norm()) > 1e-3
            except RuntimeError:  # torch's own check may catch the changed inputs instead
                wrong = True
    finally:
        for unit in units:
            del unit.forward
    assert wrong


def test_units_are_the_blocks_and_forwards_are_restored():
    case = make_case("flux2", "flux2_lokr", 1.0, train_dtype=torch.float32, dtype=torch.float32)
    root = case.model.model.diffusion_model
    units = checkpoint_units(root)
    assert units == [*root.double_blocks, *root.single_blocks]
    sdxl = host.build_tiny_model(SIZES["sdxl"]).model.diffusion_model
    assert checkpoint_units(sdxl) == [layer for block in (*sdxl.input_blocks, sdxl.middle_block, *sdxl.output_blocks)
                                      for layer in block]
    with gradient_checkpointing(root):
        assert all("forward" in vars(u) for u in units)
    assert not any("forward" in vars(u) for u in units)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_training_step_modes_give_the_same_update(checkpointing, float64_rope):
    """The loop's step function: one AdamW step with checkpointing on equals one with it off."""
    updated = {}
    for mode in (True, False):
        case = make_case("flux1", "tlora", (1.0, 0.5))
        optimizer = torch.optim.AdamW(case.trainable.parameters(), lr=1e-2)
        result = training_step(case.predict, case.objective, [case.batch], optimizer, torch.Generator().manual_seed(2),
                               checkpointing=mode, max_grad_norm=1.0)
        assert result.applied, result.message
        updated[mode] = torch.cat([p.detach().flatten() for p in case.trainable.parameters()])
    assert torch.equal(updated[True], updated[False]) or \
        float((updated[True] - updated[False]).abs().max()) <= 1e-12


FROZEN_CASES = [  # family, stored dtype, compute dtype, training dtype
    ("flux2", torch.float32, None, torch.float32),
    ("flux1", torch.bfloat16, None, torch.bfloat16),
    ("sdxl", torch.float32, None, torch.float32),
    ("flux2", torch.float8_e4m3fn, torch.bfloat16, torch.bfloat16),
    ("sdxl", torch.float8_e4m3fn, torch.bfloat16, torch.bfloat16),
]


@pytest.mark.parametrize("family,dtype,compute,train", FROZEN_CASES,
                         ids=[f"{f}-{str(d)[6:]}-{str(c)[6:]}" for f, d, c, _ in FROZEN_CASES])
@pytest.mark.parametrize("checkpointing", [True, False], ids=["ckpt", "no-ckpt"])
def test_base_weights_stay_out_of_the_graph(family, dtype, compute, train, checkpointing):
    """No base weight gets a .grad, and none is a leaf of the backward graph (so no weight-gradient matmul)."""
    preset = {"flux2": "all_linear_lokr", "flux1": "flux1_lokr", "sdxl": "sdxl_lokr_attention"}[family]
    case = make_case(family, preset, 1.0, dtype=dtype, compute_dtype=compute, train_dtype=train)
    root = case.model.model.diffusion_model
    base = {id(p): name for name, p in root.named_parameters()}

    with torch.enable_grad(), memory_mode(root, checkpointing):
        loss = loss_of(case).float()
        leaves = _graph_leaves(loss.grad_fn)
        loss.backward()
    assert any(p.grad is not None for p in case.trainable.parameters())
    # requires_grad off: autograd computes no gradient for them, in the recomputed blocks either.
    assert [name for name, p in root.named_parameters() if p.grad is not None or p.requires_grad] == []
    assert not (leaves & set(base)), sorted(base[i] for i in leaves & set(base))[:5]
    if not checkpointing:  # the whole graph is visible from the loss: the adapter's leaves are in it
        assert leaves >= {id(p) for p in case.trainable.parameters()}


def _graph_leaves(grad_fn) -> set[int]:
    """ids of the tensors an autograd graph accumulates gradients into (its AccumulateGrad nodes)."""
    leaves, seen, stack = set(), set(), [grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.add(id(node.variable))
        stack += [n for n, _ in node.next_functions]
    return leaves
