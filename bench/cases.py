"""The timed benchmarks of the issue "Adapter runtime": each returns result rows (see report.py).

Two identical models (same seed) are used: `ctx.ours` carries this pack's adapters, `ctx.core`
gets ComfyUI core's LoRA and is the pristine base (no hooks ever installed) for "base forward".
Both stay loaded side by side, so alternating timings never charge one side the other's unpatch.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from comfyui_lycoris.core import api

from . import measure
from .workload import Workload, forward

SWEEP = (0.0, 0.33, 0.66, 1.0)
STRENGTHS = (0.25, 0.75, 0.5, 1.0, 0.1, 0.9)  # strength changes cycle through these
BYPASS_ADAPTERS = ("lora_r16", "lokr_f4_full", "loha_r16")
CORE_FILE = "lora_r16_attn"  # the LoRA both sides load (core maps only these layers; see core_coverage)


@dataclass
class Context:
    ours: Workload
    core: Workload  # the same model again, for ComfyUI core and the base forward
    files: dict[str, Path]  # adapter name -> LyCORIS file
    repeats: int
    checks: list[dict] = field(default_factory=list)  # target verdicts, printed after the table

    def row(self, name: str, ours: float | measure.Times, baseline: str, base: float | measure.Times, note: str,
            **extra) -> dict:
        """A result row; given Times, the wall-clock medians, with CPU-time medians and minimums as extras."""
        if isinstance(ours, measure.Times):
            med = statistics.median
            extra.update(ours_cpu_s=med(ours.cpu), baseline_cpu_s=med(base.cpu), ratio_cpu=med(ours.cpu) / med(base.cpu),
                         ours_min_s=min(ours.wall), baseline_min_s=min(base.wall),
                         ratio_min=min(ours.wall) / min(base.wall), repeats=len(ours.wall))
            ours, base = med(ours.wall), med(base.wall)
        ratio = ours / base if base else (float("inf") if ours else 0.0)
        return dict(name=name, ours_s=ours, baseline=baseline, baseline_s=base, ratio=ratio,
                    model=self.ours.name, note=note, **extra)

    def check(self, target: str, passed: bool, detail: str) -> None:
        self.checks.append(dict(model=self.ours.name, target=target, passed=bool(passed), detail=detail))

    def core_lora(self) -> dict:
        """The LoRA file as core's LoraLoaderModelOnly holds it (read once, cached by the node)."""
        import comfy.utils

        return comfy.utils.load_torch_file(str(self.files[CORE_FILE]), safe_load=True)


def unload_all() -> None:
    import comfy.model_management as mm

    mm.unload_all_models()


def core_apply(base, lora_sd: dict, strength: float):
    """ComfyUI core's LoraLoaderModelOnly at `strength`, then the sampler's load (where it patches)."""
    import comfy.model_management as mm
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(base, None, lora_sd, strength, 0)
    mm.load_models_gpu([patched])
    return patched


def ours_apply(base, adapter, strengths: tuple[float, ...]):
    """This pack's Apply (or A/B sweep) at `strengths`, then the same sampler-side load core gets."""
    import comfy.model_management as mm

    clone = api.apply_sweep(base, adapter, strengths)
    mm.load_models_gpu([clone])
    return clone


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def core_coverage(ctx: Context) -> str:
    """How many of a file's modules ComfyUI core maps (0.3.75 maps Flux 1 diffusers names only)."""
    import comfy.lora
    from safetensors import safe_open

    key_map = set(comfy.lora.model_lora_keys_unet(ctx.core.patcher.model, {}))
    parts = []
    for name in ("lora_r16", CORE_FILE):
        with safe_open(str(ctx.files[name]), "pt") as f:
            modules = {k.split(".")[0] for k in f.keys()}
        parts.append(f"{len(modules & key_map)}/{len(modules)} modules of {name}")
    return "core maps " + ", ".join(parts)


def twins_agree(ctx: Context) -> None:
    inputs = ctx.ours.inputs(1)
    same = torch.equal(forward(ctx.ours.patcher, inputs), forward(ctx.core.patcher, inputs))
    ctx.check("the two model copies are identical", same, "base outputs bit-equal" if same else "outputs differ")


# -- 1. bypass forward vs base forward --------------------------------------------------------

def bypass_forward(ctx: Context) -> list[dict]:
    unload_all()
    twins_agree(ctx)
    inputs, plain = ctx.ours.inputs(1), ctx.core.patcher
    rows = []
    for name in BYPASS_ADAPTERS:
        adapter = api.load_adapter(ctx.files[name], ctx.ours.patcher)
        clone = api.apply(ctx.ours.patcher, adapter, 1.0)
        ours, base = measure.paired_times(lambda i, c=clone: forward(c, inputs), lambda i: forward(plain, inputs),
                                          ctx.repeats, warmup=2)
        limit = 1.15 if name == "lora_r16" else 1.3
        rows.append(ctx.row(f"bypass_forward_{name}", ours, "base forward", base,
                            f"{len(adapter.bindings)} block Linear layers, strength 1, batch 1 (the runtime picks "
                            "per layer: delta product or weight rebuilt for the call)", target=f"<= {limit}"))
        ratio = rows[-1]["ratio"]
        ctx.check(f"{name} applied (no merge) <= {limit}x base forward", ratio <= limit,
                  f"{ratio:.3f}x wall-clock median ({rows[-1]['ratio_cpu']:.3f}x in CPU time)")
    # The base model of `ours` now carries this pack's (inert) hooks on every adapted layer.
    ours, base = measure.paired_times(lambda i: forward(ctx.ours.patcher, inputs), lambda i: forward(plain, inputs),
                                      ctx.repeats, warmup=1)
    rows.append(ctx.row("inert_hooks_forward", ours, "base forward", base,
                        "the base model after adapters were applied to clones of it (hooks installed, none active)"))
    return rows


# -- 2. strength change -> finished forward ----------------------------------------------------

def strength_change(ctx: Context) -> list[dict]:
    unload_all()
    inputs, lora_sd = ctx.ours.inputs(1), ctx.core_lora()
    adapter = api.load_adapter(ctx.files[CORE_FILE], ctx.ours.patcher)

    def core(i):
        return forward(core_apply(ctx.core.patcher, lora_sd, STRENGTHS[i % len(STRENGTHS)]), inputs)

    def ours(i):
        return forward(ours_apply(ctx.ours.patcher, adapter, (STRENGTHS[i % len(STRENGTHS)],)), inputs)

    ours_s, core_s = measure.paired_times(ours, core, ctx.repeats, warmup=1)

    # What each writes into its model's weights per strength change (untimed).
    unload_all()
    fingerprints = {side: measure.weight_fingerprint(w.patcher.model.diffusion_model)
                    for side, w in (("ours", ctx.ours), ("core", ctx.core))}
    written = {"ours": 0, "core": 0}
    for i in range(3):
        out_ours, out_core = ours(i), core(i)
        for side, w in (("ours", ctx.ours), ("core", ctx.core)):
            module = w.patcher.model.diffusion_model
            written[side] = max(written[side], measure.bytes_written(module, fingerprints[side]))
    unload_all()
    restored = measure.bytes_written(ctx.core.patcher.model.diffusion_model, fingerprints["core"]) == 0
    agree = rel_diff(out_ours, out_core)
    ctx.check("strength change writes zero weight bytes", written["ours"] == 0,
              f"ours {written['ours']} B, core {written['core']} B per change; core's unpatch restores: {restored}")
    ctx.check("ours == core output (attention LoRA r16)", agree < 1e-4, f"max rel diff {agree:.2e}")
    return [
        ctx.row("strength_change_forward", ours_s, "core LoraLoaderModelOnly", core_s,
                f"apply + load_models_gpu + forward at a new strength; {core_coverage(ctx)}"),
        ctx.row("strength_change_weight_bytes", float(written["ours"]), "core LoraLoaderModelOnly",
                float(written["core"]), "bytes of base weights rewritten per strength change", unit="bytes",
                target="ours == 0"),
    ]


# -- 3. a 4-strength sweep in one batch vs four core runs ------------------------------------

def sweep(ctx: Context) -> list[dict]:
    unload_all()
    one, four, lora_sd = ctx.ours.inputs(1), ctx.ours.inputs(len(SWEEP)), ctx.core_lora()
    adapter = api.load_adapter(ctx.files[CORE_FILE], ctx.ours.patcher)

    def core(i):
        return [forward(core_apply(ctx.core.patcher, lora_sd, s), one) for s in SWEEP]

    def ours(i):
        return forward(ours_apply(ctx.ours.patcher, adapter, SWEEP), four)

    ours_s, core_s = measure.paired_times(ours, core, max(3, ctx.repeats // 2), warmup=1)
    diff = max(rel_diff(a, b[0]) for a, b in zip(ours(0), core(0), strict=True))
    unload_all()
    ctx.check("sweep sample i == core run at strength i", diff < 1e-4, f"max rel diff {diff:.2e}")
    return [ctx.row("sweep_4_strengths", ours_s, "4 core runs", core_s,
                    f"apply_sweep {SWEEP} + one batch-4 forward vs 4 x (core LoRA + load + batch-1 forward)")]


# -- 4. per-block strengths and schedules: four looks in one batch ----------------------------

def _variants(adapter) -> list[api.Variant]:
    """Full, double blocks only, single blocks only, and the adapter over the first 40% of the steps only."""
    return [api.Variant("full"), api.Variant("double blocks only", blocks={"single_blocks.*": 0.0}),
            api.Variant("single blocks only", blocks={"double_blocks.*": 0.0}),
            api.Variant("early steps", schedule=[(0.0, 1.0), (0.4, 1.0), (0.41, 0.0), (1.0, 0.0)])]


def variants(ctx: Context) -> list[dict]:
    """Four variants in one batch vs four core runs re-patching the same file; block changes write nothing."""
    import comfy.model_management as mm

    unload_all()
    one, four, lora_sd = ctx.ours.inputs(1), ctx.ours.inputs(4), ctx.core_lora()
    adapter = api.load_adapter(ctx.files["lora_r16"], ctx.ours.patcher)  # double and single blocks
    looks = _variants(adapter)

    def core(i):  # core has no per-block strength: four re-patches (of the attention file it maps) per look
        return [forward(core_apply(ctx.core.patcher, lora_sd, 1.0 - 0.1 * k), one) for k in range(4)]

    def ours(i):
        clone = api.apply_variants(ctx.ours.patcher, adapter, looks)
        mm.load_models_gpu([clone])
        return forward(clone, four)

    ours_s, core_s = measure.paired_times(ours, core, max(3, ctx.repeats // 2), warmup=1)
    # Each sample equals its variant applied alone (untimed).
    batch = ours(0)
    diffs = []
    for k, look in enumerate(looks):
        alone = api.apply(ctx.ours.patcher, adapter, look.strength, blocks=look.blocks, schedule=look.schedule)
        mm.load_models_gpu([alone])
        diffs.append(rel_diff(batch[k : k + 1], forward(alone, four)[k : k + 1]))
    ctx.check("variant sample k == variant k applied alone", max(diffs) < 1e-4, f"max rel diff {max(diffs):.2e}")
    # Changing block strengths writes no weight (untimed).
    unload_all()
    before = measure.weight_fingerprint(ctx.ours.patcher.model.diffusion_model)
    written = 0
    for blocks in ({"double_blocks.*": 0.5}, {"single_blocks.*": 0.25, "*": 1.5}, None):
        clone = api.apply(ctx.ours.patcher, adapter, 1.0, blocks=blocks)
        mm.load_models_gpu([clone])
        forward(clone, one)
        written = max(written, measure.bytes_written(ctx.ours.patcher.model.diffusion_model, before))
    core_written = _core_bytes_written(ctx, lora_sd)
    unload_all()
    return [
        ctx.row("sweep_4_variants", ours_s, "4 core runs", core_s,
                "apply_variants (full / double only / single only / early-steps schedule) + one batch-4 forward vs "
                "4 x (core LoRA re-patch + load + batch-1 forward)"),
        ctx.row("block_strength_change_weight_bytes", float(written), "core LoraLoaderModelOnly",
                float(core_written), "bytes of base weights rewritten per block-strength change", unit="bytes",
                target="ours == 0"),
    ]


def _core_bytes_written(ctx: Context, lora_sd: dict) -> int:
    """What one core re-patch writes into the model's weights."""
    unload_all()
    before = measure.weight_fingerprint(ctx.core.patcher.model.diffusion_model)
    forward(core_apply(ctx.core.patcher, lora_sd, 0.5), ctx.core.inputs(1))
    return measure.bytes_written(ctx.core.patcher.model.diffusion_model, before)
