"""Optimizers by name: AdamW always; AdamW8bit, Adafactor, Prodigy when their package is installed."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .spec import JobSpec, SpecError


def build_optimizer(spec: JobSpec, params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    """The spec's optimizer over `params`; a missing optional package is an error naming it."""
    lr, wd = spec.learning_rate, spec.weight_decay
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if spec.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SpecError("optimizer: adamw8bit needs the bitsandbytes package (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=wd)
    if spec.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=wd, scale_parameter=False, relative_step=False)
    if spec.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise SpecError("optimizer: prodigy needs the prodigyopt package (pip install prodigyopt)") from None
        return Prodigy(params, lr=lr, weight_decay=wd)
    raise SpecError(f"optimizer: unknown '{spec.optimizer}'")
