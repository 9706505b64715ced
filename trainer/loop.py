"""The training loop of one run: plan -> trainable adapter -> steps -> checkpoints -> adapter file.

It takes what it needs (spec, model, data, folders, a `Reporter` for progress) and knows nothing
of who runs it: the background job queue adapts its job records to a Reporter, the headless
runner (`python -m trainer run`, torchrun) passes its own. Setup and every step wait while a
ComfyUI prompt executes (`Reporter.pause_while_busy`); every `save_every` steps an atomic,
checksummed checkpoint is written and a snapshot adapter published that Apply LyCORIS can use
while training goes on.

Resuming is explicit: `resume=False` starts at step 0 in a folder that must hold no checkpoint;
`resume=True` continues from the newest intact checkpoint (newer corrupt ones are skipped and
named) and says which, or says there was none; a run that is already complete changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..core import host
from ..core.adapter_file import PACK_PREFIX, adapter_metadata, free_adapter_name, write_adapter
from ..core.config import LycorisConfig, parse_config
from ..core.dtypes import TORCH_DTYPES
from ..core.modelspec import modelspec_metadata, title_for
from ..core.targets import plan_for
from .checkpoint import (
    TrainingState,
    capture_rng,
    checkpoint_name,
    list_checkpoints,
    restore_rng,
    resume_point,
    save_checkpoint,
)
from .checkpointing import memory_mode
from .data import TrainingSet
from .distributed import World
from .ema import EMA_FOLDER, AdapterEMA
from .init_lora import InitLoraError, load_init_lora
from .jobs import JobCancelled, JobStopped
from .objectives import Objective
from .optimizers import build_optimizer
from .predict import ComfyPredictor, encode_conditioning, model_space_latents, objective_for_model, stack_conditioning
from .spec import JobSpec
from .step import Batch, StepResult
from .trainable import TrainableAdapter, comfy_base_weights
from .validation import Preview, Validation, render


class Reporter(Protocol):
    """Where a run reports to (the job queue's JobControl, the headless runner's control)."""

    def cancelled(self) -> bool: ...

    def pause_while_busy(self) -> None: ...

    def report(self, step: int, loss: float, lr: float) -> None: ...

    def publish(self, adapter: Any, checkpoint: str | None) -> None: ...

    def say(self, message: str) -> None: ...

    def preview(self, previews: list[Preview], seconds: float) -> None: ...


@dataclass
class Folders:
    checkpoints: Path  # this run's checkpoints (the run owns the folder)
    adapters: Path  # where the final adapter file goes (models/loras)
    init_lora: Path | None = None  # the file `spec.init_lora` names, found by the caller (None: not found)


@dataclass(frozen=True)
class Outcome:
    """What a run did: the adapter file it wrote (None when it was already complete), steps, a message."""

    path: Path | None
    steps: int
    message: str


@dataclass
class _Run:
    spec: JobSpec
    name: str
    reporter: Reporter
    trainable: TrainableAdapter
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    folders: Folders
    config: Any
    world: World
    patcher: Any = None
    validation: Validation | None = None
    step: int = 0
    checkpoint: str | None = None
    ema: AdapterEMA | None = None  # main process only (trainer.ema)
    resumed_ema: dict | None = None  # the EMA shadow of the checkpoint resumed from


def _modelspec(run: _Run, step: int) -> dict[str, str]:
    return modelspec_metadata(run.trainable.family, title_for(run.spec.output_name), step, run.spec.trigger_words)


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
        state = TrainingState(step, run.trainable.training_state(), run.optimizer.state_dict(),
                              capture_rng({"data": run.generator}), {"spec": run.spec.to_json()},
                              ema=run.ema.state_dict() if run.ema is not None else {},
                              file_metadata=_modelspec(run, step))
        path = save_checkpoint(run.folders.checkpoints, state, keep_last=run.spec.keep_last)
    run.world.barrier()
    run.checkpoint = str(path)
    run.reporter.publish(run.trainable.to_loaded(f"{run.name}@{step}", run.config), str(path))
    return path


def _resume(run: _Run, resume: bool) -> int:
    """The step to start from: a checkpoint's (adapter, optimizer, RNG restored) or 0, said out loud."""
    folder = run.folders.checkpoints
    if not resume:
        existing = list_checkpoints(folder) if folder.is_dir() else []
        if existing:
            raise JobStopped(f"{folder} already holds checkpoints ({existing[-1][1].name}) and resume is off: "
                             "this run never reads another run's state")
        return 0
    point = resume_point(folder) if folder.is_dir() else None
    if point is None:
        run.reporter.say(f"resume: no checkpoint in {folder}; starting at step 0")
        return 0
    state = point.state
    run.trainable.load_state_dict(state.adapter)
    run.optimizer.load_state_dict(state.optimizer)
    restore_rng(state.rng, {"data": run.generator})
    run.resumed_ema = state.ema
    run.checkpoint = str(point.path)
    run.reporter.publish(run.trainable.to_loaded(f"{run.name}@{state.step}", run.config), str(point.path))
    notes = "".join(f"; {note}" for note in point.notes)
    run.reporter.say(f"resumed from {point.path.name} (step {state.step}){notes}")
    return state.step


def _final_file(run: _Run) -> Path:
    spec, folder = run.spec, run.folders.adapters
    written = ""
    if run.world.is_main:  # rank 0 writes (atomically); the others wait for its path
        name = free_adapter_name(folder, spec.output_name, "output_name")
        extra = {"steps": run.step, "seed": spec.seed, "multiplier": run.config.multiplier,
                 "init_lora": spec.init_lora or None}
        metadata = {**adapter_metadata(run.config.to_json(), run.trainable.family, run.config.algo, extra),
                    **_modelspec(run, run.step)}
        state = run.trainable.state_dict()
        written = str(write_adapter(folder, name, state, metadata))
        if run.ema is not None:  # SimpleTuner's layout: <folder of the file>/ema/<same name>
            head, _, tail = name.rpartition("/")
            ema_meta = {**metadata, f"{PACK_PREFIX}ema_decay": str(spec.ema_decay),
                        f"{PACK_PREFIX}ema_update_interval": str(spec.ema_update_interval)}
            averaged = run.ema.saved_form(run.trainable.named_parameters(), run.trainable.state_dict)
            write_adapter(folder, "/".join(p for p in (head, EMA_FOLDER, tail) if p), averaged, ema_meta,
                          overwrite=True, input_name="output_name")
    return Path(run.world.broadcast_text(written))


def _take_init_lora(run: _Run, start: int) -> None:
    """A fresh run (not a resume) starts from the tensors of `spec.init_lora`, when it names a file."""
    spec = run.spec
    if start > 0 or not spec.init_lora:
        return
    if run.folders.init_lora is None:
        raise JobStopped(f"init_lora: {spec.init_lora} not found in the loras folder")
    try:
        taken = load_init_lora(run.folders.init_lora, run.trainable)
    except InitLoraError as err:
        raise JobStopped(str(err)) from None
    run.reporter.say(f"init_lora: started from {spec.init_lora} ({taken} tensors)")


def _start_ema(run: _Run, start: int) -> None:
    """Start the EMA (main process): from the checkpoint's shadow when resuming, else from the adapter as it
    is now (after the init file)."""
    spec = run.spec
    if spec.ema_decay <= 0 or not run.world.is_main:
        return
    run.ema = AdapterEMA(run.trainable.named_parameters(), spec.ema_decay, spec.ema_update_interval)
    if start > 0 and run.resumed_ema:
        run.ema.load_state_dict(run.resumed_ema)
    elif start > 0:
        run.reporter.say(f"ema: the checkpoint of step {start} holds no EMA; it starts from the resumed adapter")


def _validate(run: _Run, step: int, adapter: Any = None) -> None:
    """Render the validation previews after `step` steps (rank 0), once no prompt is running."""
    if run.validation is None or not run.world.is_main:
        return
    run.reporter.pause_while_busy()  # a queued prompt goes first
    adapter = adapter or run.trainable.to_loaded(f"{run.name}@{step}", run.config)
    previews, seconds = render(run.validation, run.patcher, adapter, step, run.folders.checkpoints)
    run.reporter.preview(previews, seconds)


@dataclass
class Setup:
    """What a job builds on its model before the first step (`prepare`)."""

    config: LycorisConfig
    device: torch.device
    trainable: TrainableAdapter
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # the job's: noise, timesteps, dropouts (checkpointed with the job)
    objective: Objective
    predict: ComfyPredictor


def prepare(spec: JobSpec, patcher: Any) -> Setup:
    """Make `patcher`'s model trainable (on its device, out of inference mode, base frozen) and build
    `spec`'s adapter, optimizer, objective and predictor on it, as a job does before its loop. The
    bench's training rows build their steps with this very function."""
    config = parse_config(spec.config_json)
    device = host.prepare_for_training(patcher)
    host.detach_from_inference_mode(patcher)
    host.freeze_base(patcher)
    unet_config = host.model_unet_config(patcher)
    trainable = TrainableAdapter.from_plan(plan_for(config, unet_config), unet_config,
                                           comfy_base_weights(patcher.model.diffusion_model), config, seed=spec.seed,
                                           dtype=TORCH_DTYPES[spec.dtype], device=device, init_device=device,
                                           init_lokr_norm=spec.init_lokr_norm)
    generator = torch.Generator().manual_seed(spec.seed)
    objective = objective_for_model(patcher.model, trainable.family, shift=spec.flow_shift or 3.0,
                                    resolution_dependent=spec.flow_shift == 0, guidance=spec.guidance,
                                    min_snr_gamma=spec.min_snr_gamma or None)
    # LyCORIS trains with the config's multiplier on every module's output (SimpleTuner passes it on).
    predict = ComfyPredictor(patcher.model, trainable, strength=config.multiplier, generator=generator)
    return Setup(config, device, trainable, build_optimizer(spec, trainable.parameters()), generator, objective,
                 predict)


def run_training(spec: JobSpec, name: str, patcher: Any, data: TrainingSet, folders: Folders, reporter: Reporter,
                 world: World | None = None, resume: bool = False, validation: Validation | None = None) -> Outcome:
    """Train `spec` on `patcher` (a ComfyUI MODEL, whose weights keep their values) and `data`.

    Runs with autograd on even when called from a ComfyUI node thread, and leaves ComfyUI's
    interrupt flag to the foreground prompt (jobs have their own cancel). `world`: this process's
    rank among data-parallel processes (`trainer.distributed`); None: one process. Raises
    JobCancelled (after a checkpoint) or JobStopped (a message saying why). `validation`: previews
    rendered at step 0, every `validation.every` steps and at the end (`trainer.validation`).
    """
    with torch.inference_mode(False), host.ignoring_comfy_interrupt():
        return _run_training(spec, name, patcher, data, folders, reporter, world or World(), resume, validation)


def _run_training(spec: JobSpec, name: str, patcher: Any, data: TrainingSet, folders: Folders, reporter: Reporter,
                  world: World, resume: bool, validation: Validation | None) -> Outcome:
    reporter.pause_while_busy()  # setup loads, copies and encodes: not while a prompt runs
    setup = prepare(spec, patcher)
    trainable, optimizer, generator, predict = setup.trainable, setup.optimizer, setup.generator, setup.predict
    run = _Run(spec, name, reporter, trainable, optimizer, generator, folders, setup.config, world, patcher, validation)
    start = _resume(run, resume)
    _take_init_lora(run, start)
    _start_ema(run, start)
    world.sync_start(start, trainable.parameters())
    if start >= spec.steps:
        return Outcome(None, start, f"already complete: step {start} of {spec.steps}; nothing changed")
    reporter.pause_while_busy()
    items = _encoded_items(patcher, data, setup.device, spec.guidance)
    empty = None
    if data.empty_conditioning is not None:
        empty = {k: v.clone() if isinstance(v, torch.Tensor) else v
                 for k, v in encode_conditioning(patcher.model, data.empty_conditioning, items[0][0], spec.guidance).items()}
    order = data.batches(spec.batch_size, spec.seed, start=start * spec.grad_accumulation)  # resume: same order
    run.step = start
    if start == 0:
        _validate(run, 0)
    for step in range(start, spec.steps):
        reporter.pause_while_busy()
        if reporter.cancelled():
            _checkpoint(run, step)
            raise JobCancelled()
        host.prepare_for_training(patcher)
        lr = spec.learning_rate_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [_next_batch(data, items, order, generator, empty) for _ in range(spec.grad_accumulation)]
        result = training_step(predict, setup.objective, batches, optimizer, generator,
                               checkpointing=spec.gradient_checkpointing, max_grad_norm=spec.max_grad_norm or None,
                               world=world)
        if not result.finite:
            if spec.nan_policy == "stop":
                kept = f"; last good checkpoint kept: {run.checkpoint}" if run.checkpoint else ""
                raise JobStopped(f"step {step + 1}: {result.message}{kept}")
            reporter.say(f"step {step + 1} skipped: {result.message}")
        run.step = step + 1
        if run.ema is not None:
            run.ema.update(step + 1, trainable.named_parameters())
        reporter.report(step + 1, result.loss if math.isfinite(result.loss) else float("nan"), lr)
        if (step + 1) % spec.save_every == 0 and step + 1 < spec.steps:
            _checkpoint(run, step + 1)
        if validation is not None and step + 1 < spec.steps and validation.due(step + 1, spec.steps):
            _validate(run, step + 1)
    _checkpoint(run, run.step)
    path = _final_file(run)
    final = trainable.to_loaded(name, setup.config)
    reporter.publish(final, run.checkpoint)
    _validate(run, run.step, final)
    return Outcome(path, run.step, f"finished {run.step} steps; adapter saved to {path}")
