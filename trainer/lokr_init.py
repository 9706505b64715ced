"""SimpleTuner's `--init_lokr_norm`: LoKr's perturbed-normal init, as SimpleTuner 4.10.1 computes it.

SimpleTuner (helpers/training/peft_init.py, `init_lokr_network_with_perturbed_normal`, called by
trainer.py right after create_lycoris) sets, for every LyCORIS module: `lokr_w1` to ones, and
`lokr_w2` to a normal draw rescaled to the norm, then the std, then the mean of the module's base
weight, times `scale`. Only full-matrix LoKr modules have both tensors (SimpleTuner fails with an
AttributeError on any other module); here that is an error naming the option and the module.
The draw comes from the global RNG, which the trainer forks and seeds per module (trainable.py).
"""

from __future__ import annotations

import torch

FIELD = "init_lokr_norm"


class LokrInitError(ValueError):
    """A module the perturbed-normal init cannot apply to; the message starts with the field."""


def check_lokr_norm(algo: str, lora_name: str, module: torch.nn.Module) -> None:
    """Refuse what SimpleTuner's init cannot take: another algorithm, or a LoKr half that is factorised."""
    if algo != "lokr":
        raise LokrInitError(f"{FIELD}: LoKr's perturbed-normal init needs algo 'lokr'; {lora_name} is '{algo}'")
    if not (isinstance(getattr(module, "lokr_w1", None), torch.Tensor)
            and isinstance(getattr(module, "lokr_w2", None), torch.Tensor)):
        raise LokrInitError(f"{FIELD}: {lora_name} has a factorised LoKr half (lokr_w1_a/b or lokr_w2_a/b); the "
                            "perturbed-normal init sets full lokr_w1 and lokr_w2: use full_matrix true (SimpleTuner "
                            "fails on such a module too)")


def _approximate_normal(inp: torch.Tensor, target: torch.Tensor, scale: float) -> None:
    """SimpleTuner's `approximate_normal_tensor` (dense tensors): target = scale * N(0,1) shaped to inp's stats."""
    device = inp.device
    working = target.dtype if target.is_floating_point() else torch.float32
    tensor = torch.randn(target.shape, device=device, dtype=working)
    desired_norm = inp.norm().to(device=device, dtype=working)
    desired_mean = inp.mean().to(device=device, dtype=working)
    desired_std = inp.std().to(device=device, dtype=working)
    tensor = tensor * (desired_norm / tensor.norm())
    tensor = tensor * (desired_std / tensor.std())
    tensor = tensor - tensor.mean() + desired_mean
    tensor.mul_(scale)
    target.copy_(tensor.to(dtype=target.dtype))


@torch.no_grad()
def init_lokr_norm(module: torch.nn.Module, scale: float) -> None:
    """SimpleTuner's perturbed-normal init of one LyCORIS LoKr module (after `check_lokr_norm`)."""
    module.lokr_w1.fill_(1.0)
    _approximate_normal(module.org_weight, module.lokr_w2, scale)
