"""What a model family must say so that diffusers-named adapters land on ComfyUI modules.

Adapters (SimpleTuner/LyCORIS files, configs) speak diffusers module paths; ComfyUI's models use
other names and fuse some weights (q/k/v, q/k/v+MLP). A profile gives, for one family:
- how to recognise the family from a ComfyUI `unet_config`;
- the diffusers config of the same architecture, to build a weightless skeleton on `meta`
  (module names and classes, for SimpleTuner-style target resolution);
- a route for every diffusers Linear/Conv: the ComfyUI module and which of its output rows the
  diffusers module's output rows occupy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

# (comfy_row, diffusers_row, count): diffusers output rows [d, d+count) are ComfyUI rows [c, c+count).
RowBlock = tuple[int, int, int]


@dataclass(frozen=True)
class Route:
    """Where one diffusers Linear/Conv weight lives inside ComfyUI's model.

    `comfy_module` is a dotted path under `diffusion_model`. `blocks` is None when the diffusers
    weight is the whole ComfyUI weight in the same row order; otherwise it lists which ComfyUI
    output rows the diffusers rows occupy (a slice of a fused q/k/v weight, or a permutation such
    as Flux's swapped final modulation halves). Bias rows follow the same blocks.
    """

    comfy_module: str
    blocks: tuple[RowBlock, ...] | None = None

    @staticmethod
    def rows(comfy_module: str, start: int, count: int) -> Route:
        """The diffusers weight is ComfyUI rows [start, start+count) of a fused weight."""
        return Route(comfy_module, ((start, 0, count),))

    def comfy_rows(self) -> list[tuple[int, int]]:
        """ComfyUI row ranges covered, as (start, stop); empty list means all rows."""
        return [] if self.blocks is None else [(c, c + n) for c, _, n in self.blocks]


class FamilyProfile(ABC):
    """One model family (Flux 1, Flux 2, SDXL). Stateless; every method is a pure function."""

    name: str  # 'flux1', 'flux2', 'sdxl'
    display_name: str
    diffusers_class: str  # e.g. 'Flux2Transformer2DModel'
    suggested_targets: tuple[str, ...] = ()  # target_module classes to propose when a config matches nothing

    @abstractmethod
    def matches(self, unet_config: dict) -> bool:
        """True if a ComfyUI model with this `unet_config` belongs to the family."""

    @abstractmethod
    def diffusers_config(self, unet_config: dict) -> dict:
        """Keyword arguments for the diffusers class describing the same architecture."""

    @abstractmethod
    def routes(self, unet_config: dict) -> dict[str, Route]:
        """Diffusers module path of every Linear/Conv -> its Route in ComfyUI."""

    @abstractmethod
    def convert_state_dict(self, diffusers_sd: dict[str, torch.Tensor], unet_config: dict) -> dict[str, torch.Tensor]:
        """A diffusers state dict as ComfyUI `diffusion_model` keys (all parameters, not only Linear)."""

    def build_skeleton(self, unet_config: dict, device: str | torch.device = "meta") -> torch.nn.Module:
        """The diffusers model of this architecture; on `meta` it has names and classes, no weights."""
        import diffusers

        cls = getattr(diffusers, self.diffusers_class)
        with torch.device(device):
            return cls(**self.diffusers_config(unet_config))


def place_rows(route: Route, comfy: torch.Tensor, diffusers: torch.Tensor) -> None:
    """Write a diffusers weight (or bias) into the ComfyUI tensor at the route's rows, in place."""
    if route.blocks is None:
        if comfy.shape != diffusers.shape:
            raise ValueError(f"{route.comfy_module}: shape {tuple(diffusers.shape)} does not fit {tuple(comfy.shape)}")
        comfy.copy_(diffusers)
        return
    for c, d, n in route.blocks:
        comfy[c : c + n].copy_(diffusers[d : d + n])


def take_rows(route: Route, comfy: torch.Tensor) -> torch.Tensor:
    """The diffusers weight (or bias) a route describes, cut out of the ComfyUI tensor."""
    if route.blocks is None:
        return comfy
    out_rows = sum(n for _, _, n in route.blocks)
    out = comfy.new_empty((out_rows, *comfy.shape[1:]))
    for c, d, n in route.blocks:
        out[d : d + n] = comfy[c : c + n]
    return out
