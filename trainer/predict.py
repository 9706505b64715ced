"""How the trainer calls a ComfyUI model: the raw network output, with the trainable adapter active.

Nothing here imports ComfyUI; it uses the methods of the `BaseModel` it is handed
(`patcher.model`): `extra_conds`, `apply_model`, `process_latent_in`, `model_sampling`.

Raw output, not denoised. `BaseModel.apply_model(x, sigma)` returns the denoised latent
`x - out * sigma` (flow / epsilon) and the objectives regress the network output `out`
(velocity, epsilon, v). Recovering it as `(x - denoised) / sigma` amplifies float rounding by
1/sigma, and shifted logit-normal sampling does draw sigmas near 0 (bf16 at sigma 1e-3 would
leave about one significant bit). So the model is called through ComfyUI's own `apply_model`,
which does the input scaling, timestep conversion, dtype casts and conditioning exactly as
sampling does, and a clone-free `diffusion_model` wrapper passed in this call's
`transformer_options` captures the network output on its way out; the denoised value is
discarded. Nothing is divided, and ComfyUI's conventions are reused rather than re-implemented.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..core import host
from ..core.runtime import active, build_call_state, install_hooks
from .objectives import Objective, objective_for
from .trainable import TrainableAdapter

# The value of comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL (a unit test checks they agree):
# wrappers listed under it in a call's transformer_options run around `diffusion_model.forward`.
DIFFUSION_MODEL_WRAPPER = "diffusion_model"
_WRAPPER_KEY = "lycoris_trainer"

_PREDICTION_OF_MODEL_TYPE = {"FLUX": "flow", "FLOW": "flow", "EPS": "epsilon", "V_PREDICTION": "v_prediction"}


def prediction_kind(base_model: Any) -> str:
    """'flow', 'epsilon' or 'v_prediction' from a ComfyUI BaseModel's `model_type`."""
    name = getattr(getattr(base_model, "model_type", None), "name", None)
    if name not in _PREDICTION_OF_MODEL_TYPE:
        raise ValueError(f"model type {name!r}: training supports {', '.join(_PREDICTION_OF_MODEL_TYPE)} models")
    return _PREDICTION_OF_MODEL_TYPE[name]


def objective_for_model(base_model: Any, family: str, **options: Any) -> Objective:
    """The objective for a ComfyUI model: its family, prediction type and (discrete) sigma table."""
    prediction = prediction_kind(base_model)
    sigmas = None if prediction == "flow" else base_model.model_sampling.sigmas
    return objective_for(family, prediction, sigmas=sigmas, **options)


def model_space_latents(base_model: Any, samples: torch.Tensor) -> torch.Tensor:
    """VAE latents (a LATENT's `samples`) as the model sees them: ComfyUI's `process_latent_in`."""
    return base_model.process_latent_in(samples)


def encode_conditioning(base_model: Any, conditioning: Sequence, latent: torch.Tensor,
                        guidance: float | None = None) -> dict[str, Any]:
    """Model keyword inputs (`c_crossattn`, `y`, `guidance`, ...) of a CONDITIONING for `latent`'s batch.

    Uses the first entry of the CONDITIONING, through the model's own `extra_conds` as a
    sampler's `encode_model_conds` does (width/height default to latent size * 8 there too).
    """
    if not conditioning:
        raise ValueError("conditioning: empty")
    cond, extras = conditioning[0]
    params = {**extras, "cross_attn": cond, "device": latent.device, "noise": latent,
              "width": extras.get("width", latent.shape[-1] * 8), "height": extras.get("height", latent.shape[-2] * 8)}
    if guidance is not None:
        params["guidance"] = guidance
    out = {}
    for key, value in base_model.extra_conds(**params).items():
        processed = value.process_cond(batch_size=latent.shape[0], device=latent.device, area=None)
        out[key] = processed.cond
    return out


def stack_conditioning(conds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-sample model inputs (from `encode_conditioning`, batch 1 each) as one batch."""
    if not conds:
        raise ValueError("conditioning: no samples")
    keys = set(conds[0])
    out = {}
    for key in conds[0]:
        values = [c[key] for c in conds]
        if any(set(c) != keys for c in conds):
            raise ValueError(f"conditioning: samples have different inputs ({sorted(keys)} vs others)")
        if not isinstance(values[0], torch.Tensor):
            out[key] = values[0]
            continue
        shapes = {tuple(v.shape[1:]) for v in values}
        if len(shapes) > 1:
            raise ValueError(f"conditioning.{key}: samples of different shapes {sorted(shapes)} cannot share a batch")
        out[key] = torch.cat(values)
    return out


class ComfyPredictor:
    """`predict(model_input, sigma, cond, timesteps)` for the training step: raw output of a ComfyUI model.

    The trainable adapter is applied through the runtime's bypass hooks (installed here, inert
    outside a call state) with a fresh call state per call: strength `strength` and, for T-LoRA,
    each sample's rank mask from `timesteps`. `cond` is `encode_conditioning`'s dict.
    LyCORIS's dropouts (config `dropout` / `rank_dropout` / `module_dropout`) are drawn per call from
    `generator` (the job's, checkpointed with it); only this training call applies them.
    """

    def __init__(self, base_model: Any, trainable: TrainableAdapter, strength: float = 1.0,
                 generator: torch.Generator | None = None):
        if trainable.dropouts and generator is None:
            raise ValueError("generator: a config with dropouts needs the job's generator to draw them")
        self.base_model = base_model
        self.trainable = trainable
        self.strength = strength
        self.generator = generator
        install_hooks(base_model.diffusion_model, trainable.comfy_modules())

    def __call__(self, model_input: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any],
                 timesteps: torch.Tensor) -> torch.Tensor:
        app = self.trainable.application(self.strength)
        draws = self.trainable.draw_dropouts(self.generator) if self.trainable.dropouts else None
        state = build_call_state([app], model_input.shape[0], 1, timesteps if app.tlora is not None else None,
                                 draws=draws)
        captured: list[torch.Tensor] = []

        def capture(executor, *args, **kwargs):
            output = executor(*args, **kwargs)
            captured.append(output)
            return output

        options = {"wrappers": {DIFFUSION_MODEL_WRAPPER: {_WRAPPER_KEY: [capture]}}}
        with active(state), host.training_ops():  # ComfyUI's autograd-capable ops (v0.33)
            self.base_model.apply_model(model_input, sigma.to(model_input.device), transformer_options=options,
                                        **cond)
        if len(captured) != 1 or not isinstance(captured[0], torch.Tensor):
            raise RuntimeError("predict: the diffusion model's output was not captured once as a tensor "
                               f"(got {len(captured)}); this ComfyUI version calls its model differently")
        return captured[0]
