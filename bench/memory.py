"""Memory added by applying an adapter: bytes kept alive, and the peak during a forward.

Both in bytes of torch tensors (exact, unlike the process RSS, which the allocator blurs).
"Kept" is what the applied model holds beyond its base between runs (distinct storages reachable
from the ModelPatcher). "Peak" is the adapter's resident tensors plus the highest tensor bytes
alive during apply + load + forward, minus the same peak of a plain base forward: what a run
needs on top of the base model at its worst moment.
"""

from __future__ import annotations

from pathlib import Path

from comfyui_lycoris.core import api

from . import measure
from .cases import BYPASS_ADAPTERS, CORE_FILE, Context, core_apply, ours_apply, unload_all
from .workload import forward


def _file_bytes(path: Path) -> int:
    """Bytes of the tensors stored in an adapter file."""
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for t in load_file(str(path)).values())


def _kept(base, apply, inputs) -> int:
    """Bytes the applied clone keeps alive beyond its base (after a load and a forward)."""
    unload_all()
    before = measure.patcher_storages(base)
    clone = apply()
    forward(clone, inputs)
    added = measure.added_bytes(measure.patcher_storages(clone), before)
    unload_all()
    return added


def _resident(adapter) -> int:
    return sum(measure.storages(adapter).values())


def _largest_layer_bytes(patcher, adapter) -> int:
    """Bytes of the largest base weight the adapter adapts: the issue's transient allowance is the
    adapter plus one adapted layer's weight (a rebuilt window of W' and LoHa's block of ΔW)."""
    root = patcher.model.diffusion_model
    weights = (root.get_submodule(path).weight for path in adapter.by_comfy_module())
    return max(w.numel() * w.element_size() for w in weights)


def _peak(apply, inputs, resident: int, base_peak: int) -> int:
    unload_all()
    peak, _ = measure.peak_tensor_bytes(lambda: forward(apply(), inputs))
    unload_all()
    return resident + peak - base_peak


def memory(ctx: Context) -> list[dict]:
    inputs, lora_sd = ctx.ours.inputs(1), ctx.core_lora()
    ours_base, core_base = ctx.ours.patcher, ctx.core.patcher
    adapters = {name: api.load_adapter(ctx.files[name], ours_base) for name in (*BYPASS_ADAPTERS, CORE_FILE)}
    unload_all()
    base_peak, _ = measure.peak_tensor_bytes(lambda: forward(core_base, inputs))


    def core_apply1():
        return core_apply(core_base, lora_sd, 1.0)

    def ours_apply1(name: str):
        return lambda: ours_apply(ours_base, adapters[name], (1.0,))

    kept_note = "tensor bytes the applied model keeps alive beyond its base"
    peak_note = "resident adapter + peak tensor bytes of apply + load + forward - base forward's peak"
    lora_bytes = sum(t.numel() * t.element_size() for t in lora_sd.values())
    rows = [
        ctx.row(f"kept_memory_{CORE_FILE}", float(_kept(ours_base, ours_apply1(CORE_FILE), inputs)),
                "core LoraLoaderModelOnly", float(_kept(core_base, core_apply1, inputs)),
                kept_note + " (core: its LoRA + patched weight copies)", unit="bytes"),
        ctx.row(f"peak_memory_{CORE_FILE}",
                float(_peak(ours_apply1(CORE_FILE), inputs, _resident(adapters[CORE_FILE]), base_peak)),
                "core LoraLoaderModelOnly", float(_peak(core_apply1, inputs, lora_bytes, base_peak)),
                peak_note + " (core: its LoRA + patched copies)", unit="bytes", base_forward_peak_bytes=base_peak),
    ]
    for name in (*BYPASS_ADAPTERS, CORE_FILE):
        size = _file_bytes(ctx.files[name])
        kept = _kept(ours_base, ours_apply1(name), inputs)
        peak = _peak(ours_apply1(name), inputs, _resident(adapters[name]), base_peak)
        rows.append(ctx.row(f"kept_memory_vs_adapter_{name}", float(kept), "adapter tensors (file)", float(size),
                            kept_note + " / the adapter's own tensors", unit="bytes", target="<= 1.05"))
        allowed = (size + _largest_layer_bytes(ours_base, adapters[name])) / size
        rows.append(ctx.row(f"peak_memory_vs_adapter_{name}", float(peak), "adapter tensors (file)", float(size),
                            peak_note + " / the adapter's own tensors; allowed: the adapter plus its largest "
                            "adapted layer's weight (transient)", unit="bytes", target=f"<= {allowed:.2f}"))
        ctx.check(f"kept memory <= adapter size + 5% ({name})", kept <= 1.05 * size,
                  f"{kept / size:.3f}x of {size / 2**20:.2f} MiB")
        ctx.check(f"peak added memory <= adapter + one adapted layer's weight ({name})", peak <= allowed * size,
                  f"{peak / size:.3f}x of {size / 2**20:.2f} MiB, allowed {allowed:.2f}x "
                  "(transient bypass buffers included)")
    return rows
