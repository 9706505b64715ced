"""The one boundary between the core and ComfyUI.

Every `comfy.*` import of the core lives here, imported lazily inside functions, so the rest of
the core (and its unit tests) runs without a ComfyUI on the path.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .families import profile_for
from .tiny import TINY_POOLED_DIM, TinySizes, fit_flux_params, seed_parameters, text_embedding, unet_config

_SUPPORTED_CLASS = {"flux2": "Flux2", "flux1": "Flux", "sdxl": "SDXL"}


def comfyui_version() -> str:
    """The version string of the ComfyUI this process runs in."""
    import comfyui_version  # ComfyUI's root module

    return comfyui_version.__version__


def flux_param_fields() -> dict[str, bool]:
    """The installed ComfyUI's `FluxParams` fields -> required (no default): what a Flux config must give."""
    import dataclasses

    from comfy.ldm.flux.model import FluxParams

    return {f.name: f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            for f in dataclasses.fields(FluxParams)}


def build_tiny_model(sizes: TinySizes, dtype: torch.dtype = torch.float32,
                     compute_dtype: torch.dtype | None = None) -> Any:
    """A tiny seeded model of `sizes.family` as a ComfyUI ModelPatcher (a `MODEL`).

    Built through `comfy.supported_models` directly: model detection cannot load small models.
    `compute_dtype` makes ComfyUI cast weights stored as `dtype` (e.g. fp8) at run time.
    """
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = getattr(comfy.supported_models, _SUPPORTED_CLASS[sizes.family])(
        fit_flux_params(unet_config(sizes), sizes.family, flux_param_fields()))
    config.set_inference_dtype(dtype, compute_dtype)
    model = config.get_model({})
    seed_parameters(model.diffusion_model, sizes.seed)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def as_installed_unet_keys(family: str, unet_config: dict, state_dict: dict) -> dict:
    """A `diffusion_model` state dict in the original file layout, renamed as this ComfyUI's loader
    renames it (its own `process_unet_state_dict`): v0.33 names Flux's QK-norm parameters `weight`
    where the files, and 0.3.75, say `scale`."""
    import comfy.supported_models

    return getattr(comfy.supported_models, _SUPPORTED_CLASS[family])(dict(unet_config)).process_unet_state_dict(state_dict)


def model_unet_config(model: Any) -> dict:
    """The `unet_config` of a ComfyUI MODEL: what family profiles read."""
    return model.model.model_config.unet_config


def model_family(model: Any) -> str:
    """'flux2', 'flux1' or 'sdxl' for a ComfyUI MODEL; ValueError naming the model otherwise."""
    return profile_for(model_unet_config(model)).name


# Storage dtypes of Load Diffusion Model's fp8 weight_dtype choices (core's UNETLoader)
_FP8_WEIGHT_DTYPES = {torch.float8_e4m3fn: "fp8_e4m3fn", torch.float8_e5m2: "fp8_e5m2"}


def model_weight_dtype(model: Any) -> str:
    """The Load Diffusion Model `weight_dtype` that holds this MODEL's weights as they are held now.

    An fp8 storage dtype (`_fast` when ComfyUI's fp8 matmuls are on), else "default": ComfyUI then
    picks the dtype for the device, as it did when the node loaded the file."""
    base = model.model
    name = _FP8_WEIGHT_DTYPES.get(base.get_dtype())
    if name == "fp8_e4m3fn" and base.model_config.optimizations.get("fp8", False):
        return "fp8_e4m3fn_fast"
    return name or "default"


def linear_weight_dtypes(model: Any) -> list[str]:
    """Dtypes the diffusion model's linear layers store their weights in (what a run reports it loaded)."""
    found = {module.weight.dtype for module in model.model.diffusion_model.modules()
             if isinstance(module, torch.nn.Linear) and module.weight is not None}
    return sorted(str(dtype).removeprefix("torch.") for dtype in found)


def unet_weight_dtypes() -> list[str]:
    """The `weight_dtype` choices of this ComfyUI's Load Diffusion Model (UNETLoader)."""
    import nodes

    return list(nodes.UNETLoader.INPUT_TYPES()["required"]["weight_dtype"][0])


def load_diffusion_model_file(path: Any, weight_dtype: str = "default") -> Any:
    """A diffusion-model file as a MODEL through core's Load Diffusion Model (UNETLoader) itself.

    The same `weight_dtype` choices and model options as the node in this ComfyUI version. The
    file's folder is put first among the diffusion_models folders while the node resolves its
    name (so it is this file, wherever it lies), then the folder list is restored."""
    from pathlib import Path

    import folder_paths

    import nodes  # ComfyUI's nodes.py (first on sys.path), not the pack's nodes/

    choices = unet_weight_dtypes()
    if weight_dtype not in choices:
        raise ValueError(f"weight_dtype: this ComfyUI's Load Diffusion Model offers {', '.join(choices)} "
                         f"(got {weight_dtype!r})")
    path = Path(path).resolve()
    folders = folder_paths.folder_names_and_paths["diffusion_models"][0]
    before = list(folders)
    folder_paths.add_model_folder_path("diffusion_models", str(path.parent), is_default=True)
    try:
        found = folder_paths.get_full_path("diffusion_models", path.name)
        if found is None or Path(found).resolve() != path:
            raise ValueError(f"model: {path} cannot be named to Load Diffusion Model (it resolves to {found})")
        return nodes.UNETLoader().load_unet(path.name, weight_dtype)[0]
    finally:
        folders[:] = before


def load_checkpoint_model_file(path: Any) -> Any:
    """The MODEL of a checkpoint file, as core's Load Checkpoint loads it (no CLIP or VAE)."""
    import comfy.sd

    return comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]


def tiny_conditioning(model: Any, text: str, tokens: int) -> list:
    """CONDITIONING for `model` from the deterministic tiny text embedding of `text`."""
    family = model_family(model)
    cfg = model_unet_config(model)
    dim = cfg["context_dim"] if family == "sdxl" else cfg["context_in_dim"]
    # A loaded Flux 1 file has CLIP's 768-wide pooled input (vector_in), not the tiny recipe's 32.
    pooled_dim = int(cfg.get("vec_in_dim") or TINY_POOLED_DIM[family]) if family == "flux1" else TINY_POOLED_DIM[family]
    cond, pooled = text_embedding(text, tokens, dim, pooled_dim)
    return [[cond, {"pooled_output": pooled}]]


def sampler_sigmas(model: Any, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The sigma schedule KSampler would use for `model` (steps + 1 values, the last one 0).

    ComfyUI's own `calculate_sigmas` on the model's (possibly patched) `model_sampling`; a denoise
    below 1 runs int(steps / denoise) steps and keeps the last steps + 1 sigmas, as KSampler does.
    """
    import comfy.samplers

    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise ValueError(f"scheduler: '{scheduler}' is not one of {', '.join(comfy.samplers.SCHEDULER_NAMES)}")
    model_sampling = model.get_model_object("model_sampling")
    if denoise > 0.9999:
        return comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps).cpu()
    if denoise <= 0.0:
        return torch.zeros(0)
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, int(steps / denoise)).cpu()
    return sigmas[-(steps + 1):]


def sigma_timesteps(model: Any, sigmas: torch.Tensor) -> torch.Tensor:
    """Integer T-LoRA timesteps (0..1000) of `sigmas` for a MODEL (see `sampling_timesteps`)."""
    return sampling_timesteps(model.get_model_object("model_sampling"), sigmas)


def sampling_timesteps(sampling: Any, sigmas: torch.Tensor) -> torch.Tensor:
    """Integer T-LoRA timesteps (0..1000) of `sigmas`, from the model's own `model_sampling.timestep`.

    Flux-style flow sampling gives t in 0..1 (scaled by 1000), SD3-style flow gives
    `multiplier * sigma` (rescaled to 0..1000), discrete sampling (SDXL) gives the index 0..999.
    """
    import comfy.model_sampling as ms

    from .tlora import T_MAX, integer_timestep

    raw = sampling.timestep(sigmas.float()).double()
    if isinstance(sampling, ms.ModelSamplingFlux):
        raw = raw * T_MAX
    elif isinstance(sampling, ms.ModelSamplingDiscreteFlow):
        raw = raw * (T_MAX / sampling.multiplier)
    return torch.tensor([integer_timestep(t) for t in raw.flatten().tolist()], dtype=torch.long)


# -- adapters on ModelPatcher clones ---------------------------------------------------------

_STANDARD_OPS: dict | None = None


def _standard_ops() -> dict:
    """forward / forward_comfy_cast_weights of ComfyUI's plain Linear and Conv ops -> 'linear' / 'conv'.

    Only these run `op(x, *cast_bias_weight(module, x))`; fp8 / scaled / quantised ops run other
    matmuls, so the runtime never replaces their computation (it adds deltas to their output).
    """
    global _STANDARD_OPS
    if _STANDARD_OPS is None:
        import comfy.ops

        ops = comfy.ops.disable_weight_init
        _STANDARD_OPS = {(cls.forward, cls.forward_comfy_cast_weights): kind
                         for cls, kind in ((ops.Linear, "linear"), (ops.Conv1d, "conv"), (ops.Conv2d, "conv"),
                                           (ops.Conv3d, "conv"))}
    return _STANDARD_OPS


def _op_kind(cls: type) -> str | bool | None:
    if not hasattr(cls, "weight_function") or not hasattr(cls, "comfy_cast_weights"):
        return None  # not a ComfyUI op
    return _standard_ops().get((cls.forward, getattr(cls, "forward_comfy_cast_weights", None)), False)


def _op_weights(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) exactly as the ComfyUI op casts them for x (dtype, device, weight/bias patches)."""
    import comfy.ops

    if not (module.comfy_cast_weights or module.weight_function or module.bias_function):
        return module.weight, module.bias  # the op's own `super().forward`: its tensors as they are
    cast = comfy.ops.cast_bias_weight(module, x)
    return cast[0], cast[1]


def _register_ops() -> None:
    from .runtime import HostOps, register_host

    register_host(HostOps(kind=_op_kind, weights=_op_weights))


_register_ops()

_RUNTIME_KEY = "lycoris"  # transformer_options entry and wrapper key


def attach_application(model: Any, application: Any) -> Any:
    """A clone of `model` that runs `application` (bypass) on top of the adapters it already has."""
    import comfy.patcher_extension as pe

    from .runtime import install_hooks

    clone = model.clone()
    install_hooks(clone.model.diffusion_model, list(application.bindings))
    options = clone.model_options.setdefault("transformer_options", {})
    options[_RUNTIME_KEY] = (*options.get(_RUNTIME_KEY, ()), application)
    if not clone.get_wrappers(pe.WrappersMP.APPLY_MODEL, _RUNTIME_KEY):
        clone.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, _RUNTIME_KEY, _apply_model_wrapper)
    return clone


def applications(model: Any) -> tuple:
    return tuple(model.model_options.get("transformer_options", {}).get(_RUNTIME_KEY, ()))


def _apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                         transformer_options=None, **kwargs):
    """Runs only for clones that carry adapters: activates them for this model call."""
    from .runtime import active, build_call_state

    transformer_options = transformer_options if transformer_options is not None else {}
    apps = transformer_options.get(_RUNTIME_KEY, ())
    if not apps:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    chunks = len(transformer_options.get("cond_or_uncond") or [None])
    timesteps = None
    if any(app.tlora is not None for app in apps):
        timesteps = sampling_timesteps(executor.class_obj.model_sampling, t.reshape(-1)).to(x.device)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(x.shape[0])
    sigmas = None
    if any(app.schedule is not None for app in apps):
        sigmas = t.reshape(-1)
        sigmas = sigmas.expand(x.shape[0]) if sigmas.numel() == 1 else sigmas
    state = build_call_state(apps, x.shape[0], chunks, timesteps, sigmas)
    with active(state):
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def percent_to_sigma(model: Any):
    """The MODEL's own `model_sampling.percent_to_sigma` (0 = start of sampling, 1 = end)."""
    return model.get_model_object("model_sampling").percent_to_sigma


def merge_patches(model: Any, patches: list[tuple[str, tuple | None, torch.Tensor]]) -> Any:
    """A clone with weight deltas added through ComfyUI's patch mechanism (unpatch restores the base).

    Each patch is (parameter key under diffusion_model, ComfyUI offset (dim, start, length) or
    None, delta tensor), applied as a plain 'diff' patch at strength 1.
    """
    clone = model.clone()
    grouped: dict = {}
    for key, offset, delta in patches:
        full_key = f"diffusion_model.{key}"
        grouped[full_key if offset is None else (full_key, offset)] = (delta,)
    added = clone.add_patches(grouped, 1.0)
    missing = set(grouped) - set(added)
    if missing:
        raise ValueError(f"merge: ComfyUI has no weight for {sorted(map(str, missing))[:3]}")
    return clone


def comfy_weight(model: Any, key: str) -> torch.Tensor:
    """A weight of the ComfyUI diffusion model, unpatched (from ComfyUI's backup if it is patched now)."""
    backup = model.backup.get(f"diffusion_model.{key}")
    weight = backup.weight if backup is not None else model.model.diffusion_model.get_parameter(key)
    return weight.detach().to("cpu", torch.float32)


# -- running ComfyUI's model code from a training thread -----------------------------------------

_training_lock = threading.Lock()
_training_depth = 0
_training_was: bool | None = None


@contextmanager
def training_ops() -> Iterator[None]:
    """ComfyUI's model code in its autograd-capable form while the block runs.

    Newer ComfyUI (v0.33) runs fused kernels that have no backward (comfy_kitchen's RoPE) unless
    `comfy.model_management.in_training` is set, as its own Train LoRA node sets it around training.
    The flag is process-wide: nested and concurrent users share a count, and the flag gets its
    earlier value back when the last one leaves. A prompt sampling meanwhile takes the plain
    PyTorch path (same numbers). ComfyUI 0.3.75 has no such flag: nothing changes there.
    """
    global _training_depth, _training_was
    import comfy.model_management as mm

    has_flag = hasattr(mm, "in_training")
    if has_flag:
        with _training_lock:
            if _training_depth == 0:
                _training_was = mm.in_training
            _training_depth += 1
            mm.in_training = True
    try:
        yield
    finally:
        if has_flag:
            with _training_lock:
                _training_depth -= 1
                if _training_depth == 0:
                    mm.in_training = _training_was


_background = threading.local()


def _interrupt_check_for_foreground(original):
    def throw_exception_if_processing_interrupted():
        if getattr(_background, "depth", 0):
            return  # a background thread: the flag is the foreground prompt's, leave it for that prompt
        return original()

    throw_exception_if_processing_interrupted.__wrapped__ = original
    return throw_exception_if_processing_interrupted


@contextmanager
def ignoring_comfy_interrupt() -> Iterator[None]:
    """Run ComfyUI code on this (background) thread without taking ComfyUI's interrupt.

    ComfyUI has one global interrupt flag for its running prompt, and every op it runs
    (`comfy.ops.run_every_op`) reads and clears it. A trainer thread running the model would take
    a Cancel meant for the foreground prompt: the job would fail and the prompt never stop. Inside
    this block, this thread's checks leave the flag alone (jobs have their own cancel); other
    threads check as before.
    """
    import comfy.model_management as mm

    with _training_lock:
        if not hasattr(mm.throw_exception_if_processing_interrupted, "__wrapped__"):
            mm.throw_exception_if_processing_interrupted = _interrupt_check_for_foreground(
                mm.throw_exception_if_processing_interrupted)
    _background.depth = getattr(_background, "depth", 0) + 1
    try:
        yield
    finally:
        _background.depth -= 1


def prepare_for_training(model: Any) -> torch.device:
    """Have ComfyUI load `model` on its device (after a prompt may have offloaded it); return the device."""
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    return torch.device(model.load_device)


def latent_layout(model: Any) -> tuple[int, int]:
    """(channels, pixels per latent cell) of a MODEL's LATENTs, from its latent format."""
    latent_format = model.model.latent_format
    default = 16 if model_family(model) == "flux2" else 8  # 0.3.75 formats do not say; Flux 2 packs 2x2
    return latent_format.latent_channels, getattr(latent_format, "spacial_downscale_ratio", default)


def detach_from_inference_mode(model: Any) -> None:
    """Give the diffusion model's inference-mode weights normal storage (same values), once.

    ComfyUI runs nodes under `torch.inference_mode()`, so a model built or loaded in a node has
    inference tensors, which autograd refuses to save for backward; training through the frozen
    base needs normal tensors. Values (and so sampling results) are unchanged.
    """
    with torch.inference_mode(False), torch.no_grad():
        for module in model.model.diffusion_model.modules():
            for name, param in list(module._parameters.items()):
                # A new Parameter: one created in inference mode has no version counter even
                # after its .data is replaced.
                if param is not None and param.is_inference():
                    module._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=param.requires_grad)
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.is_inference():
                    module._buffers[name] = buffer.clone()


def freeze_base(model: Any) -> None:
    """No gradients for the base weights (ComfyUI leaves requires_grad on): only adapters train."""
    model.model.diffusion_model.requires_grad_(False)


# -- sampling, as a KSampler node does it (validation previews) --------------------------------

def ksample(model: Any, positive: list, negative: list, latent: dict, seed: int, steps: int, cfg: float,
            sampler_name: str, scheduler: str, guidance: float | None = None) -> torch.Tensor:
    """The latent a KSampler node computes for these inputs (same noise, same sampler code), no progress bar.

    `guidance`: Flux guidance set on both conditionings as Flux Guidance does (None: as given).
    On a background thread, run it inside `ignoring_comfy_interrupt` (ComfyUI's ops read the flag).
    """
    import comfy.sample
    import comfy.samplers
    import node_helpers

    if sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        raise ValueError(f"sampler_name: '{sampler_name}' is not a ComfyUI sampler")
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise ValueError(f"scheduler: '{scheduler}' is not one of {', '.join(comfy.samplers.SCHEDULER_NAMES)}")
    if guidance is not None:
        positive = node_helpers.conditioning_set_values(positive, {"guidance": guidance})
        negative = node_helpers.conditioning_set_values(negative, {"guidance": guidance})
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, samples,
                               noise_mask=latent.get("noise_mask"), disable_pbar=True, seed=seed)


def sampler_names() -> tuple[list[str], list[str]]:
    """ComfyUI's sampler and scheduler names (the KSampler node's combos)."""
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.SCHEDULER_NAMES)


def memory_settings(model: Any) -> dict:
    """What the training-memory estimate needs to know of a MODEL: weight / compute dtypes, attention kind."""
    import comfy.ldm.modules.attention as attention

    from .memory_estimate import attention_kind

    base = model.model
    weight = base.get_dtype()
    compute = getattr(base, "manual_cast_dtype", None) or weight
    return {"weight_dtype": weight, "compute_dtype": compute,
            "attention": attention_kind(attention.optimized_attention.__name__)}
