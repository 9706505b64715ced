"""One training step, ComfyUI-agnostic: sample noise, predict, loss, backward, clip, optimizer step.

The model call is a `Predict` callable (see `trainer.predict.ComfyPredictor` for the ComfyUI
one), so this file knows nothing about hooks, conditioning formats or devices beyond tensors.
A non-finite loss or gradient never reaches the parameters: the step is skipped, the gradients
are dropped, and the result says so (the caller decides whether to stop or go on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .objectives import Objective


class Predict(Protocol):
    """The model call: raw network output (velocity / epsilon / v) for a noisy batch."""

    def __call__(self, model_input: torch.Tensor, sigma: torch.Tensor, cond: Any,
                 timesteps: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Batch:
    """One micro-batch: clean latents in model space ([B, C, H, W]) and the conditioning `predict` takes."""

    latents: torch.Tensor
    cond: Any


@dataclass(frozen=True)
class StepResult:
    """What a step did. `loss` is the mean over micro-batches (the first non-finite value if any)."""

    loss: float
    finite: bool  # loss and gradients finite
    applied: bool  # the optimizer stepped
    grad_norm: float | None = None  # total gradient norm before clipping
    message: str = ""  # why the step was skipped


def batch_loss(predict: Predict, objective: Objective, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    """The objective's loss on one micro-batch; noise levels and noise drawn from `generator` (CPU)."""
    x0 = batch.latents
    levels = objective.sample(x0.shape[0], generator, objective.image_tokens(tuple(x0.shape)))
    noise = torch.randn(tuple(x0.shape), generator=generator, dtype=torch.float32).to(x0)
    inputs = objective.make_inputs(x0, noise, levels)
    pred = predict(inputs.model_input, inputs.sigma, batch.cond, inputs.timesteps)
    return objective.loss(pred, inputs.target.to(pred.device), inputs.weights)


def grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Total 2-norm of the gradients of `params` (those without a gradient count as 0)."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in params if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def skip_step(optimizer: torch.optim.Optimizer, loss: float, message: str, norm: float | None = None) -> StepResult:
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, False, False, norm, message)


def train_step(predict: Predict, objective: Objective, batches: Sequence[Batch], params: Sequence[torch.Tensor],
               optimizer: torch.optim.Optimizer, generator: torch.Generator,
               max_grad_norm: float | None = None) -> StepResult:
    """One optimizer step over `batches` (gradient accumulation: each is one micro-batch).

    Losses are averaged over micro-batches. A non-finite micro-batch loss stops the step before
    its backward; a non-finite gradient norm stops it before clipping. `max_grad_norm` clips the
    total norm (None: no clipping; the norm is still reported).
    """
    if not batches:
        raise ValueError("batches: a step needs at least one micro-batch")
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, batch in enumerate(batches):
        loss = batch_loss(predict, objective, batch, generator)
        value = float(loss.detach())
        if not math.isfinite(value):
            return skip_step(optimizer, value, f"non-finite loss {value} in micro-batch {i + 1}/{len(batches)}; "
                                           "optimizer step skipped")
        (loss / len(batches)).backward()
        total += value / len(batches)
    return finish_step(optimizer, params, total, max_grad_norm)


def finish_step(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], loss: float,
                max_grad_norm: float | None) -> StepResult:
    """After backward: skip on a non-finite gradient norm, else clip and step the optimizer."""
    norm = float(grad_norm(params))
    if not math.isfinite(norm):
        return skip_step(optimizer, loss, f"non-finite gradient norm {norm}; optimizer step skipped", norm)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, True, True, norm)
