"""Per-step training benchmarks (issue #11 item 6, "a bench of what users run").

One training step at batch 1 on the bench's Flux 2-layout models (fp32, CPU), each side on its
own copy of the same seeded model (so no side carries another's hooks or wrappers):

- ours: `trainer.loop.training_step`, the very function `run_training` calls for a step (autograd
  on, the model's blocks checkpointed exactly or every saved tensor snapshotted, noise and sigma,
  `ComfyPredictor` forward with the trainable adapter in bypass, loss, backward, gradient norm,
  clipping at 1.0, AdamW step), after what `run_training` does around it per step
  (`host.prepare_for_training`, the learning rate), on a batch encoded once as `_encoded_items`
  does, the base frozen by `host.freeze_base` as `run_training` does. Presets: `all_linear_lokr`
  (LoKr factor 8, full matrix, every Linear) and `flux2_lokr` (LoKr on Flux2Attention /
  FeedForward / ParallelSelfAttention).
- core: `comfy_extras.nodes_train.TrainLoraNode` itself (algorithm LoKr, rank 8, which core's LoKr
  uses as the factor: `comfy.weight_adapter.lokr.factorization(dim, rank)`, full matrices as
  ours; AdamW, MSE, fp32 training and adapter dtypes, gradient checkpointing on). The node is run
  for real, with its `TrainSampler` swapped for a subclass whose `sample` (called inside the
  node's guider, after the node built its weight adapters, patched checkpointing and loaded the
  model) hands over to this bench: each timed core step is the original `TrainSampler.sample`
  with `total_steps=1`, i.e. exactly one iteration of core's loop (noise, forward through the
  weight wrappers, backward, AdamW step). It is given two latents: one crashes it (FACTS.md §1).
- base: the same ComfyUI model without any adapter, base weights frozen, the model's inputs
  (latent, sigma, text) requiring grad as core's x_t and sigmas do (so backward runs through
  every block); the same encoded inputs and loss as ours, no optimizer. Checkpointed with the
  trainer's own exact `gradient_checkpointing` (both sides pay the same recomputation), or
  uncheckpointed with `snapshot_saved_tensors` (ComfyUI's Flux blocks update tensors in place,
  `img += ...`, so plain autograd cannot back-propagate through them).

The text conditioning has 32 tokens; ComfyUI 0.3.75's `Flux2.extra_conds` left-pads it to 512
(unmasked) on every path that encodes conditioning (this trainer's `encode_conditioning` and core's
sampler alike), so each side runs 256 image + 512 text tokens (1024 + 512 at 32x32).

Memory rows: torch tensor bytes on the CPU from every allocation the allocator made during one
step (`measure.trace_allocations`; temporaries inside ops included), after warm-up steps (the
optimizer state exists). Tensors alive before the step are not counted: the model's weights on
neither side, the adapter and its optimizer state (recorded apart in the row).
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from comfyui_lycoris.core import host
from comfyui_lycoris.trainer.checkpointing import gradient_checkpointing, memory_mode, snapshot_saved_tensors
from comfyui_lycoris.trainer.loop import prepare, training_step
from comfyui_lycoris.trainer.predict import (
    DIFFUSION_MODEL_WRAPPER,
    ComfyPredictor,
    encode_conditioning,
    model_space_latents,
    stack_conditioning,
)
from comfyui_lycoris.trainer.spec import JobSpec
from comfyui_lycoris.trainer.step import Batch, batch_loss
from comfyui_lycoris.trainer.trainable import TrainableAdapter

from . import measure
from .env import REPO
from .workload import LATENT, TEXT_TOKENS, Workload

PRESETS = ("all_linear_lokr", "flux2_lokr")
CORE_RANK = 8  # core's LoKr factor; all_linear_lokr uses factor 8
CAPTION = "a photo of a red cube on a wooden table"
SMALL, LARGE = LATENT[1:], (32, 32)  # 16x16 and 32x32 latents: 256 and 1024 image tokens (patch size 1)


def _count(tensors) -> int:
    return sum(t.numel() for t in tensors)


def _bytes(tensors) -> int:
    """Bytes of the distinct storages under `tensors`."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _model_copy(work: Workload) -> Any:
    """A fresh ModelPatcher around a deep copy of the workload's (pristine) BaseModel."""
    import comfy.model_patcher

    base = work.patcher
    return comfy.model_patcher.ModelPatcher(copy.deepcopy(base.model), load_device=base.load_device,
                                            offload_device=base.offload_device)


def _latent(size: tuple[int, int] = SMALL) -> torch.Tensor:
    return torch.randn(1, LATENT[0], *size, generator=torch.Generator().manual_seed(4321))


# -- this trainer ---------------------------------------------------------------------------

@dataclass
class OursStep:
    """One `run_training` step of a preset on its own model copy: `training_step` and what surrounds it."""

    preset: str
    patcher: Any
    trainable: TrainableAdapter
    spec: JobSpec
    optimizer: torch.optim.Optimizer
    objective: Any
    predict: ComfyPredictor
    generator: torch.Generator
    items: dict = field(default_factory=dict)  # latent size -> (model-space latent, encoded conditioning)
    step: int = 0

    @classmethod
    def build(cls, preset: str, patcher: Any) -> OursStep:
        """What `run_training` sets up before its loop (`trainer.loop.prepare`; no job folders, no data set)."""
        spec = JobSpec(config_json=(REPO / "configs" / f"{preset}.json").read_text())
        setup = prepare(spec, patcher)
        return cls(preset, patcher, setup.trainable, spec, setup.optimizer, setup.objective, setup.predict,
                   setup.generator)

    def batch(self, size: tuple[int, int] = SMALL) -> Batch:
        """The step's batch, encoded once per size as `_encoded_items` does, assembled as `_next_batch` does."""
        if size not in self.items:
            device = torch.device(self.patcher.load_device)
            x0 = model_space_latents(self.patcher.model, _latent(size).to(device))
            cond = encode_conditioning(self.patcher.model, host.tiny_conditioning(self.patcher, CAPTION, TEXT_TOKENS),
                                       x0, self.spec.guidance)
            self.items[size] = (x0, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in cond.items()})
        x0, cond = self.items[size]
        return Batch(torch.cat([x0]), stack_conditioning([cond]))

    def __call__(self, i: int = 0, *, checkpointing: bool = True, size: tuple[int, int] = SMALL) -> float:
        host.prepare_for_training(self.patcher)
        for group in self.optimizer.param_groups:
            group["lr"] = self.spec.learning_rate_at(self.step)
        result = training_step(self.predict, self.objective, [self.batch(size)], self.optimizer, self.generator,
                               checkpointing=checkpointing, max_grad_norm=self.spec.max_grad_norm or None)
        if not result.finite:
            raise RuntimeError(f"{self.preset}: {result.message}")
        self.step += 1
        return result.loss

    def trains(self) -> dict:
        modules = self.trainable.comfy_modules()
        return dict(modules=len(modules), adapter_modules=len(self.trainable.modules),
                    params=_count(self.trainable.parameters()))


# -- the base model: forward + backward, no adapter ------------------------------------------

class BaseStep:
    """Forward + backward of the plain model through ComfyUI's apply_model, as the trainer's step runs it."""

    def __init__(self, patcher: Any, ours: OursStep):
        self.patcher = patcher
        self.model = patcher.model
        self.model.requires_grad_(False)  # frozen base weights, as core's trainer and host.freeze_base set them
        self.objective, self.ours = ours.objective, ours
        self.generator = torch.Generator().manual_seed(0)

    def predict(self, model_input, sigma, cond, timesteps):
        captured = []

        def capture(executor, *args, **kwargs):
            captured.append(executor(*args, **kwargs))
            return captured[-1]

        # Inputs require grad, as core's x_t and sigmas do (and its trained txt_in makes the text):
        # without a trained parameter, backward would otherwise stop at the loss.
        grad = {k: v.detach().requires_grad_(True) if k == "c_crossattn" else v for k, v in cond.items()}
        options = {"wrappers": {DIFFUSION_MODEL_WRAPPER: {"bench": [capture]}}}
        self.model.apply_model(model_input.detach().requires_grad_(True), sigma.detach().requires_grad_(True),
                               transformer_options=options, **grad)
        return captured[0]

    def __call__(self, i: int = 0, *, checkpointing: bool = True, size: tuple[int, int] = SMALL) -> float:
        host.prepare_for_training(self.patcher)
        root = self.model.diffusion_model
        mode = gradient_checkpointing(root) if checkpointing else snapshot_saved_tensors()
        with torch.enable_grad(), mode:
            loss = batch_loss(self.predict, self.objective, self.ours.batch(size), self.generator)
            loss.backward()
        return float(loss.detach())


# -- ComfyUI core's TrainLoraNode ------------------------------------------------------------

@contextlib.contextmanager
def _swapped(obj, name: str, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def run_with_core(patcher: Any, timed: Callable[[Callable[[int], object], dict], None]) -> dict:
    """Run core's TrainLoraNode on `patcher`; inside its sampler call `timed(core_step, info)`.

    `core_step(i)` is one iteration of core's training loop; `info` says what core trains.
    """
    import comfy.utils
    import comfy_extras.nodes_train as nodes_train

    info: dict = {}
    original = nodes_train.TrainSampler

    class Probe(original):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            dataset = model_wrap.conds["positive"]  # fwd_bwd replaces it with the batch's entries

            def core_step(i: int) -> None:
                model_wrap.conds["positive"] = dataset  # as at the top of each iteration of core's loop
                self.total_steps, self.seed = 1, i
                original.sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                disable_pbar)

            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            wrapped = [n for n, m in model_wrap.inner_model.diffusion_model.named_modules()
                       if getattr(m, "weight_function", None) or getattr(m, "bias_function", None)]
            info.update(modules=len(wrapped), params=_count(params),
                        kinds=sorted({type(f).__name__ for _, m in model_wrap.inner_model.diffusion_model.named_modules()
                                      for f in getattr(m, "weight_function", [])}))
            timed(core_step, info)
            return torch.zeros_like(latent_image)

    conditioning = host.tiny_conditioning(patcher, CAPTION, TEXT_TOKENS)
    latents = [{"samples": _latent()}, {"samples": _latent()}]  # two: a single latent batch crashes core
    with _swapped(nodes_train, "TrainSampler", Probe), _swapped(comfy.utils, "PROGRESS_BAR_ENABLED", False), \
            torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
        # fp32 "autocast" on the CPU: torch says it disables autocast, which is what fp32 training means
        warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
        nodes_train.TrainLoraNode.execute(
            model=[patcher], latents=latents, positive=[conditioning], batch_size=[1], steps=[1],
            grad_accumulation_steps=[1], learning_rate=[1e-3], rank=[CORE_RANK], optimizer=["AdamW"],
            loss_function=["MSE"], seed=[0], training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=["LoKr"],
            gradient_checkpointing=[True], existing_lora=["[None]"])
    return info


# -- timing ---------------------------------------------------------------------------------

def round_robin(fns: dict[str, Callable[[int], object]], repeats: int, warmup: int = 1) -> dict[str, measure.Times]:
    """Times of each fn, called in turn (a, b, c, a, b, c, ...) after `warmup` untimed rounds."""
    for i in range(warmup):
        for fn in fns.values():
            fn(i)
    times = {name: measure.Times() for name in fns}
    for i in range(warmup, warmup + repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn(i)
            times[name].wall.append(time.perf_counter() - wall)
            times[name].cpu.append(time.process_time() - cpu)
    return times


# -- memory ---------------------------------------------------------------------------------

@contextlib.contextmanager
def _noting_gradients(optimizer: torch.optim.Optimizer, out: dict[int, int]) -> Iterator[None]:
    """Note (address -> bytes) of the gradients' storages whenever the step drops them (`zero_grad`)."""
    original = optimizer.zero_grad

    def zero_grad(*args, **kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    out[p.grad.untyped_storage().data_ptr()] = p.grad.untyped_storage().nbytes()
        return original(*args, **kwargs)

    optimizer.zero_grad = zero_grad
    try:
        yield
    finally:
        del optimizer.zero_grad


@dataclass
class StepPeak:
    """Peak tensor bytes allocated during one step (tensors alive before it not counted)."""

    peak: int  # everything the step allocated: activations, copies, temporaries, gradients, optimizer temporaries
    peak_without_grads: int  # the same, the adapter's gradients left out
    grad_bytes: int


def step_peak(fn: Callable[[], object], device: torch.device, optimizer: torch.optim.Optimizer | None = None) -> StepPeak:
    grads: dict[int, int] = {}
    noting = _noting_gradients(optimizer, grads) if optimizer is not None else contextlib.nullcontext()
    with noting:
        if device.type == "cuda":  # max_memory_allocated: the gradients are subtracted whole
            peak, _ = measure.peak_tensor_bytes(fn, device)
            return StepPeak(peak, peak - sum(grads.values()), sum(grads.values()))
        trace = measure.trace_allocations(fn)
    return StepPeak(trace.peak(), trace.peak(exclude=grads), sum(grads.values()))


def step_memory(ours: OursStep, base: BaseStep) -> dict:
    """Peaks of our checkpointed step and of the base's checkpointed fwd+bwd at both latent sizes."""
    device = torch.device(ours.patcher.load_device)
    out = {}
    for size in (SMALL, LARGE):
        out[("ours", size)] = step_peak(lambda s=size: ours(size=s), device, ours.optimizer)
        out[("base", size)] = step_peak(lambda s=size: base(size=s), device)
    return out


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _bytes([v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)])


# -- gradients ------------------------------------------------------------------------------

def _gradients(ours: OursStep, checkpointing: bool) -> list[torch.Tensor]:
    """Gradients of the adapter's parameters for one fixed loss (same noise and sigma), in the context
    `training_step` runs its forward and backward in (`memory_mode`)."""
    params = ours.trainable.parameters()
    for p in params:
        p.grad = None
    host.prepare_for_training(ours.patcher)
    with torch.enable_grad(), memory_mode(ours.patcher.model.diffusion_model, checkpointing):
        batch_loss(ours.predict, ours.objective, ours.batch(), torch.Generator().manual_seed(99)).backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return grads


def _rel_error(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    num = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(grads, reference, strict=True))
    den = sum(float(b.double().square().sum()) for b in reference)
    return (num / den) ** 0.5 if den else float("inf")


def gradient_error(ours: OursStep) -> float:
    """Relative error (2-norm over all adapter gradients) of the checkpointed gradient against the
    uncheckpointed one (`memory_mode(root, False)`: every saved tensor snapshotted, nothing recomputed).

    No core figure beside it: torch's checkpoint (core's wrapping) recomputes in backward outside the
    adapter runtime's per-call context, so on this trainer it refuses outright (CheckpointError, a
    different number of tensors saved), and FACTS.md §6 has its error on core's own trainer (0.63).
    """
    return _rel_error(_gradients(ours, True), _gradients(ours, False))


def _base_grads(patcher: Any) -> tuple[int, int]:
    """(base parameters holding a .grad, all base parameters) of a model the trainer ran on."""
    params = list(patcher.model.diffusion_model.parameters())
    return sum(p.grad is not None for p in params), len(params)


# -- rows -----------------------------------------------------------------------------------

def training(ctx) -> list[dict]:
    """The per-step rows for `ctx.ours.name`'s model (`ctx`: cases.Context; rows and checks go there)."""
    import comfy.model_management as mm

    from .workload import build

    mm.unload_all_models()
    fresh = build(ctx.ours.name)  # its own copies: the other cases' hooks and clones stay out of these
    ours = {preset: OursStep.build(preset, _model_copy(fresh)) for preset in PRESETS}
    flux2 = ours["flux2_lokr"]
    core_model = _model_copy(fresh)
    base = BaseStep(fresh.patcher, flux2)
    repeats = max(3, ctx.repeats // 3)  # a step is 10-40x a forward
    times: dict[str, measure.Times] = {}

    def timed(core_step, info):
        # Pairs sit next to each other in the round: base then ours, checkpointed, then uncheckpointed.
        fns = {"ours_all": ours["all_linear_lokr"], "core": core_step,
               "base_ckpt": base, "ours_ckpt": flux2,
               "base_plain": lambda i: base(i, checkpointing=False),
               "ours_plain": lambda i: flux2(i, checkpointing=False)}
        times.update(round_robin(fns, repeats))

    start = time.perf_counter()
    core = run_with_core(core_model, timed)
    mm.unload_all_models()
    timing_s = time.perf_counter() - start

    start = time.perf_counter()
    memory = step_memory(flux2, base)
    memory_s = time.perf_counter() - start
    start = time.perf_counter()
    error = gradient_error(flux2)
    with_grad, n_base = _base_grads(flux2.patcher)
    print(f"[{ctx.ours.name}] training: timing {timing_s:.1f} s, memory {memory_s:.1f} s, "
          f"gradients {time.perf_counter() - start:.1f} s", flush=True)

    tokens = f"256 image + 512 text tokens ({TEXT_TOKENS} real, zero-padded by ComfyUI's Flux2.extra_conds)"
    steps = f"batch 1, fp32, median of {repeats} after 1 warm-up round"
    all_linear, trains = ours["all_linear_lokr"].trains(), flux2.trains()
    ours_trains = (f"ours: {all_linear['modules']} Linear layers ({all_linear['adapter_modules']} LyCORIS modules: "
                   f"fused qkv split into q/k/v), {all_linear['params']:,} params")
    core_trains = f"core: {core['modules']} Linear layers ({', '.join(core['kinds'])}), {core['params']:,} params"
    flux2_trains = (f"flux2_lokr: LoKr on Flux2Attention/FeedForward/ParallelSelfAttention, {trains['modules']} "
                    f"Linear layers, {trains['adapter_modules']} LyCORIS modules, {trains['params']:,} params")
    ours_step = "trainer.loop.training_step (AdamW step, clipping at 1.0 included)"
    adapter_bytes = _bytes(flux2.trainable.parameters())
    optimizer_bytes = _state_bytes(flux2.optimizer)
    weight_bytes = _bytes(list(flux2.patcher.model.diffusion_model.parameters()))
    ours_small, base_small = memory[("ours", SMALL)], memory[("base", SMALL)]
    ours_large, base_large = memory[("ours", LARGE)], memory[("base", LARGE)]
    counted = ("torch CPU tensor bytes allocated during the step (every allocation and free the allocator "
               "reported, in-op temporaries included), measured after warm-up steps; the model's weights "
               "count on neither side (alive before the step), nor do the adapter and its optimizer state")
    adapter_flux2 = dict(ours_modules=trains["modules"], ours_adapter_modules=trains["adapter_modules"],
                         ours_params=trains["params"])
    rows = [
        ctx.row("train_step_all_linear_lokr", times["ours_all"], "core TrainLoraNode LoKr step", times["core"],
                f"{ours_step}, checkpointing on, preset all_linear_lokr (LoKr factor 8, full matrix, every Linear) "
                f"vs core LoKr rank(=factor) {CORE_RANK} on every weight, checkpointing on; {ours_trains}; "
                f"{core_trains}; {steps}; {tokens}",
                target="<= 0.5", ours_modules=all_linear["modules"], ours_adapter_modules=all_linear["adapter_modules"],
                ours_params=all_linear["params"], core_modules=core["modules"], core_params=core["params"]),
        ctx.row("train_step_all_linear_lokr_vs_base", times["ours_all"], "base fwd+bwd (checkpointed)",
                times["base_ckpt"], f"the same step of ours vs the plain model's forward + backward, both with the "
                f"trainer's exact checkpointing; {steps}; {tokens}",
                ours_modules=all_linear["modules"], ours_params=all_linear["params"]),
        ctx.row("train_step_core_lokr_vs_base", times["core"], "base fwd+bwd (checkpointed)", times["base_ckpt"],
                f"core TrainLoraNode's step (in the ours column; torch.utils.checkpoint per top-level module) vs the "
                f"plain model with the trainer's exact checkpointing; {core_trains}; {tokens}",
                core_modules=core["modules"], core_params=core["params"]),
        ctx.row("train_step_flux2_lokr", times["ours_ckpt"], "base fwd+bwd (checkpointed)", times["base_ckpt"],
                f"{ours_step}, checkpointing=True; {flux2_trains} vs the plain model (frozen, inputs requiring "
                f"grad, no optimizer) under the same trainer.checkpointing.gradient_checkpointing; {steps}; {tokens}",
                target="<= 1.35", **adapter_flux2),
        ctx.row("train_step_flux2_lokr_no_ckpt", times["ours_plain"], "base fwd+bwd (snapshot_saved_tensors)",
                times["base_plain"],
                f"{ours_step}, checkpointing=False (every tensor autograd saves copied when saved) vs the plain "
                f"model under trainer.checkpointing.snapshot_saved_tensors: ComfyUI's Flux blocks update tensors "
                f"in place (img += ...), so plain autograd cannot run their backward and the base needs the same "
                f"snapshots; {flux2_trains}; {steps}; {tokens}", target="<= 1.2", **adapter_flux2),
        ctx.row("train_peak_memory_flux2_lokr", float(ours_small.peak_without_grads),
                "base fwd+bwd (checkpointed) peak", float(base_small.peak),
                f"peak of our checkpointed step without the adapter's gradients vs the base's checkpointed fwd+bwd "
                f"peak; {counted}; peak_bytes = the step's whole peak (gradients included) + adapter + optimizer "
                f"state; {tokens}", unit="bytes", target="<= 1.25",
                peak_bytes=ours_small.peak + adapter_bytes + optimizer_bytes, step_peak_bytes=ours_small.peak,
                adapter_bytes=adapter_bytes, grad_bytes=ours_small.grad_bytes, optimizer_bytes=optimizer_bytes,
                model_weight_bytes=weight_bytes, weights_counted="neither", **adapter_flux2),
        ctx.row("train_peak_memory_growth_flux2_lokr",
                float(ours_large.peak_without_grads - ours_small.peak_without_grads),
                "base fwd+bwd (checkpointed) peak growth", float(base_large.peak - base_small.peak),
                f"peak at a 32x32 latent (1024 image tokens) minus at 16x16 (256), both + 512 text tokens; ours "
                f"without gradients (as train_peak_memory_flux2_lokr); {counted}", unit="bytes", target="<= 1.25",
                ours_256_bytes=ours_small.peak_without_grads, ours_1024_bytes=ours_large.peak_without_grads,
                base_256_bytes=base_small.peak, base_1024_bytes=base_large.peak),
        ctx.row("train_gradient_error_flux2_lokr", error, "target", 1e-5,
                "relative error (2-norm over all adapter gradients) of the trainer's checkpointed gradient "
                "(memory_mode(root, True)) against its uncheckpointed one (memory_mode(root, False)), flux2_lokr, "
                "float32, the same noise and sigma; the baseline column holds the target (ratio <= 1: met)",
                unit="relative error", target="ours <= 1e-05"),
        ctx.row("train_base_weight_grads", float(with_grad), "base weights", float(n_base),
                "base parameters holding a .grad after all timed and measured steps of flux2_lokr (both modes); "
                "run_training freezes the base with host.freeze_base, as this bench does", unit="count",
                target="ours == 0"),
    ]
    by_name = {r["name"]: r for r in rows}
    for name, what, limit in (("train_step_all_linear_lokr", "trainer step (all-linear LoKr) <= 0.5x core's", 0.5),
                              ("train_step_flux2_lokr", "trainer step (flux2_lokr) <= 1.35x base fwd+bwd, both "
                                                        "checkpointed", 1.35),
                              ("train_step_flux2_lokr_no_ckpt", "trainer step (flux2_lokr, no checkpointing) <= 1.2x "
                                                                "base fwd+bwd", 1.2)):
        row = by_name[name]
        ctx.check(what, row["ratio"] <= limit,
                  f"{row['ratio']:.3f}x wall-clock median ({row['ratio_cpu']:.3f}x in CPU time, "
                  f"{row['ratio_min']:.3f}x of the minimums)")
    for name, what in (("train_peak_memory_flux2_lokr", "step peak memory (flux2_lokr) <= 1.25x base fwd+bwd"),
                       ("train_peak_memory_growth_flux2_lokr", "step peak growth 256 -> 1024 image tokens <= 1.25x "
                                                               "the base's")):
        row = by_name[name]
        ctx.check(what, row["ratio"] <= 1.25, f"{row['ratio']:.3f}x ({row['ours_s'] / 2**20:.1f} MiB vs "
                                             f"{row['baseline_s'] / 2**20:.1f} MiB)")
    ctx.check("trainer computes no gradients for the frozen base weights", with_grad == 0,
              f"{with_grad}/{n_base} base weights got a .grad")
    ctx.check("trainer's checkpointed gradient == uncheckpointed gradient (rel. error <= 1e-5)", error <= 1e-5,
              f"relative error {error:.2e} (flux2_lokr, float32)")
    return rows
