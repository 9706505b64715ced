"""Training objectives, one strategy per model kind (DESIGN: "objectives follow the model").

Every objective speaks ComfyUI's conventions, because the network is ComfyUI's and is called
through its `BaseModel.apply_model(x, sigma, ...)`:

- `model_input` is the latent a ComfyUI sampler hands `apply_model` at noise level `sigma`
  (ComfyUI's `model_sampling.noise_scaling`); ComfyUI itself then applies its input scaling.
- `target` is what the *raw* network output (not `apply_model`'s denoised latent) should be:
  velocity for flow models, epsilon or v for discrete (SDXL) models. `trainer.predict` returns
  that raw output.
- `timesteps` are the integer T-LoRA timesteps (0..1000) of each sample, computed exactly as the
  inference runtime computes them from the same sigma, so a T-LoRA adapter trains with the rank
  masks it will be sampled with.

Sampling draws from a caller-owned `torch.Generator` on the CPU, so a run is reproducible and
resumable (the generator state is checkpointed) and does not depend on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from ..core.tlora import timestep_from_sigma_flow

PREDICTIONS = ("flow", "epsilon", "v_prediction")


@dataclass(frozen=True)
class NoiseLevels:
    """Per-sample noise levels of one batch: ComfyUI sigma and T-LoRA timestep (0..1000)."""

    sigma: torch.Tensor  # [B] float32
    timesteps: torch.Tensor  # [B] int64


@dataclass(frozen=True)
class TrainingInputs:
    """What one forward/loss needs: the model call's inputs and the regression target."""

    model_input: torch.Tensor
    sigma: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None  # [B] per-sample loss weights, None = uniform


class Objective(Protocol):
    """The strategy interface the training step uses; see FlowObjective / DiscreteObjective."""

    prediction: str

    def sample(self, batch_size: int, generator: torch.Generator, num_tokens: int | None = None) -> NoiseLevels:
        """Noise levels for a batch (num_tokens: image tokens, for resolution-dependent shifts)."""
        ...

    def make_inputs(self, x0: torch.Tensor, noise: torch.Tensor, levels: NoiseLevels) -> TrainingInputs:
        """Noisy model input, target and weights for clean latents x0 and unit Gaussian noise."""
        ...

    def loss(self, pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """The scalar loss of a batch (float32)."""
        ...

    def image_tokens(self, latent_shape: tuple[int, ...]) -> int:
        """Image tokens of a latent of this shape (what a resolution-dependent shift reads)."""
        ...


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ...] broadcastable over a latent, in the latent's dtype and device."""
    return sigma.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error per sample (float32), weighted per sample, averaged over the batch.

    Computed in float32 whatever the model dtype: a bf16 squared error loses the small
    differences late training is about.
    """
    if pred.shape != target.shape:
        raise ValueError(f"loss: prediction shape {tuple(pred.shape)} differs from target {tuple(target.shape)}")
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(device=per_sample.device, dtype=torch.float32)).mean()


# -- rectified flow (Flux 1, Flux 2) ---------------------------------------------------------

def shifted_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3/Flux timestep shift: shift * u / (1 + (shift - 1) * u).

    diffusers' FlowMatchEulerDiscreteScheduler (static `shift`, or `time_shift` with
    shift = e^mu) and SimpleTuner's flow trainers use this map; shift > 1 moves samples to
    higher noise, where large images need more training.
    """
    return shift * u / (1.0 + (shift - 1.0) * u)


def resolution_shift(num_tokens: int, base_tokens: int = 256, max_tokens: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """e^mu with mu linear in the image token count (diffusers' Flux `calculate_shift`).

    mu is 0.5 at 256 tokens (256 px Flux 1 / 16 px-per-token) and 1.15 at 4096 (1024 px),
    extrapolated linearly outside that range, exactly as diffusers does.
    """
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    mu = num_tokens * slope + (base_shift - slope * base_tokens)
    return math.exp(mu)


@dataclass(frozen=True)
class FlowObjective:
    """Rectified flow (Flux 1 / Flux 2): x_t = (1 - s) x0 + s noise, target velocity noise - x0.

    s = shift(sigmoid(N(0, 1))) ("logit-normal" sampling, SimpleTuner's default for Flux), with
    a fixed `shift` (3 by default) or, with `resolution_dependent`, e^mu from the image token
    count. ComfyUI's Flux models take sigma itself as the timestep (they multiply by 1000 inside)
    and `CONST.noise_scaling` is exactly this x_t, so sigma = s. `guidance` is the value fed to
    guidance-distilled models (Flux 1 dev, Flux 2) during training; None leaves ComfyUI's default.
    """

    shift: float = 3.0
    resolution_dependent: bool = False
    patch_size: int = 1  # latent pixels per token side: 2 for Flux 1, 1 for Flux 2
    guidance: float | None = 1.0
    prediction: str = "flow"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift: must be a finite number > 0, got {self.shift}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size: must be at least 1, got {self.patch_size}")

    def shift_for(self, num_tokens: int | None) -> float:
        """The shift used for a batch of `num_tokens` image tokens."""
        if not self.resolution_dependent:
            return self.shift
        if num_tokens is None:
            raise ValueError("num_tokens: required when the shift is resolution dependent")
        return resolution_shift(num_tokens)

    def image_tokens(self, latent_shape: tuple[int, ...]) -> int:
        """Tokens ComfyUI's Flux makes of a [B, C, H, W] latent (it pads to the patch size)."""
        p = self.patch_size
        h, w = latent_shape[-2], latent_shape[-1]
        return ((h + p // 2) // p) * ((w + p // 2) // p)

    def sample(self, batch_size: int, generator: torch.Generator, num_tokens: int | None = None) -> NoiseLevels:
        u = torch.sigmoid(torch.randn(batch_size, generator=generator, dtype=torch.float32))
        sigma = shifted_sigma(u, self.shift_for(num_tokens))
        return NoiseLevels(sigma, timestep_from_sigma_flow(sigma))

    def make_inputs(self, x0: torch.Tensor, noise: torch.Tensor, levels: NoiseLevels) -> TrainingInputs:
        s = _per_sample(levels.sigma, x0)
        return TrainingInputs((1.0 - s) * x0 + s * noise, levels.sigma, levels.timesteps, noise - x0, None)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        return weighted_mse(pred, target, weights)


# -- discrete DDPM (SDXL) --------------------------------------------------------------------

def scaled_linear_sigmas(num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """sigma_t = sqrt((1 - ᾱ_t) / ᾱ_t) for SD/SDXL's "scaled_linear" betas, as ComfyUI computes them.

    ComfyUI's `ModelSamplingDiscrete` (beta_schedule 'linear' there means this schedule): betas
    linspace(sqrt(start), sqrt(end))^2 in float64, cumulative product, stored as float32.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()


@dataclass(frozen=True, eq=False)
class DiscreteObjective:
    """Discrete-time diffusion (SDXL): uniform t in 0..T-1, epsilon or v target, optional min-SNR-γ.

    ComfyUI parameterises the noisy latent as x = x0 + sigma * noise (`EPS.noise_scaling`) and
    feeds the network x / sqrt(sigma^2 + 1) = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) noise, the DDPM x_t
    (ᾱ = 1 / (1 + sigma^2)); `apply_model` does that scaling, so `model_input` is ComfyUI's x.
    v = sqrt(ᾱ) noise - sqrt(1 - ᾱ) x0 (diffusers' `get_velocity`). Min-SNR-γ (Hang et al. 2023,
    diffusers' train_text_to_image): weight min(SNR, γ) / SNR for epsilon, / (SNR + 1) for v,
    SNR = ᾱ / (1 - ᾱ) = 1 / sigma^2. `sigmas` is the model's own table (ComfyUI's
    `model_sampling.sigmas`, zero-terminal-SNR models included); default: SDXL's schedule.
    """

    prediction: str = "epsilon"
    min_snr_gamma: float | None = None
    sigmas: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction: a discrete model predicts 'epsilon' or 'v_prediction', got {self.prediction!r}")
        if self.min_snr_gamma is not None and not (math.isfinite(self.min_snr_gamma) and self.min_snr_gamma > 0):
            raise ValueError(f"min_snr_gamma: must be a finite number > 0, got {self.min_snr_gamma}")
        table = scaled_linear_sigmas() if self.sigmas is None else self.sigmas.detach().float().cpu()
        if table.ndim != 1 or table.numel() < 2:
            raise ValueError(f"sigmas: expected a 1-d table of the model's sigmas, got shape {tuple(table.shape)}")
        object.__setattr__(self, "sigmas", table)

    def image_tokens(self, latent_shape: tuple[int, ...]) -> int:
        return int(latent_shape[-2] * latent_shape[-1])

    def sample(self, batch_size: int, generator: torch.Generator, num_tokens: int | None = None) -> NoiseLevels:
        # The T-LoRA timestep is the table index, as ComfyUI's `model_sampling.timestep(sigma)` gives it.
        t = torch.randint(0, self.sigmas.numel(), (batch_size,), generator=generator, dtype=torch.long)
        return NoiseLevels(self.sigmas[t], t)

    def snr_weights(self, sigma: torch.Tensor) -> torch.Tensor | None:
        """Per-sample min-SNR-γ weights, or None without γ."""
        if self.min_snr_gamma is None:
            return None
        snr = 1.0 / sigma.double() ** 2
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        weights = clipped / snr if self.prediction == "epsilon" else clipped / (snr + 1.0)
        return weights.float()

    def make_inputs(self, x0: torch.Tensor, noise: torch.Tensor, levels: NoiseLevels) -> TrainingInputs:
        s = _per_sample(levels.sigma, x0)
        model_input = x0 + s * noise
        if self.prediction == "epsilon":
            target = noise
        else:
            alpha_bar = 1.0 / (1.0 + s * s)
            target = alpha_bar.sqrt() * noise - (1.0 - alpha_bar).sqrt() * x0
        return TrainingInputs(model_input, levels.sigma, levels.timesteps, target, self.snr_weights(levels.sigma))

    def loss(self, pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        return weighted_mse(pred, target, weights)


# -- choosing ----------------------------------------------------------------------------------

_FLOW_PATCH = {"flux1": 2, "flux2": 1}


def objective_for(family: str, prediction: str | None = None, *, shift: float = 3.0,
                  resolution_dependent: bool = False, guidance: float | None = 1.0,
                  min_snr_gamma: float | None = None, sigmas: torch.Tensor | None = None) -> Objective:
    """The objective of a model family ('flux2', 'flux1', 'sdxl') and prediction type.

    `prediction` defaults to the family's ('flow' for Flux, 'epsilon' for SDXL); a prediction
    the family cannot have is an error naming both.
    """
    if prediction is not None and prediction not in PREDICTIONS:
        raise ValueError(f"prediction: must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    if family in _FLOW_PATCH:
        if prediction not in (None, "flow"):
            raise ValueError(f"prediction: {family} models are rectified-flow models, not {prediction!r}")
        return FlowObjective(shift=shift, resolution_dependent=resolution_dependent,
                             patch_size=_FLOW_PATCH[family], guidance=guidance)
    if family == "sdxl":
        if prediction == "flow":
            raise ValueError("prediction: SDXL models predict 'epsilon' or 'v_prediction', not 'flow'")
        return DiscreteObjective(prediction=prediction or "epsilon", min_snr_gamma=min_snr_gamma, sigmas=sigmas)
    raise ValueError(f"family: no training objective for {family!r} (known: flux2, flux1, sdxl)")
