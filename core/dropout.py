"""LyCORIS's dropouts in training, drawn and applied as LyCORIS 4.1.3 applies them (lycoris/modules/*.py).

What a LyCORIS module does while it trains (never at inference, so never here outside training):
- `module_dropout` (every algorithm): `torch.rand(1) < p` and the layer runs its base only;
- `rank_dropout`, rebuild forward (bypass_mode off, SimpleTuner's default): the rows of ΔW are kept
  where `torch.rand(out) > p` (LoRA/LoCon `make_weight`, LoHa / LoKr `get_weight`, full
  `make_weight`, whose bias rows go with them); in bypass mode LoRA/LoCon masks its rank instead
  (`torch.rand(dim) > p` between down and up), LoHa still masks ΔW's rows, LoKr nothing; T-LoRA
  never. `rank_dropout_scale` divides the mask by its mean;
- `dropout`: only in bypass mode, `nn.Dropout(p)` on the module's output delta (LoRA/LoCon, LoHa,
  LoKr, T-LoRA); the rebuild forward never applies it.

A module's draws of one model call come, in that order, from a CPU generator seeded with a number
the job's generator gives (`ModuleDraw.draw`), so a step is reproducible from the job's RNG state
(checkpointed) and a block recomputed by gradient checkpointing sees the same masks: the
element-wise mask is redrawn from the saved generator state, never from a running stream. On a CPU
the stream is LyCORIS's own: `torch.manual_seed(seed)` before a LyCORIS module's forward draws the
same numbers. On an accelerator the element-wise mask is drawn there, from a generator seeded alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LORA_ALGOS = ("lora", "locon")
# Which mask rank_dropout is, per algorithm and forward (None: LyCORIS does not apply it).
_RANK_AXIS = {
    False: {"lora": "rows", "locon": "rows", "loha": "rows", "lokr": "rows", "full": "rows", "tlora": None},
    True: {"lora": "ranks", "locon": "ranks", "loha": "rows", "lokr": None, "full": "rows", "tlora": None},
}
# Algorithms whose bypass forward ends in nn.Dropout(dropout); the rebuild forward of none does.
_ELEMENTWISE = ("lora", "locon", "loha", "lokr", "tlora")


class DropoutError(ValueError):
    """A dropout this trainer cannot apply as LyCORIS does; the message starts with the field."""


@dataclass(frozen=True)
class DropoutSettings:
    """One module's dropouts as its LyCORIS module holds them (`bypass`: its bypass_mode)."""

    algo: str
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = False
    bypass: bool = False

    def __post_init__(self) -> None:
        for name in ("dropout", "rank_dropout"):
            if getattr(self, name) and self.algo not in _RANK_AXIS[False]:
                raise DropoutError(f"{name}: training {self.algo} with {name} is not supported here (LoRA/LoCon, "
                                   "LoHa, LoKr, full and T-LoRA are; module_dropout works with every algorithm)")

    @property
    def rank_axis(self) -> str | None:
        """'rows' (of ΔW), 'ranks' (LoRA's rank in bypass mode) or None: what rank_dropout masks."""
        return _RANK_AXIS[self.bypass].get(self.algo) if self.rank_dropout else None

    @property
    def elementwise(self) -> float:
        """The nn.Dropout probability LyCORIS applies to this module's delta (0: none)."""
        return self.dropout if self.bypass and self.algo in _ELEMENTWISE else 0.0

    @property
    def active(self) -> bool:
        return bool(self.module_dropout or self.rank_axis or self.elementwise)

    def unapplied(self) -> list[str]:
        """Settings LyCORIS accepts for this module but does not apply (said as a warning)."""
        notes = []
        if self.dropout and not self.elementwise:
            notes.append("dropout: LyCORIS applies it only in bypass_mode (nn.Dropout on the delta); "
                         f"{self.algo} in its rebuild forward trains without it, as in SimpleTuner")
        if self.rank_dropout and not self.rank_axis:
            mode = "bypass mode" if self.bypass else "training"
            notes.append(f"rank_dropout: LyCORIS's {self.algo} module does not apply it in {mode}")
        return notes


@dataclass(eq=False)
class ModuleDraw:
    """One module's dropouts for one model call. `dropped`: module dropout hit (base only)."""

    seed: int
    settings: DropoutSettings
    dropped: bool = False
    rows: torch.Tensor | None = None  # [out]: ΔW rows kept (bool, CPU)
    ranks: torch.Tensor | None = None  # [dim]: ranks kept (bool, CPU)
    _state: torch.Tensor | None = None  # the generator's state after those draws

    @classmethod
    def draw(cls, settings: DropoutSettings, seed: int, out_features: int, rank: int | None) -> ModuleDraw:
        """The draws of LyCORIS's forward, in its order: module dropout, then the rank mask."""
        gen = torch.Generator().manual_seed(seed)
        made = cls(seed, settings)
        if settings.module_dropout and torch.rand(1, generator=gen) < settings.module_dropout:
            made.dropped = True
            return made
        axis = settings.rank_axis
        if axis is not None:
            if axis == "ranks" and rank is None:
                raise DropoutError(f"rank_dropout: {settings.algo} module without a rank")
            size = out_features if axis == "rows" else rank
            setattr(made, axis, torch.rand(size, generator=gen) > settings.rank_dropout)
        if settings.elementwise:
            made._state = gen.get_state()
        return made

    def mask(self, kept: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A rank / row mask in like's dtype and device, divided by its mean with rank_dropout_scale (in that
        dtype, as LyCORIS does; every entry dropped gives NaN there too)."""
        mask = kept.to(device=like.device, dtype=like.dtype)
        return mask / mask.mean() if self.settings.rank_dropout_scale else mask

    @property
    def changes_output(self) -> bool:
        """Whether the delta differs from the undropped one (then it takes the runtime's delta path)."""
        return self.rows is not None or self.ranks is not None or self._state is not None

    def apply(self, delta: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """The delta (strength applied; ranks already masked) with the row mask and nn.Dropout applied."""
        if self.rows is not None:
            shape = [1] * delta.ndim
            shape[channel_dim] = -1
            delta = delta * self.mask(self.rows, delta).view(shape)
        p = self.settings.elementwise
        if p:
            if delta.device.type == "cpu":
                gen = torch.Generator()
                gen.set_state(self._state)
            else:
                gen = torch.Generator(device=delta.device).manual_seed(self.seed)
            keep = torch.empty_like(delta).bernoulli_(1 - p, generator=gen)
            delta = delta * keep.div_(1 - p)
        return delta
