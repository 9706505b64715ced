"""The training loop of one job: plan -> trainable adapter -> steps -> checkpoints -> adapter file.

Runs on the job worker thread (or headless). Between steps it yields to ComfyUI prompts, checks
its own cancel flag, and every `save_every` steps writes an atomic checkpoint and publishes a
snapshot adapter that Apply LyCORIS can use while training goes on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core import host
from ..core.adapter_file import adapter_metadata, next_free_name, resolve_in_folder, write_adapter
from ..core.config import parse_config
from ..core.targets import plan_for
from .checkpoint import (
    TrainingState,
    capture_rng,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from .checkpointing import memory_mode
from .data import TrainingSet
from .distributed import World
from .jobs import Job, JobCancelled, JobControl, JobStopped
from .objectives import Objective
from .optimizers import build_optimizer
from .predict import ComfyPredictor, encode_conditioning, model_space_latents, objective_for_model, stack_conditioning
from .step import Batch, StepResult
from .trainable import TrainableAdapter, comfy_base_weights

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Folders:
    checkpoints: Path  # this job's checkpoints
    adapters: Path  # where the final adapter file goes (models/loras)


@dataclass
class _Run:
    job: Job
    control: JobControl
    patcher: Any
    trainable: TrainableAdapter
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    folders: Folders
    config: Any
    world: World


def training_step(predict: ComfyPredictor, objective: Objective, batches: list[Batch], optimizer: torch.optim.Optimizer,
                  generator: torch.Generator, *, checkpointing: bool, max_grad_norm: float | None = None,
                  world: World | None = None) -> StepResult:
    """One optimizer step exactly as a job runs it (the bench times this very function).

    Autograd on (jobs run on threads where ComfyUI may have turned it off), the model's blocks
    checkpointed exactly or every saved activation kept (`checkpointing`), then the step itself:
    noise, forward with the trainable adapter in bypass, loss, backward, clip, optimizer step.
    """
    world = world or World()
    params = predict.trainable.parameters()
    with torch.enable_grad(), memory_mode(predict.base_model.diffusion_model, checkpointing):
        return world.train_step(predict, objective, batches, params, optimizer, generator, max_grad_norm)


def _encoded_items(patcher: Any, data: TrainingSet, device: torch.device, guidance: float) -> list[tuple]:
    """Model-space latents and model inputs per item (and for the dropout caption), computed once."""
    model = patcher.model
    items = []
    for i, latent in enumerate(data.latents):
        x0 = model_space_latents(model, latent[None].to(device).clone())
        cond = encode_conditioning(model, data.conditioning(i), x0, guidance)
        items.append((x0, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in cond.items()}))
    return items


def _next_batch(data: TrainingSet, items: list[tuple], order, generator: torch.Generator, empty: dict | None) -> Batch:
    indices = next(order)
    conds = [empty if empty is not None and data.drop_caption(generator) else items[i][1] for i in indices]
    return Batch(torch.cat([items[i][0] for i in indices]), stack_conditioning(conds))


def _checkpoint(run: _Run, step: int) -> Path:
    path = run.folders.checkpoints / checkpoint_name(step)
    if run.world.is_main:  # one writer per folder; the state is the same on every rank
        state = TrainingState(step, run.trainable.state_dict(), run.optimizer.state_dict(),
                              capture_rng({"data": run.generator}), {"spec": run.job.spec.to_json()})
        path = save_checkpoint(run.folders.checkpoints, state, keep_last=run.job.spec.keep_last)
    run.world.barrier()
    run.control.publish(run.trainable.to_loaded(f"{run.job.name}@{step}", run.config), str(path))
    return path


def _resume(run: _Run) -> int:
    """Continue from the job folder's latest checkpoint, if any: adapter, optimizer, RNG, step."""
    latest = latest_checkpoint(run.folders.checkpoints)
    if latest is None:
        return 0
    state = load_checkpoint(latest)
    run.trainable.load_state_dict(state.adapter)
    run.optimizer.load_state_dict(state.optimizer)
    restore_rng(state.rng, {"data": run.generator})
    run.control.publish(run.trainable.to_loaded(f"{run.job.name}@{state.step}", run.config), str(latest))
    return state.step


def _final_file(run: _Run) -> Path:
    spec, folder = run.job.spec, run.folders.adapters
    written = ""
    if run.world.is_main:  # rank 0 writes (atomically); the others wait for its path
        name = spec.output_name
        if resolve_in_folder(folder, name).exists():
            name = next_free_name(folder, name)
        metadata = adapter_metadata(run.config.to_json(), run.trainable.family, run.config.algo,
                                    {"steps": run.job.step, "seed": spec.seed})
        written = str(write_adapter(folder, name, run.trainable.state_dict(), metadata))
    return Path(run.world.broadcast_text(written))


def run_training(job: Job, control: JobControl, patcher: Any, data: TrainingSet, folders: Folders,
                 world: World | None = None) -> Path:
    """Train `job` on `patcher` (a ComfyUI MODEL, whose weights keep their values) and `data`.

    Returns the adapter file. Runs with autograd on even when called from a ComfyUI node thread.
    `world`: this process's rank among data-parallel processes (`trainer.distributed`); None: one process.
    """
    with torch.inference_mode(False):
        return _run_training(job, control, patcher, data, folders, world or World())


def _run_training(job: Job, control: JobControl, patcher: Any, data: TrainingSet, folders: Folders,
                  world: World) -> Path:
    spec = job.spec
    config = parse_config(spec.config_json)
    device = host.prepare_for_training(patcher)
    host.detach_from_inference_mode(patcher)
    host.freeze_base(patcher)
    unet_config = host.model_unet_config(patcher)
    plan = plan_for(config, unet_config)
    trainable = TrainableAdapter.from_plan(plan, unet_config, comfy_base_weights(patcher.model.diffusion_model), config,
                                           seed=spec.seed, dtype=_DTYPES[spec.dtype], device=device,
                                           init_device=device)
    optimizer = build_optimizer(spec, trainable.parameters())
    generator = torch.Generator().manual_seed(spec.seed)
    run = _Run(job, control, patcher, trainable, optimizer, generator, folders, config, world)
    start = _resume(run)
    world.sync_start(start, trainable.parameters())
    objective = objective_for_model(patcher.model, trainable.family, shift=spec.flow_shift or 3.0,
                                    resolution_dependent=spec.flow_shift == 0, guidance=spec.guidance,
                                    min_snr_gamma=spec.min_snr_gamma or None)
    items = _encoded_items(patcher, data, device, spec.guidance)
    empty = None
    if data.empty_conditioning is not None:
        empty = {k: v.clone() if isinstance(v, torch.Tensor) else v
                 for k, v in encode_conditioning(patcher.model, data.empty_conditioning, items[0][0], spec.guidance).items()}
    order = data.batches(spec.batch_size, generator)
    predict = ComfyPredictor(patcher.model, trainable)
    for step in range(start, spec.steps):
        control.pause_while_busy()
        if control.cancelled():
            _checkpoint(run, step)
            raise JobCancelled()
        host.prepare_for_training(patcher)
        lr = spec.learning_rate_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [_next_batch(data, items, order, generator, empty) for _ in range(spec.grad_accumulation)]
        result = training_step(predict, objective, batches, optimizer, generator,
                               checkpointing=spec.gradient_checkpointing, max_grad_norm=spec.max_grad_norm or None,
                               world=world)
        if not result.finite:
            if spec.nan_policy == "stop":
                kept = f"; last good checkpoint kept: {job.checkpoint}" if job.checkpoint else ""
                raise JobStopped(f"step {step + 1}: {result.message}{kept}")
            job.message = f"step {step + 1} skipped: {result.message}"
        control.report(step + 1, result.loss if math.isfinite(result.loss) else float("nan"), lr)
        if (step + 1) % spec.save_every == 0 and step + 1 < spec.steps:
            _checkpoint(run, step + 1)
    _checkpoint(run, job.step)
    path = _final_file(run)
    control.publish(trainable.to_loaded(job.name, config), job.checkpoint)
    job.message = f"finished {job.step} steps; adapter saved to {path}"
    return path
