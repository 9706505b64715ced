"""Training objectives against independent references: diffusers' schedulers and ComfyUI's model_sampling."""

from __future__ import annotations

import math

import comfy.model_sampling as ms
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from comfyui_lycoris.core.tlora import timestep_from_sigma_flow
from comfyui_lycoris.trainer.objectives import (
    DiscreteObjective,
    FlowObjective,
    NoiseLevels,
    objective_for,
    resolution_shift,
    scaled_linear_sigmas,
    shifted_sigma,
)

torch.set_num_threads(1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _Eps(ms.ModelSamplingDiscrete, ms.EPS):
    pass


class _V(ms.ModelSamplingDiscrete, ms.V_PREDICTION):
    pass


class _Flow(ms.ModelSamplingFlux, ms.CONST):
    pass


# -- rectified flow ------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_flow_sample_is_shifted_logit_normal(shift):
    levels = FlowObjective(shift=shift).sample(64, _gen(5))
    u = torch.sigmoid(torch.randn(64, generator=_gen(5)))
    assert torch.allclose(levels.sigma, shift * u / (1 + (shift - 1) * u), atol=1e-7, rtol=0)
    assert torch.equal(levels.timesteps, timestep_from_sigma_flow(levels.sigma))
    assert levels.sigma.dtype == torch.float32 and levels.timesteps.dtype == torch.long


def test_static_shift_matches_diffusers_scheduler():
    u = torch.linspace(0.02, 0.98, 17)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=u.tolist())
    assert torch.allclose(shifted_sigma(u, 3.0), scheduler.sigmas[:-1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("tokens", [64, 256, 1024, 4096, 8192])
def test_resolution_shift_matches_diffusers(tokens):
    mu = calculate_shift(tokens)
    assert resolution_shift(tokens) == pytest.approx(math.exp(mu), rel=1e-12)
    u = torch.linspace(0.02, 0.98, 9)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(sigmas=u.tolist(), mu=mu)
    assert torch.allclose(shifted_sigma(u, resolution_shift(tokens)), scheduler.sigmas[:-1], atol=1e-6, rtol=0)


def test_resolution_dependent_objective_uses_token_count():
    objective = FlowObjective(resolution_dependent=True, patch_size=2)
    assert objective.image_tokens((1, 16, 128, 128)) == 4096  # Flux 1, 1024 px
    levels = objective.sample(8, _gen(1), num_tokens=4096)
    u = torch.sigmoid(torch.randn(8, generator=_gen(1)))
    assert torch.allclose(levels.sigma, shifted_sigma(u, math.exp(1.15)), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="num_tokens"):
        objective.sample(2, _gen(1))


def test_flow_inputs_and_target_match_comfyui_flux_sampling():
    x0, noise = torch.randn(3, 16, 4, 4, generator=_gen(2)), torch.randn(3, 16, 4, 4, generator=_gen(3))
    sigma = torch.tensor([0.05, 0.5, 0.97])
    inputs = FlowObjective().make_inputs(x0, noise, NoiseLevels(sigma, timestep_from_sigma_flow(sigma)))
    sampling = _Flow()
    assert torch.allclose(inputs.model_input, sampling.noise_scaling(sigma, noise, x0), atol=1e-6)
    # The target, as the network output, makes ComfyUI's denoised latent the clean one.
    denoised = sampling.calculate_denoised(sigma, inputs.target, inputs.model_input)
    assert torch.allclose(denoised, x0, atol=1e-5)
    assert inputs.weights is None


# -- discrete (SDXL) -----------------------------------------------------------------------------

def test_scaled_linear_sigmas_are_comfyuis():
    assert torch.equal(scaled_linear_sigmas(), ms.ModelSamplingDiscrete().sigmas)


def test_discrete_noisy_input_is_ddpm_add_noise():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    objective = DiscreteObjective()
    levels = objective.sample(6, _gen(4))
    x0, noise = torch.randn(6, 4, 8, 8, generator=_gen(5)), torch.randn(6, 4, 8, 8, generator=_gen(6))
    inputs = objective.make_inputs(x0, noise, levels)
    assert torch.equal(levels.sigma, scaled_linear_sigmas()[levels.timesteps])
    # ComfyUI feeds the network calculate_input(x) = x / sqrt(sigma^2 + 1): the DDPM x_t.
    network_input = _Eps().calculate_input(levels.sigma, inputs.model_input)
    expected = scheduler.add_noise(x0, noise, levels.timesteps)
    assert torch.allclose(network_input, expected, atol=2e-5)
    assert torch.equal(inputs.target, noise)


def test_v_target_is_diffusers_velocity_and_comfyuis():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    objective = DiscreteObjective(prediction="v_prediction")
    levels = objective.sample(5, _gen(7))
    x0, noise = torch.randn(5, 4, 8, 8, generator=_gen(8)), torch.randn(5, 4, 8, 8, generator=_gen(9))
    inputs = objective.make_inputs(x0, noise, levels)
    assert torch.allclose(inputs.target, scheduler.get_velocity(x0, noise, levels.timesteps), atol=2e-5)
    denoised = _V().calculate_denoised(levels.sigma, inputs.target, inputs.model_input)
    assert torch.allclose(denoised, x0, atol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_formula(prediction):
    gamma = 5.0
    objective = DiscreteObjective(prediction=prediction, min_snr_gamma=gamma)
    t = torch.tensor([0, 10, 200, 500, 999])
    alpha_bar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)[t]
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr if prediction == "epsilon" else snr + 1)
    weights = objective.snr_weights(scaled_linear_sigmas()[t])
    assert torch.allclose(weights.double(), expected, rtol=1e-5)
    inputs = objective.make_inputs(torch.zeros(5, 4, 2, 2), torch.ones(5, 4, 2, 2),
                                   NoiseLevels(scaled_linear_sigmas()[t], t))
    assert torch.equal(inputs.weights, weights)


def test_weighted_loss_is_per_sample_mean():
    objective = DiscreteObjective(min_snr_gamma=5.0)
    pred, target = torch.zeros(2, 1, 2, 2), torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert float(objective.loss(pred, target, None)) == pytest.approx(2.5)
    assert float(objective.loss(pred, target, torch.tensor([1.0, 0.5]))) == pytest.approx((1 + 2) / 2)
    with pytest.raises(ValueError, match="shape"):
        objective.loss(pred, target[:1], None)


# -- choosing ------------------------------------------------------------------------------------

def test_objective_for_family():
    assert isinstance(objective_for("flux2"), FlowObjective) and objective_for("flux2").patch_size == 1
    assert objective_for("flux1").patch_size == 2
    assert objective_for("sdxl").prediction == "epsilon"
    assert objective_for("sdxl", "v_prediction", min_snr_gamma=5.0).min_snr_gamma == 5.0
    with pytest.raises(ValueError, match="rectified-flow"):
        objective_for("flux1", "epsilon")
    with pytest.raises(ValueError, match="not 'flow'"):
        objective_for("sdxl", "flow")
    with pytest.raises(ValueError, match="family"):
        objective_for("sd15")
