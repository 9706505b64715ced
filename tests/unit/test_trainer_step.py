"""The training step with a stand-in model: accumulation, clipping, and no NaN ever reaching parameters."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_lycoris.trainer.objectives import FlowObjective
from comfyui_lycoris.trainer.step import Batch, batch_loss, grad_norm, train_step

torch.set_num_threads(1)


def _setup(value: float = 0.5):
    weight = torch.full((4,), value, requires_grad=True)

    def predict(model_input, sigma, cond, timesteps):
        assert timesteps.dtype == torch.long and sigma.shape == (model_input.shape[0],)
        return model_input * weight.view(1, 4, 1, 1) * cond

    return weight, predict


def _batches(n: int) -> list[Batch]:
    gen = torch.Generator().manual_seed(3)
    return [Batch(torch.randn(2, 4, 3, 3, generator=gen), 1.0) for _ in range(n)]


def test_accumulated_step_averages_micro_batches():
    weight, predict = _setup()
    objective, batches = FlowObjective(), _batches(3)
    result = train_step(predict, objective, batches, [weight], torch.optim.SGD([weight], lr=0.1),
                        torch.Generator().manual_seed(0))
    reference, predict_ref = _setup()
    gen = torch.Generator().manual_seed(0)
    losses = [batch_loss(predict_ref, objective, b, gen) for b in batches]
    (sum(losses) / 3).backward()
    assert result.finite and result.applied and weight.grad is None
    assert result.loss == pytest.approx(float(sum(losses).detach()) / 3, rel=1e-6)
    assert result.grad_norm == pytest.approx(float(reference.grad.norm()), rel=1e-5)
    assert torch.allclose(weight, reference.detach() - 0.1 * reference.grad, atol=1e-7)


def test_clipping_limits_the_update():
    weight, predict = _setup(5.0)
    before = weight.detach().clone()
    result = train_step(predict, FlowObjective(), _batches(1), [weight], torch.optim.SGD([weight], lr=1.0),
                        torch.Generator().manual_seed(0), max_grad_norm=0.01)
    assert result.grad_norm > 0.01
    assert float((weight.detach() - before).norm()) == pytest.approx(0.01, rel=1e-4)


def test_non_finite_loss_skips_the_step():
    weight, predict = _setup()
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    batches = [_batches(1)[0], Batch(torch.full((2, 4, 3, 3), float("nan")), 1.0)]
    result = train_step(predict, FlowObjective(), batches, [weight], optimizer, torch.Generator().manual_seed(0))
    assert not result.finite and not result.applied and math.isnan(result.loss)
    assert "non-finite loss" in result.message and "micro-batch 2/2" in result.message
    assert torch.equal(weight.detach(), torch.full((4,), 0.5)) and weight.grad is None
    assert not optimizer.state, "AdamW never stepped"


def test_non_finite_gradient_skips_the_step():
    weight = torch.zeros(4, requires_grad=True)

    def predict(model_input, sigma, cond, timesteps):
        return model_input * weight.sqrt().view(1, 4, 1, 1)  # finite output, infinite gradient at 0

    result = train_step(predict, FlowObjective(), _batches(1), [weight], torch.optim.SGD([weight], lr=0.1),
                        torch.Generator().manual_seed(0))
    assert math.isfinite(result.loss) and not result.finite and not result.applied
    assert "gradient norm" in result.message
    assert torch.equal(weight.detach(), torch.zeros(4)) and weight.grad is None


def test_grad_norm_without_gradients_is_zero():
    assert float(grad_norm([torch.zeros(2, requires_grad=True)])) == 0.0
    with pytest.raises(ValueError, match="micro-batch"):
        train_step(lambda *a: None, FlowObjective(), [], [], torch.optim.SGD([torch.zeros(1, requires_grad=True)]),
                   torch.Generator())
