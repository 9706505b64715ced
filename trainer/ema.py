"""An exponential moving average of the adapter's trainable tensors, as SimpleTuner 4.10.1 keeps it.

SimpleTuner (`helpers/training/ema.py`, `EMAModel.step` / `get_decay`, called after every optimizer
step with `global_step`, 1-based) updates every `ema_update_interval` steps with
`shadow -= (1 - d) * (shadow - param)`, where `d = min((1 + s) / (10 + s), ema_decay)` and
`s = global_step - 1` (d = 0 at the first update when it falls on step 1: the shadow becomes the
adapter). The shadow starts as a copy of the adapter before step 1 (after `init_lora`).

Where it lives: in float32 on the CPU, on the main process only. This is SimpleTuner's
`ema_device=cpu` with `ema_cpu_only` (its default `ema_device` is cpu, but without `ema_cpu_only` it
moves the shadow to the accelerator for each update): no accelerator memory at all, which is what
matters for adapters of billions of parameters; one copy of the trainable tensors to the CPU per
update. float32 rather than the adapter's dtype: with decay 0.995 a bfloat16 shadow would round
most updates away.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

EMA_FOLDER = "ema"  # SimpleTuner writes its EMA adapter into an `ema/` folder beside the weights


class AdapterEMA:
    """The EMA shadow of named trainable tensors (`TrainableAdapter.named_parameters()`)."""

    def __init__(self, params: Mapping[str, torch.Tensor], decay: float, update_interval: int = 1):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay: must be between 0 and 1 (got {decay})")
        if update_interval < 1:
            raise ValueError(f"ema_update_interval: must be at least 1 (got {update_interval})")
        self.decay, self.update_interval = float(decay), int(update_interval)
        self.shadow = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in params.items()}

    def decay_at(self, step: int) -> float:
        """SimpleTuner's get_decay(step) with update_after_step 0, no EMA warmup and no copy-through steps."""
        s = max(0, step - 1)
        return 0.0 if s <= 0 else min((1 + s) / (10 + s), self.decay)

    @torch.no_grad()
    def update(self, step: int, params: Mapping[str, torch.Tensor]) -> bool:
        """After optimizer step `step` (1-based): fold the adapter in when the interval says so; True if it did."""
        if step % self.update_interval:
            return False
        one_minus = 1.0 - self.decay_at(step)
        for key, shadow in self.shadow.items():
            target = params[key].detach().to("cpu", torch.float32)
            shadow.sub_(one_minus * (shadow - target))
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Put back a saved shadow (a checkpoint's); the keys must be this adapter's trainable tensors."""
        missing, unexpected = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"ema: the saved average does not fit this adapter (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        for key, shadow in self.shadow.items():
            if tuple(state[key].shape) != tuple(shadow.shape):
                raise ValueError(f"ema: {key}: saved shape {tuple(state[key].shape)}, expected {tuple(shadow.shape)}")
            shadow.copy_(state[key])

    @torch.no_grad()
    def saved_form(self, params: Mapping[str, torch.Tensor],
                   state_dict: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The adapter file of the average, as SimpleTuner writes it: the shadow copied into the trained tensors
        (`params`, cast to their dtype), the file taken (`state_dict`: e.g. use_scalar folded as LyCORIS saves
        it; frozen tensors such as alpha are the adapter's own), then the trained values put back."""
        kept = {k: p.detach().to("cpu", copy=True) for k, p in params.items()}
        try:
            for key, param in params.items():
                param.copy_(self.shadow[key])
            return state_dict()
        finally:
            for key, param in params.items():
                param.copy_(kept[key])
