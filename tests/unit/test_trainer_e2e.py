"""End to end on tiny ComfyUI models: the shipped presets train, the base stays bit-identical, the
snapshot applies exactly like the trainable adapter, and a resume from a checkpoint is exact.

Each run overfits one fixed noisy batch (the noise generator is reseeded every step), so the loss
is a deterministic function of the adapter and must fall steadily at AdamW lr 1e-3.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from comfyui_lycoris.core import api, host
from comfyui_lycoris.core.config import parse_config
from comfyui_lycoris.core.runtime import active, build_call_state
from comfyui_lycoris.core.targets import plan_for
from comfyui_lycoris.core.tiny import TinySizes
from comfyui_lycoris.trainer.checkpoint import TrainingState, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from comfyui_lycoris.trainer.checkpointing import gradient_checkpointing
from comfyui_lycoris.trainer.predict import (
    DIFFUSION_MODEL_WRAPPER,
    ComfyPredictor,
    encode_conditioning,
    objective_for_model,
    stack_conditioning,
)
from comfyui_lycoris.trainer.step import Batch, batch_loss, train_step
from comfyui_lycoris.trainer.trainable import TrainableAdapter, comfy_base_weights

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CASES = {
    "flux2": (TinySizes(family="flux2", width=64, heads=2, depth=1, single_depth=1, context_dim=32), "flux2_lokr",
              (2, 128, 8, 8)),
    "flux1": (TinySizes(family="flux1", width=64, heads=2, depth=1, single_depth=1, context_dim=32), "tlora",
              (2, 16, 16, 16)),
    "sdxl": (TinySizes(family="sdxl", width=32, depth=1, context_dim=32), "sdxl_lokr_attention", (2, 4, 8, 8)),
}
STEPS = 30



@dataclass
class Setup:
    model: object  # ComfyUI ModelPatcher
    trainable: TrainableAdapter
    objective: object
    predict: ComfyPredictor
    batch: Batch


def make_setup(family: str, seed: int = 0) -> Setup:
    sizes, preset, shape = CASES[family]
    model = host.build_tiny_model(sizes)
    base = model.model
    config = parse_config((CONFIGS / f"{preset}.json").read_text())
    unet_config = host.model_unet_config(model)
    trainable = TrainableAdapter.from_plan(plan_for(config, unet_config), unet_config,
                                           comfy_base_weights(base.diffusion_model), config, seed=seed)
    objective = objective_for_model(base, family)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(10))
    captions = ("a red cube on a table", "a photo of a cat")
    cond = stack_conditioning([
        encode_conditioning(base, host.tiny_conditioning(model, text, 8), latents[i : i + 1],
                            getattr(objective, "guidance", None))
        for i, text in enumerate(captions)])
    return Setup(model, trainable, objective, ComfyPredictor(base, trainable), Batch(latents, cond))


@pytest.fixture(scope="module", params=list(CASES))
def trained(request):
    setup = make_setup(request.param)
    diffusion_model = setup.model.model.diffusion_model
    before = {k: v.clone() for k, v in diffusion_model.state_dict().items()}
    optimizer = torch.optim.AdamW(setup.trainable.parameters(), lr=1e-3)
    generator = torch.Generator()
    losses = []
    with gradient_checkpointing(diffusion_model):
        for _ in range(STEPS):
            generator.manual_seed(1)
            result = train_step(setup.predict, setup.objective, [setup.batch], setup.trainable.parameters(),
                                optimizer, generator, max_grad_norm=1.0)
            assert result.finite and result.applied, result.message
            losses.append(result.loss)
    return setup, losses, before


def test_loss_falls(trained):
    _, losses, _ = trained
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses


def test_base_weights_are_bit_identical(trained):
    setup, _, before = trained
    after = setup.model.model.diffusion_model.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def _denoised(setup: Setup, patcher, inputs) -> torch.Tensor:
    """apply_model of `patcher` with its wrappers, as a sampler calls it."""
    options = dict(patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = patcher.wrappers
    return patcher.model.apply_model(inputs.model_input, inputs.sigma, transformer_options=options, **setup.batch.cond)


@torch.no_grad()
def test_snapshot_applies_like_the_trainable_adapter(trained):
    setup, _, _ = trained
    levels = setup.objective.sample(2, torch.Generator().manual_seed(5), 64)
    noise = torch.randn(setup.batch.latents.shape, generator=torch.Generator().manual_seed(6))
    inputs = setup.objective.make_inputs(setup.batch.latents, noise, levels)
    applied = api.apply(setup.model, setup.trainable.to_loaded("snapshot"), 1.0)
    got = _denoised(setup, applied, inputs)
    state = build_call_state([setup.trainable.application(1.0)], 2, 1, levels.timesteps)
    with active(state):
        expected = setup.model.model.apply_model(inputs.model_input, inputs.sigma, **setup.batch.cond)
    base = _denoised(setup, setup.model, inputs)
    assert float((expected - base).abs().max()) > 1e-4, "training changed the model"
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    # The predictor's raw output is the network output behind that denoised latent (flow / epsilon).
    raw = setup.predict(inputs.model_input, inputs.sigma, setup.batch.cond, inputs.timesteps)
    sigma = inputs.sigma.view(-1, 1, 1, 1)
    assert torch.allclose(inputs.model_input - raw * sigma, expected, atol=1e-4)


def test_checkpointing_gives_the_same_gradients_as_plain_backward():
    """SDXL backprops without checkpointing too: the recomputed blocks must see the same adapter state."""
    setup = make_setup("sdxl")
    params = setup.trainable.parameters()

    def gradients(backward_thread: bool = False) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        loss = batch_loss(setup.predict, setup.objective, setup.batch, torch.Generator().manual_seed(2))
        if backward_thread:  # as on CUDA, where the autograd engine recomputes blocks on its own thread
            worker = threading.Thread(target=loss.backward)
            worker.start()
            worker.join()
        else:
            loss.backward()
        return [p.grad.clone() for p in params]

    plain = gradients()
    with gradient_checkpointing(setup.model.model.diffusion_model):
        checkpointed = gradients()
        other_thread = gradients(backward_thread=True)
    assert any(float(g.abs().max()) > 0 for g in plain)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(plain, checkpointed))
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(plain, other_thread))
    assert "forward" not in vars(setup.model.model.diffusion_model.input_blocks[0][0]), "forwards restored"


def test_resume_from_checkpoint_is_exact(tmp_path):
    """T-LoRA on Flux 1: 2 steps, checkpoint, 2 more == a fresh process resuming from the checkpoint."""

    def run(setup: Setup, optimizer, generator, steps: int) -> None:
        with gradient_checkpointing(setup.model.model.diffusion_model):
            for _ in range(steps):
                train_step(setup.predict, setup.objective, [setup.batch], setup.trainable.parameters(), optimizer,
                           generator)

    first = make_setup("flux1")
    optimizer, generator = torch.optim.AdamW(first.trainable.parameters(), lr=1e-3), torch.Generator().manual_seed(4)
    run(first, optimizer, generator, 2)
    state = TrainingState(2, first.trainable.state_dict(), optimizer.state_dict(), capture_rng({"noise": generator}),
                          {"preset": "tlora"})
    path = save_checkpoint(tmp_path, state, keep_last=1)
    run(first, optimizer, generator, 2)

    second = make_setup("flux1", seed=99)  # a different init, overwritten by the checkpoint
    resumed = load_checkpoint(path)
    second.trainable.load_state_dict(resumed.adapter)
    optimizer2, generator2 = torch.optim.AdamW(second.trainable.parameters(), lr=1e-3), torch.Generator()
    optimizer2.load_state_dict(resumed.optimizer)
    restore_rng(resumed.rng, {"noise": generator2})
    run(second, optimizer2, generator2, 2)
    ours, theirs = first.trainable.state_dict(), second.trainable.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_wrapper_kind_is_comfyuis():
    import comfy.patcher_extension

    assert DIFFUSION_MODEL_WRAPPER == comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
