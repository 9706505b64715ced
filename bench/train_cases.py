"""Per-step training benchmarks of the issue "Background trainer": this trainer vs ComfyUI core's.

One training step at batch 1 on the bench's Flux 2-layout models (fp32, CPU), three sides, each
on its own copy of the same seeded model (so no side carries another's hooks or wrappers):

- ours: this pack's step exactly as `trainer.loop.run_training` runs it for one step:
  `host.prepare_for_training`, the learning rate set, then inside `torch.enable_grad()` and the
  `gradient_checkpointing` context `train_step` (noise and sigma sampled, `ComfyPredictor` forward
  with the trainable adapter in bypass, loss, backward, gradient norm, clipping at 1.0, AdamW step)
  on a batch encoded once, as `_encoded_items` does. Presets: `all_linear_lokr` (LoKr factor 8,
  full matrix, every Linear) and `flux2_lokr` (LoKr on Flux2Attention / FeedForward / ParallelSelfAttention).
- core: `comfy_extras.nodes_train.TrainLoraNode` itself (algorithm LoKr, rank 8, which core's LoKr
  uses as the factor: `comfy.weight_adapter.lokr.factorization(dim, rank)`, full matrices as
  ours; AdamW, MSE, fp32 training and adapter dtypes, gradient checkpointing on). The node is run
  for real, with its `TrainSampler` swapped for a subclass whose `sample` (called inside the
  node's guider, after the node built its weight adapters, patched checkpointing and loaded the
  model) hands over to this bench: each timed core step is the original `TrainSampler.sample`
  with `total_steps=1`, i.e. exactly one iteration of core's loop (noise, forward through the
  weight wrappers, backward, AdamW step). It is given two latents: one crashes it (FACTS.md §1).
- base: the same ComfyUI model without any adapter, forward + backward with the same
  checkpointing, base weights frozen as core freezes them, the model's inputs (latent, sigma,
  text) requiring grad as core's x_t and sigmas do (so backward runs through every block); the
  same encoded inputs and loss as ours, no optimizer.

The text conditioning has 32 tokens; ComfyUI 0.3.75's `Flux2.extra_conds` left-pads it to 512
(unmasked) on every path that encodes conditioning (this trainer's `encode_conditioning` and core's
sampler alike), so each side runs 256 image + 512 text tokens.

Untimed checks: the trainer leaves no gradient on the base weights, and its checkpointed
gradient equals a reference computed without checkpointing (see `gradient_error`).
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from comfyui_lycoris.core import host
from comfyui_lycoris.core.config import parse_config
from comfyui_lycoris.core.targets import plan_for
from comfyui_lycoris.trainer.checkpointing import gradient_checkpointing
from comfyui_lycoris.trainer.optimizers import build_optimizer
from comfyui_lycoris.trainer.predict import (
    DIFFUSION_MODEL_WRAPPER,
    ComfyPredictor,
    encode_conditioning,
    model_space_latents,
    objective_for_model,
    stack_conditioning,
)
from comfyui_lycoris.trainer.spec import JobSpec
from comfyui_lycoris.trainer.step import Batch, batch_loss, train_step
from comfyui_lycoris.trainer.trainable import TrainableAdapter, comfy_base_weights

from . import measure
from .env import REPO
from .workload import LATENT, TEXT_TOKENS, Workload

PRESETS = ("all_linear_lokr", "flux2_lokr")
CORE_RANK = 8  # core's LoKr factor; all_linear_lokr uses factor 8
CAPTION = "a photo of a red cube on a wooden table"


def _count(tensors) -> int:
    return sum(t.numel() for t in tensors)


def _model_copy(work: Workload) -> Any:
    """A fresh ModelPatcher around a deep copy of the workload's (pristine) BaseModel."""
    import comfy.model_patcher

    base = work.patcher
    return comfy.model_patcher.ModelPatcher(copy.deepcopy(base.model), load_device=base.load_device,
                                            offload_device=base.offload_device)


def _latent() -> torch.Tensor:
    return torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(4321))


# -- this trainer ---------------------------------------------------------------------------

@dataclass
class OursStep:
    """One `run_training` step of a preset on its own model copy."""

    preset: str
    patcher: Any
    trainable: TrainableAdapter
    spec: JobSpec
    optimizer: torch.optim.Optimizer
    objective: Any
    predict: ComfyPredictor
    item: tuple[torch.Tensor, dict]  # (model-space latent, encoded conditioning), as `_encoded_items` keeps them
    generator: torch.Generator
    step: int = 0

    @classmethod
    def build(cls, preset: str, patcher: Any) -> OursStep:
        spec = JobSpec(config_json=(REPO / "configs" / f"{preset}.json").read_text())
        config = parse_config(spec.config_json)
        device = host.prepare_for_training(patcher)
        host.detach_from_inference_mode(patcher)
        unet_config = host.model_unet_config(patcher)
        trainable = TrainableAdapter.from_plan(plan_for(config, unet_config), unet_config,
                                               comfy_base_weights(patcher.model.diffusion_model), config,
                                               seed=spec.seed, dtype=torch.float32, device=device, init_device=device)
        optimizer = build_optimizer(spec, trainable.parameters())
        objective = objective_for_model(patcher.model, trainable.family, shift=spec.flow_shift,
                                        resolution_dependent=spec.flow_shift == 0, guidance=spec.guidance,
                                        min_snr_gamma=spec.min_snr_gamma or None)
        x0 = model_space_latents(patcher.model, _latent().to(device))
        cond = encode_conditioning(patcher.model, host.tiny_conditioning(patcher, CAPTION, TEXT_TOKENS), x0,
                                   spec.guidance)
        return cls(preset, patcher, trainable, spec, optimizer, objective, ComfyPredictor(patcher.model, trainable),
                   (x0, cond), torch.Generator().manual_seed(spec.seed))

    @property
    def batch(self) -> Batch:
        """The step's batch, assembled as `_next_batch` does (World.train_step of one process is train_step)."""
        return Batch(torch.cat([self.item[0]]), stack_conditioning([self.item[1]]))

    def __call__(self, i: int = 0) -> float:
        host.prepare_for_training(self.patcher)
        for group in self.optimizer.param_groups:
            group["lr"] = self.spec.learning_rate_at(self.step)
        with torch.enable_grad(), gradient_checkpointing(self.patcher.model.diffusion_model):
            result = train_step(self.predict, self.objective, [self.batch], self.trainable.parameters(),
                                self.optimizer, self.generator, self.spec.max_grad_norm or None)
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
    """Forward + backward of the plain model through ComfyUI's apply_model, checkpointed."""

    def __init__(self, patcher: Any, ours: OursStep):
        self.patcher = patcher
        self.model = patcher.model
        self.model.requires_grad_(False)  # frozen base weights, as core's trainer sets them
        self.objective, self.batch = ours.objective, ours.batch
        self.generator = torch.Generator().manual_seed(0)

    def predict(self, model_input, sigma, cond, timesteps):
        captured = []

        def capture(executor, *args, **kwargs):
            captured.append(executor(*args, **kwargs))
            return captured[-1]

        # Inputs require grad, as core's x_t and sigmas do (and its trained txt_in makes the text):
        # backward then runs through every block. It also has to: ComfyUI's blocks update their
        # inputs in place (`img += ...`), so an input that did not require grad would require it by
        # the time the checkpoint recomputes the block, which then saves more tensors and fails.
        grad = {k: v.detach().requires_grad_(True) if k == "c_crossattn" else v for k, v in cond.items()}
        options = {"wrappers": {DIFFUSION_MODEL_WRAPPER: {"bench": [capture]}}}
        self.model.apply_model(model_input.detach().requires_grad_(True), sigma.detach().requires_grad_(True),
                               transformer_options=options, **grad)
        return captured[0]

    def __call__(self, i: int = 0) -> float:
        host.prepare_for_training(self.patcher)
        with torch.enable_grad(), gradient_checkpointing(self.model.diffusion_model):
            loss = batch_loss(self.predict, self.objective, self.batch, self.generator)
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


# -- timing and rows ------------------------------------------------------------------------

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


def _gradients(ours: OursStep, mode: contextlib.AbstractContextManager) -> list[torch.Tensor]:
    """Gradients of the adapter's parameters for one fixed loss, the forward run under `mode`."""
    params = ours.trainable.parameters()
    for p in params:
        p.grad = None
    with torch.enable_grad(), mode:
        batch_loss(ours.predict, ours.objective, ours.batch, torch.Generator().manual_seed(99)).backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return grads


def gradient_error(ours: OursStep) -> float:
    """Relative error of the trainer's checkpointed gradient against a reference without checkpointing.

    ComfyUI's Flux blocks update their inputs in place (`img += ...`); plain autograd refuses that,
    so the reference keeps a private copy of every tensor autograd saves (a `saved_tensors_hooks`
    pack that clones), which in-place updates made later cannot reach. On a tiny fp64 Flux 2
    model that reference agrees with a finite difference of the loss.
    """
    diffusion_model = ours.patcher.model.diffusion_model
    checkpointed = _gradients(ours, gradient_checkpointing(diffusion_model))
    snapshots = torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)
    reference = _gradients(ours, snapshots)
    num = sum(float((a - b).square().sum()) for a, b in zip(checkpointed, reference, strict=True))
    den = sum(float(b.square().sum()) for b in reference)
    return (num / den) ** 0.5 if den else float("inf")


def _base_grads(patcher: Any) -> tuple[int, int]:
    """(base parameters holding a .grad, all base parameters) of a model the trainer ran on."""
    params = list(patcher.model.diffusion_model.parameters())
    return sum(p.grad is not None for p in params), len(params)


def training(ctx) -> list[dict]:
    """The per-step rows for `ctx.ours.name`'s model (`ctx`: cases.Context; rows and checks go there)."""
    import comfy.model_management as mm

    from .workload import build

    mm.unload_all_models()
    fresh = build(ctx.ours.name)  # its own copies: the other cases' hooks and clones stay out of these
    ours = {preset: OursStep.build(preset, _model_copy(fresh)) for preset in PRESETS}
    core_model = _model_copy(fresh)
    base = BaseStep(fresh.patcher, ours["flux2_lokr"])
    repeats = max(3, ctx.repeats // 3)  # a step is 10-40x a forward: 4 rounds of 4 steps keep this case near a minute
    times: dict[str, measure.Times] = {}

    def timed(core_step, info):
        fns = {"ours_all": ours["all_linear_lokr"], "core": core_step, "base": base, "ours_flux2": ours["flux2_lokr"]}
        times.update(round_robin(fns, repeats))

    core = run_with_core(core_model, timed)
    mm.unload_all_models()

    tokens = f"256 image + 512 text tokens ({TEXT_TOKENS} real, zero-padded by ComfyUI's Flux2.extra_conds)"
    steps = f"batch 1, fp32, AdamW step included, median of {repeats} after 1 warm-up"
    all_linear, flux2 = ours["all_linear_lokr"].trains(), ours["flux2_lokr"].trains()
    with_grad, n_base = _base_grads(ours["flux2_lokr"].patcher)
    base_grads = f"{with_grad}/{n_base} base weights got a .grad"
    error = gradient_error(ours["flux2_lokr"])
    ours_trains = (f"ours: {all_linear['modules']} Linear layers ({all_linear['adapter_modules']} LyCORIS modules: "
                   f"fused qkv split into q/k/v), {all_linear['params']:,} params")
    core_trains = f"core: {core['modules']} Linear layers ({', '.join(core['kinds'])}), {core['params']:,} params"
    rows = [
        ctx.row("train_step_all_linear_lokr", times["ours_all"], "core TrainLoraNode LoKr step", times["core"],
                f"all_linear_lokr (LoKr factor 8, full matrix, every Linear) vs core LoKr rank(=factor) {CORE_RANK} "
                f"on every weight; {ours_trains}; {core_trains}; {steps}; {tokens}",
                target="<= 0.5", ours_modules=all_linear["modules"], ours_adapter_modules=all_linear["adapter_modules"],
                ours_params=all_linear["params"], core_modules=core["modules"], core_params=core["params"]),
        ctx.row("train_step_all_linear_lokr_vs_base", times["ours_all"], "base fwd+bwd (checkpointed)",
                times["base"], f"the same step of ours vs the plain model's forward + backward; {steps}; {tokens}",
                ours_modules=all_linear["modules"], ours_params=all_linear["params"]),
        ctx.row("train_step_core_lokr_vs_base", times["core"], "base fwd+bwd (checkpointed)", times["base"],
                f"core TrainLoraNode's step (in the ours column) vs the plain model; {core_trains}; {tokens}",
                core_modules=core["modules"], core_params=core["params"]),
        ctx.row("train_step_flux2_lokr", times["ours_flux2"], "base fwd+bwd (checkpointed)", times["base"],
                f"flux2_lokr (LoKr on Flux2Attention/FeedForward/ParallelSelfAttention: {flux2['modules']} Linear "
                f"layers, {flux2['adapter_modules']} LyCORIS modules, {flux2['params']:,} params); {steps}; {tokens}",
                target="<= 1.6", ours_modules=flux2["modules"], ours_adapter_modules=flux2["adapter_modules"],
                ours_params=flux2["params"], base_weights_with_grad=with_grad, gradient_rel_error=error),
    ]
    by_name = {r["name"]: r for r in rows}
    for name, target, limit in (("train_step_all_linear_lokr", "trainer step (all-linear LoKr) <= 0.5x core's", 0.5),
                                ("train_step_flux2_lokr", "trainer step (flux2_lokr) <= 1.6x base fwd+bwd", 1.6)):
        row = by_name[name]
        ctx.check(target, row["ratio"] <= limit,
                  f"{row['ratio']:.3f}x wall-clock median ({row['ratio_cpu']:.3f}x in CPU time)")
    ctx.check("trainer computes no gradients for the frozen base weights", with_grad == 0,
              f"{base_grads} after the timed steps (the trainer leaves requires_grad on the base model)")
    ctx.check("trainer's checkpointed gradient == reference gradient", error < 1e-3,
              f"relative error {error:.2e} (flux2_lokr; reference: no checkpointing, saved tensors copied)")
    return rows
