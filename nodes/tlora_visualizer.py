"""T-LoRA Mask Visualizer: which ranks a T-LoRA adapter uses at each timestep / sampler step."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io, ui

from ..core import host
from ..core.mask_plot import Schedule, parse_alphas, render_mask_plot
from ..core.tlora import DEFAULT_ALPHA, DEFAULT_MIN_RANK
from .types import CATEGORY, LycorisConfig


def _config_params(config) -> tuple[int, int, float]:
    """rank, min_rank, alpha of a T-LoRA config; ValueError for any other algorithm."""
    algo = getattr(config, "algo", None)
    if algo != "tlora":
        raise ValueError(f"config: algo is '{algo}'; the rank mask exists only for algo 'tlora'")
    rank = getattr(config, "linear_dim", None)
    if rank is None:
        raise ValueError("config: has no linear_dim (the T-LoRA rank)")
    min_rank = getattr(config, "tlora_min_rank", None)
    alpha = getattr(config, "tlora_alpha", None)
    return int(rank), DEFAULT_MIN_RANK if min_rank is None else int(min_rank), \
        DEFAULT_ALPHA if alpha is None else float(alpha)


def _schedule(model, scheduler: str, steps: int, denoise: float) -> Schedule:
    """The steps KSampler would run for this model: sigma and T-LoRA timestep of each."""
    sigmas = host.sampler_sigmas(model, scheduler, steps, denoise)[:-1]  # the last sigma (0) is not evaluated
    if len(sigmas) == 0:
        raise ValueError(f"denoise: {denoise} leaves no sampler steps")
    timesteps = host.sigma_timesteps(model, sigmas)
    return Schedule(tuple(timesteps.tolist()), tuple(float(s) for s in sigmas),
                    label=f"{scheduler}, {steps} steps, denoise {denoise:g} (index above)")


class TLoraMaskVisualizer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisTLoraMaskVisualizer",
            display_name="T-LoRA Mask Visualizer",
            category=CATEGORY,
            description=(
                "Shows which ranks a T-LoRA adapter uses at each timestep: a heatmap (ranks as rows, rank 0 at "
                "the bottom; timesteps 0..1000 as columns) with the active-rank curve r(t) per alpha, and a table. "
                "Connect a MODEL to mark the steps its sampler schedule runs."
            ),
            inputs=[
                io.Int.Input("rank", default=64, min=1, max=4096,
                             tooltip="T-LoRA rank R (linear_dim): ranks active at t = 0. Ignored when a config is connected."),
                io.Int.Input("min_rank", default=1, min=0, max=4096,
                             tooltip="Ranks still active at t = 1000 (tlora_min_rank). Ignored when a config is connected."),
                io.Float.Input("alpha", default=1.0, min=0.0, max=16.0, step=0.05,
                               tooltip="Schedule exponent (tlora_alpha): 1 linear, above 1 keeps noisy steps to "
                                       "fewer ranks. Lights the heatmap. Ignored when a config is connected."),
                io.String.Input("compare_alphas", default="",
                                tooltip="Extra alphas to overlay as curves, comma separated (e.g. \"0.5, 2\"); up to 4."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple",
                               tooltip="Scheduler whose steps are marked (only used with a MODEL connected)."),
                io.Int.Input("steps", default=20, min=1, max=1000,
                             tooltip="Sampler steps, as in KSampler (only used with a MODEL connected)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoise, as in KSampler: below 1 only the last, less noisy steps run."),
                io.Int.Input("width", default=768, min=320, max=4096, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=256, max=4096, step=8, tooltip="Image height in pixels."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: the model to sample with; its sampling (flow or discrete) "
                                       "and scheduler give the steps marked on the plot."),
                LycorisConfig.Input("config", optional=True,
                                    tooltip="Optional T-LoRA config: its linear_dim, tlora_min_rank and "
                                            "tlora_alpha replace rank, min_rank and alpha."),
            ],
            outputs=[
                io.Image.Output("image", tooltip="The mask heatmap (also shown on the node)."),
                io.String.Output("table",
                                 tooltip="Per step (or every 50 timesteps): sigma, timestep, active ranks per alpha."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, rank, min_rank, alpha, compare_alphas, scheduler, steps, denoise, width, height,
                model=None, config=None) -> io.NodeOutput:
        try:
            if config is not None:
                rank, min_rank, alpha = _config_params(config)
            alphas = [alpha, *parse_alphas(compare_alphas)]
            schedule = None if model is None else _schedule(model, scheduler, steps, denoise)
            plot = render_mask_plot(rank, min_rank, alphas, schedule, width, height)
        except ValueError as err:
            raise ValueError(f"T-LoRA Mask Visualizer: {err}") from None
        # lycoris_mask: what ran, so the node's live plot shows the same values and marks these steps
        ran = {"rank": rank, "min_rank": min_rank, "alpha": alpha, "from_config": config is not None,
               "timesteps": list(schedule.timesteps) if schedule else [], "scheduler": scheduler, "steps": steps,
               "denoise": denoise}
        return io.NodeOutput(plot.image, plot.table, ui=_MaskPreview(plot.image, ran, cls))


class _MaskPreview(ui.PreviewImage):
    """The heatmap shown on the node, plus `lycoris_mask`: what ran, for the node's live plot (web/)."""

    def __init__(self, image, ran: dict, cls):
        super().__init__(image, cls=cls)
        self.ran = ran

    def as_dict(self) -> dict:
        return {**super().as_dict(), "lycoris_mask": [self.ran]}


NODES = [TLoraMaskVisualizer]
