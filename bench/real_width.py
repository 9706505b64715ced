"""Rows at real layer width (issue 16): `--only real_width`, row names ending in `_real_width`.

The model: Flux 1 at its real width (hidden 3072, 24 heads, T5 4096 / CLIP 768 inputs) with one
double and one single block (545 M parameters), the layout and seeded values of
`scripts/model_files.py` (what the integration tests load from a file), built through ComfyUI's
own detection and model class. Weights and compute in bf16 where the CPU has bf16 matmul
(`torch.ops.mkldnn._is_mkldnn_bf16_supported`), else fp32: ComfyUI's loader would keep bf16
weights but cast them to fp32 for every layer on a CPU, so the model is built with bf16 compute
directly. Inputs: a 64x64 Flux 1 latent (1024 image tokens after 2x2 patches, a 512 px image)
and 256 text tokens (ComfyUI's Flux T5 length), batch 1.

- bypass_forward_{lora_r16,lokr_f4_full,loha_r16}_real_width: the forward with the adapter
  applied at strength 1 (this pack's bypass) vs the base forward, on two copies of the model (the
  base copy never carries hooks), paired and alternated. Adapters are files LyCORIS itself writes
  on the diffusers twin (built on `meta`): LoRA r16 / LoHa r16 (alpha 8) and LoKr factor 4 full
  matrix, on every Linear of the blocks (FluxAttention, FeedForward, single-block proj_mlp/proj_out).
- train_step_flux1_lokr_real_width: `trainer.loop.training_step` (the function the loop runs,
  AdamW and clipping included, exact gradient checkpointing), preset `flux1_lokr`, vs the base
  model's checkpointed forward + backward (frozen weights, inputs requiring grad), as
  bench/train_cases.py measures them.
- train_peak_memory_flux1_lokr_real_width: that step's peak of torch CPU tensor bytes (gradients
  left out, as train_peak_memory_flux2_lokr) vs the base fwd+bwd's peak; weights on neither side.
"""

from __future__ import annotations

import copy
import json
import time

import torch

from comfyui_lycoris.core import api, host
from comfyui_lycoris.core.config import parse_config

from . import adapters, measure, train_cases
from .env import REPO, WORK

MODEL = "flux1-real-width-545M"
LATENT = (16, 64, 64)  # Flux 1: 16 channels, 2x2 patches -> 1024 image tokens
TEXT_TOKENS = 256
SIGMA, GUIDANCE = 0.7, 3.5
BLOCK_TARGETS = {"target_module": ["FluxAttention", "FeedForward"],
                 "target_name": ["single_transformer_blocks\\.\\d+\\.proj_(mlp|out)$"]}
ADAPTERS = {
    "lora_r16": {"algo": "lora", "multiplier": 1.0, "linear_dim": 16, "linear_alpha": 8},
    "lokr_f4_full": {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 4,
                     "full_matrix": True},
    "loha_r16": {"algo": "loha", "multiplier": 1.0, "linear_dim": 16, "linear_alpha": 8},
}


def compute_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def build(dtype: torch.dtype):
    """The 545 M model as a ComfyUI ModelPatcher: detection on the layout, weights from model_files."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import model_files  # scripts/ (on sys.path through bench.env.setup)

    shapes = model_files.flux1_shapes()
    config = comfy.model_detection.model_config_from_unet(model_files.meta_state_dict(shapes), "")
    config.set_inference_dtype(dtype, None)  # compute in `dtype` (no per-layer cast)
    model = config.get_model({}, "")
    with torch.no_grad():
        for key, param in model.diffusion_model.state_dict(keep_vars=True).items():
            param.copy_(model_files.tensor_value(key, shapes[key], 0, dtype))
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def inputs(patcher, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(1234)
    cfg = host.model_unet_config(patcher)
    return dict(x=torch.randn(1, *LATENT, generator=gen), context=torch.randn(1, TEXT_TOKENS, cfg["context_in_dim"],
                                                                               generator=gen),
                y=torch.randn(1, cfg["vec_in_dim"], generator=gen), sigma=torch.full((1,), SIGMA),
                guidance=torch.full((1,), GUIDANCE))


def forward(patcher, inp: dict) -> torch.Tensor:
    """ComfyUI's apply_model with the patcher's wrappers, as a sampler calls it (bench/workload.forward + y)."""
    options = dict(patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = patcher.wrappers
    options["cond_or_uncond"] = [0]
    with torch.no_grad():
        return patcher.model.apply_model(inp["x"], inp["sigma"], c_crossattn=inp["context"], y=inp["y"],
                                         guidance=inp["guidance"], transformer_options=options)


def write_adapter(name: str, unet_config: dict, seed: int = 11):
    """The adapter LyCORIS itself makes on the diffusers twin (on `meta`), random non-zero, saved by LyCORIS."""
    config = parse_config({**ADAPTERS[name], "apply_preset": BLOCK_TARGETS})
    return adapters.write(config, unet_config, WORK / MODEL / f"{name}.safetensors", seed, family="flux1", device="meta")


class Flux1Step(train_cases.OursStep):
    """`train_cases.OursStep` (what run_training does around `training_step`) on a Flux 1 batch."""

    def batch(self, size: tuple[int, int] = LATENT[1:]):
        from comfyui_lycoris.trainer.predict import encode_conditioning, model_space_latents, stack_conditioning
        from comfyui_lycoris.trainer.step import Batch

        if size not in self.items:
            device = torch.device(self.patcher.load_device)
            latent = torch.randn(1, LATENT[0], *size, generator=torch.Generator().manual_seed(4321))
            x0 = model_space_latents(self.patcher.model, latent.to(device))
            conditioning = host.tiny_conditioning(self.patcher, train_cases.CAPTION, TEXT_TOKENS)
            cond = encode_conditioning(self.patcher.model, conditioning, x0, self.spec.guidance)
            self.items[size] = (x0, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in cond.items()})
        x0, cond = self.items[size]
        return Batch(torch.cat([x0]), stack_conditioning([cond]))


def real_width(ctx) -> list[dict]:
    """The `_real_width` rows (once per bench run: the bench's own models play no part here)."""
    import comfy.model_management as mm

    from .workload import MODELS

    if ctx.ours.name != next(iter(MODELS)):
        return []
    dtype = compute_dtype()
    repeats = max(3, ctx.repeats // 3)
    mm.unload_all_models()
    start = time.perf_counter()
    base = build(dtype)
    ours = build(dtype)  # hooks go on this copy only
    unet_config = dict(host.model_unet_config(ours))
    params = sum(p.numel() for p in base.model.diffusion_model.parameters())
    inp = inputs(base, dtype)
    files = {name: write_adapter(name, unet_config) for name in ADAPTERS}
    print(f"[{MODEL}] {params / 1e6:.0f} M params, {dtype}, models and adapters in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    what = (f"Flux 1 at real width (hidden 3072, 24 heads, 1 double + 1 single block, {params / 1e6:.0f} M params), "
            f"{str(dtype).removeprefix('torch.')}, 1024 image + {TEXT_TOKENS} text tokens, batch 1")
    common = dict(dtype=str(dtype).removeprefix("torch."), params=params)
    rows = []
    for name, path in files.items():
        adapter = api.load_adapter(path, ours)
        clone = api.apply(ours, adapter, 1.0)
        mm.load_models_gpu([clone])
        diff = float((forward(clone, inp) - forward(base, inp)).abs().max())
        a, b = measure.paired_times(lambda i, c=clone: forward(c, inp), lambda i: forward(base, inp), repeats,
                                    warmup=1)
        adapter_params = sum(t.numel() for t in api.adapter_tensors(adapter).values())
        row = ctx.row(f"bypass_forward_{name}_real_width", a, "base forward", b,
                      f"{len(adapter.bindings)} block Linear layers (LyCORIS file on the diffusers twin), strength 1, "
                      f"{what}; median of {repeats}", adapter_params=adapter_params, max_abs_change=diff, **common)
        rows.append(row)
        del clone, adapter
        mm.unload_all_models()
    del ours
    rows += training_rows(ctx, base, what, repeats, common)
    for row in rows:
        row["model"] = MODEL
    print(f"[{MODEL}] real_width: {time.perf_counter() - start:.1f} s", flush=True)
    return rows


def training_rows(ctx, base, what: str, repeats: int, common: dict) -> list[dict]:
    import comfy.model_management as mm
    import comfy.model_patcher

    copy_ = comfy.model_patcher.ModelPatcher(copy.deepcopy(base.model), load_device=base.load_device,
                                             offload_device=base.offload_device)
    ours = Flux1Step.build("flux1_lokr", copy_)
    plain = train_cases.BaseStep(base, ours)
    size = LATENT[1:]  # both steps default to the bench's 16x16 latent: pass the real-width size
    times = train_cases.round_robin({"ours": lambda i: ours(i, size=size), "base": lambda i: plain(i, size=size)},
                                    repeats)
    device = torch.device(ours.patcher.load_device)
    ours_peak = train_cases.step_peak(lambda: ours(size=size), device, ours.optimizer)
    base_peak = train_cases.step_peak(lambda: plain(size=size), device)
    mm.unload_all_models()
    trains = ours.trains()
    adapter_bytes = train_cases._bytes(ours.trainable.parameters())
    optimizer_bytes = train_cases._state_bytes(ours.optimizer)
    preset = json.loads((REPO / "configs" / "flux1_lokr.json").read_text())
    ff_factor = preset["apply_preset"]["module_algo_map"]["FeedForward"]["factor"]
    note = (f"trainer.loop.training_step (AdamW step, clipping at 1.0 included), exact checkpointing, preset "
            f"flux1_lokr (LoKr factor {preset['factor']} / FeedForward {ff_factor}, full matrix), "
            f"{trains['modules']} Linear layers, {trains['params']:,} params (float32) vs the base model's "
            f"checkpointed forward + backward (frozen, inputs requiring grad, no optimizer); {what}; "
            f"median of {repeats} after 1 warm-up round")
    return [
        ctx.row("train_step_flux1_lokr_real_width", times["ours"], "base fwd+bwd (checkpointed)", times["base"], note,
                ours_modules=trains["modules"], ours_params=trains["params"], **common),
        ctx.row("train_peak_memory_flux1_lokr_real_width", float(ours_peak.peak_without_grads),
                "base fwd+bwd (checkpointed) peak", float(base_peak.peak),
                "peak torch CPU tensor bytes allocated during one step (every allocation and free, in-op temporaries "
                "included), the adapter's gradients left out, vs the base fwd+bwd's peak; weights, adapter and "
                f"optimizer state alive before the step count on neither side; {what}", unit="bytes",
                peak_bytes=ours_peak.peak + adapter_bytes + optimizer_bytes, step_peak_bytes=ours_peak.peak,
                grad_bytes=ours_peak.grad_bytes, adapter_bytes=adapter_bytes, optimizer_bytes=optimizer_bytes,
                model_weight_bytes=sum(p.numel() * p.element_size() for p in base.model.diffusion_model.parameters()),
                **common),
    ]

