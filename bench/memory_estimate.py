"""Issue #11 item 7, "show the user what training will need": the estimate against the measured peak.

`core.memory_estimate.estimate_training_memory` predicts the peak bytes of one training step from
the model's config alone. Here the same step is run for real, exactly as a job runs it
(`trainer.loop.training_step`: noise, forward through `ComfyPredictor` with the trainable adapter,
loss, backward under the trainer's memory mode, clipping, AdamW step), and its peak is measured:
the tensors alive before the step (model weights, adapter, optimizer state, the encoded batch)
plus the highest tensor bytes the step adds (`measure.peak_tensor_bytes`: every CPU allocation and
free, temporaries inside ops included; `torch.cuda.max_memory_allocated` on CUDA). One warm-up
step runs first, so the optimizer state exists, as it does from the second step of a job on.

Rows (unit bytes): `train_memory_estimate_flux2_lokr` (checkpointing on, the default) and
`train_memory_estimate_flux2_lokr_no_ckpt`: ours = the estimate, baseline = the measured peak.
Target: the estimate within 15% of the measurement.

`python -m bench.memory_estimate` prints the estimate for the real models at 1024² (Flux 2 dev,
Flux 2 Klein 4B, Flux 1 dev, SDXL; bf16 and fp8 weights, with and without checkpointing): nothing
is allocated, every figure comes from the configs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from .env import REPO

# The pack's modules are imported inside the functions: `python -m bench.memory_estimate` runs
# this file before bench.env.setup has made them importable.

PRESET = "flux2_lokr"
CAPTION = "a photo of a red cube on a wooden table"
TEXT_TOKENS = 32  # as the other benchmarks; Flux 2 pads to 512
TOLERANCE = 0.15


@dataclass
class TrainingStep:
    """One job step of `preset` on `patcher`, set up by `trainer.loop.prepare` as a job sets it up."""

    patcher: Any
    plan: Any
    unet_config: dict
    trainable: Any
    optimizer: torch.optim.Optimizer
    objective: Any
    predict: Any
    batch: Any
    generator: torch.Generator
    pixels: tuple[int, int]  # (width, height) of the image the latent stands for
    text_tokens: int

    @classmethod
    def build(cls, patcher: Any, preset: str, latent_hw: tuple[int, int], batch: int = 1,
              text_tokens: int = TEXT_TOKENS) -> TrainingStep:
        from comfyui_lycoris.core import host
        from comfyui_lycoris.trainer.loop import prepare
        from comfyui_lycoris.trainer.predict import encode_conditioning, model_space_latents, stack_conditioning
        from comfyui_lycoris.trainer.spec import JobSpec
        from comfyui_lycoris.trainer.step import Batch

        spec = JobSpec(config_json=(REPO / "configs" / f"{preset}.json").read_text())
        setup = prepare(spec, patcher)
        channels, pixels_per_cell = host.latent_layout(patcher)
        latent = torch.randn(batch, channels, *latent_hw, generator=torch.Generator().manual_seed(4321))
        x0 = model_space_latents(patcher.model, latent.to(setup.device))
        cond = encode_conditioning(patcher.model, host.tiny_conditioning(patcher, CAPTION, text_tokens), x0,
                                   spec.guidance)
        tokens = cond["c_crossattn"].shape[1]  # after the model's own padding (Flux 2: 512)
        return cls(patcher, setup.trainable.plan, dict(host.model_unet_config(patcher)), setup.trainable,
                   setup.optimizer, setup.objective, setup.predict, Batch(x0, stack_conditioning([cond])),
                   setup.generator, (latent_hw[1] * pixels_per_cell, latent_hw[0] * pixels_per_cell), int(tokens))

    def run(self, checkpointing: bool) -> None:
        from comfyui_lycoris.core import host
        from comfyui_lycoris.trainer.loop import training_step

        host.prepare_for_training(self.patcher)
        result = training_step(self.predict, self.objective, [self.batch], self.optimizer, self.generator,
                               checkpointing=checkpointing, max_grad_norm=1.0)
        if not result.finite:
            raise RuntimeError(f"training step: {result.message}")

    def resident_bytes(self) -> int:
        """Tensors alive between steps: weights, adapter, optimizer state, the encoded batch."""
        from . import measure

        state = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return sum(measure.storages(self.patcher.model.diffusion_model, self.trainable.parameters(), state,
                                    self.batch.latents, self.batch.cond).values())

    def measure(self, checkpointing: bool) -> tuple[int, int]:
        """(resident bytes, peak bytes the step adds) of a step after a warm-up step."""
        from . import measure

        self.run(checkpointing)
        resident = self.resident_bytes()
        peak, _ = measure.peak_tensor_bytes(lambda: self.run(checkpointing), torch.device(self.patcher.load_device))
        return resident, peak

    def estimate(self, checkpointing: bool, attention: str | None = None):
        """The `core.memory_estimate.MemoryEstimate` of this very step."""
        from comfyui_lycoris.core.memory_estimate import estimate_training_memory

        dtype = str(next(self.patcher.model.diffusion_model.parameters()).dtype)
        return estimate_training_memory(self.unet_config, self.plan, width=self.pixels[0], height=self.pixels[1],
                                        batch=int(self.batch.latents.shape[0]), checkpointing=checkpointing,
                                        optimizer="adamw", weight_dtype=dtype, compute_dtype=dtype,
                                        train_dtype=str(self.trainable.parameters()[0].dtype),
                                        text_tokens=self.text_tokens, attention=attention or comfy_attention())


def comfy_attention() -> str:
    """'sdpa' or 'sub_quad': what the running ComfyUI's attention saves for backward."""
    import comfy.ldm.flux.math as flux_math

    from comfyui_lycoris.core.memory_estimate import attention_kind

    return attention_kind(getattr(flux_math.optimized_attention, "__name__", ""))


def memory_estimate(ctx) -> list[dict]:
    """Rows for `ctx.ours.name`'s model (`ctx`: cases.Context; rows and checks go there)."""
    import comfy.model_management as mm

    from .workload import LATENT, build

    mm.unload_all_models()
    rows = []
    for checkpointing, suffix in ((True, ""), (False, "_no_ckpt")):
        step = TrainingStep.build(build(ctx.ours.name).patcher, PRESET, LATENT[1:])  # a fresh model per side
        resident, added = step.measure(checkpointing)
        measured = resident + added
        est = step.estimate(checkpointing)
        name = f"train_memory_estimate_{PRESET}{suffix}"
        mode = "checkpointing on" if checkpointing else "checkpointing off"
        rows.append(ctx.row(
            name, float(est.peak_bytes), "measured peak of the training step", float(measured),
            f"core.memory_estimate for {PRESET}, {mode}, {step.pixels[0]}x{step.pixels[1]} px "
            f"({est.image_tokens} image + {est.text_tokens} text tokens), batch 1, fp32, AdamW, attention "
            f"{est.attention}; measured: resident {resident} B + the step's peak {added} B (trainer.loop.training_step)",
            unit="bytes", target=f"within {TOLERANCE:.0%}", estimate_terms={t.name: t.bytes for t in est.terms()},
            estimate_phase=est.peak_phase, measured_resident_bytes=resident, measured_step_peak_bytes=added))
        error = est.peak_bytes / measured - 1
        ctx.check(f"training memory estimate within {TOLERANCE:.0%} ({mode})", abs(error) <= TOLERANCE,
                  f"estimate {est.peak_bytes / 2**20:.1f} MiB vs measured {measured / 2**20:.1f} MiB ({error:+.1%})")
        mm.unload_all_models()
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the estimate for the real models (no model is built: configs only)."""
    from .env import setup

    setup(2)
    from comfyui_lycoris.core.memory_estimate import reference_table

    print(reference_table())
    print()
    print(reference_table(weight_dtype="float8_e4m3fn"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
