"""Training nodes: a dataset from latents + conditioning, Train LyCORIS (submits a background job),
and LyCORIS Job (wait for it, or take its latest checkpoint)."""

from __future__ import annotations

import functools
import time
import uuid
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..core import host
from ..core.config import ConfigError, parse_config
from ..core.loss_plot import loss_curve
from ..core.memory_estimate import estimate_training_memory, pixels_for_latent
from ..core.paths import resolve_inside
from ..core.targets import plan_for
from ..trainer.checkpoint import list_checkpoints
from ..trainer.data import DatasetError, encoded_set, folder_items, from_latent_batch, load_image, split_captions
from ..trainer.init_lora import InitLoraError, check_init_file
from ..trainer.job_folders import newest_folder, reserve_folder
from ..trainer.jobs import ACTIVE
from ..trainer.loop import Folders, run_training
from ..trainer.preflight import PreflightError, preflight
from ..trainer.spec import DTYPES, NAN_POLICIES, OPTIMIZERS, SCHEDULES, JobSpec, SpecError, check_output_name
from . import job_service
from .types import TRAIN_CATEGORY, LycorisAdapter, LycorisConfig, LycorisDataset, LycorisJob, LycorisValidation

job_service.register_routes()


class LatentDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisLatentDataset",
            display_name="LyCORIS Dataset (latents)",
            category=TRAIN_CATEGORY,
            description="A training set from a LATENT batch (e.g. VAE Encode of your images) and its conditioning "
                        "(one CONDITIONING for every item). Items of different sizes train in separate batches.",
            inputs=[
                io.Latent.Input("latents", tooltip="The training images as latents (a batch)."),
                io.Conditioning.Input("conditioning", tooltip="The caption's conditioning, used for every item."),
                io.Int.Input("repeats", default=1, min=1, max=1000, tooltip="How often each item appears per epoch."),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Probability of training an item on the empty conditioning instead."),
                io.Conditioning.Input("empty_conditioning", optional=True,
                                      tooltip="The empty caption's conditioning, needed when caption_dropout > 0."),
            ],
            outputs=[LycorisDataset.Output("dataset", display_name="dataset", tooltip="For Train LyCORIS.")],
        )

    @classmethod
    def execute(cls, latents, conditioning, repeats, caption_dropout, empty_conditioning=None) -> io.NodeOutput:
        if caption_dropout > 0 and empty_conditioning is None:
            raise ValueError("caption_dropout: connect empty_conditioning (the empty caption) to use dropout")
        try:
            data = from_latent_batch(latents, conditioning, repeats, caption_dropout, empty_conditioning)
        except DatasetError as err:
            raise ValueError(str(err)) from None
        return io.NodeOutput(data, ui=ui.PreviewText(f"{len(data)} items, {len(data.buckets())} size bucket(s)"))


def _encoding_inputs() -> list:
    """The inputs both encoding dataset nodes share (VAE, text encoder, repeats, dropout)."""
    return [
        io.Vae.Input("vae", tooltip="The model's VAE (encodes the images)."),
        io.Clip.Input("clip", tooltip="The model's text encoder (encodes the captions)."),
        io.Int.Input("repeats", default=1, min=1, max=1000, tooltip="How often each item appears per epoch."),
        io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Probability of training an item on the empty caption instead."),
    ]


def _encoders(vae, clip):
    def encode_image(pixels):
        return vae.encode(pixels)

    def encode_text(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    return encode_image, encode_text


class ImageDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisImageDataset",
            display_name="LyCORIS Dataset (images)",
            category=TRAIN_CATEGORY,
            description="A training set from images and captions, encoded once with the model's VAE and text "
                        "encoder and cached. One caption per line (or one line for every image).",
            inputs=[
                io.Image.Input("images", tooltip="The training images (a batch)."),
                io.String.Input("captions", multiline=True, default="",
                                tooltip="One caption per line, in image order; a single line captions every image."),
                *_encoding_inputs(),
            ],
            outputs=[LycorisDataset.Output("dataset", display_name="dataset", tooltip="For Train LyCORIS.")],
        )

    @classmethod
    def execute(cls, images, captions, vae, clip, repeats, caption_dropout) -> io.NodeOutput:
        try:
            texts = split_captions(captions, images.shape[0])
            data = encoded_set(list(images), texts, *_encoders(vae, clip), repeats, caption_dropout)
        except DatasetError as err:
            raise ValueError(str(err)) from None
        return io.NodeOutput(data, ui=ui.PreviewText(f"{len(data)} items, {len(data.buckets())} size bucket(s)"))


class FolderDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisFolderDataset",
            display_name="LyCORIS Dataset (folder)",
            category=TRAIN_CATEGORY,
            description="A training set from a folder inside ComfyUI's input folder: every image with a same-name "
                        ".txt caption, encoded once with the VAE and text encoder. Images of different sizes train "
                        "in separate buckets.",
            inputs=[
                io.String.Input("folder", default="training/my_set",
                                tooltip="Folder under ComfyUI's input folder (no '..')."),
                *_encoding_inputs(),
            ],
            outputs=[LycorisDataset.Output("dataset", display_name="dataset", tooltip="For Train LyCORIS.")],
        )

    @classmethod
    def execute(cls, folder, vae, clip, repeats, caption_dropout) -> io.NodeOutput:
        path = resolve_inside(folder_paths.get_input_directory(), folder, "folder", new=False,
                              where="ComfyUI's input folder")
        try:
            items = folder_items(str(path))
            images = [load_image(p) for p, _ in items]
            data = encoded_set(images, [c for _, c in items], *_encoders(vae, clip), repeats, caption_dropout)
        except DatasetError as err:
            raise ValueError(str(err)) from None
        return io.NodeOutput(data, ui=ui.PreviewText(f"{len(data)} items from {folder}"))


NO_INIT = "none"  # init_lora: start from LyCORIS's own init


def _init_lora_files() -> list[str]:
    return [NO_INIT, *(f for f in folder_paths.get_filename_list("loras") if f.lower().endswith(".safetensors"))]


def init_lora_path(name: str) -> Path:
    """The file `init_lora` names in ComfyUI's loras folder(s) (core.paths rules); a node error if there is none."""
    for root in folder_paths.get_folder_paths("loras"):
        path = resolve_inside(root, name, "init_lora", new=False, where="the loras folder")
        if path.is_file():
            return path
    raise ValueError(f"init_lora: {name} is not in the loras folder")


def job_spec(label: str, config, **training) -> JobSpec:
    """The JobSpec of a training node's inputs (the JobSpec fields it has, by name); a bad value is a node
    error naming the field."""
    if training.get("init_lora") == NO_INIT:
        training["init_lora"] = ""
    try:
        parse_config(config.to_json())
        return JobSpec(config.to_json(), **training)
    except (SpecError, ConfigError) as err:
        raise ValueError(f"{label}: {err}") from None


def check_submission(label: str, config, model, dataset, spec: JobSpec) -> list[str]:
    """Preflight of a training submission against its model and data: warnings, or a node error naming the field."""
    try:
        warnings = preflight(config, host.model_unet_config(model), dataset, spec,
                             latent_channels=host.latent_layout(model)[0])
        if spec.init_lora:
            check_init_file(init_lora_path(spec.init_lora), plan_for(config, host.model_unet_config(model)))
        return warnings
    except (PreflightError, InitLoraError) as err:
        raise ValueError(f"{label}: {err}") from None


def memory_line(config, model, dataset, spec: JobSpec) -> str:
    """The estimated peak memory of this job's step, at its largest size bucket."""
    unet_config = host.model_unet_config(model)
    shape = max(dataset.buckets(), key=lambda s: s[-2] * s[-1])  # (channels, height, width)
    pixels = pixels_for_latent(unet_config, shape[-2], shape[-1])
    estimate = estimate_training_memory(unet_config, plan_for(config, unet_config), width=pixels[0],
                                        height=pixels[1], batch=spec.batch_size,
                                        checkpointing=spec.gradient_checkpointing, optimizer=spec.optimizer,
                                        train_dtype=spec.dtype, **host.memory_settings(model))
    return estimate.summary().splitlines()[0]


def output_name_problem(output_name) -> bool | str:
    """A bad output_name refuses the prompt before any node runs (None: linked, checked at run)."""
    if output_name is None:
        return True
    try:
        check_output_name(output_name)
    except SpecError as err:
        return str(err)
    return True


def jobs_root() -> Path:
    """Where job folders live: ComfyUI's output folder / lycoris_jobs."""
    return Path(folder_paths.get_output_directory()) / "lycoris_jobs"


def job_folder(output_name: str, resume: bool, steps: int) -> tuple[Path, str]:
    """The folder a new job owns (reserved now) or, with resume, the newest job's of that name; and a note.

    A resumed job that is still queued or running, or already complete, is a node error.
    """
    root = jobs_root()
    if resume:
        folder = newest_folder(root, output_name)
        if folder is not None:
            running = job_service.queue().active_in(folder)
            if running is not None:
                raise ValueError(f"resume: job {running.id} is still {running.state} in {folder.name}; "
                                 "cancel it or wait for it before resuming")
            done = list_checkpoints(folder)
            if done and done[-1][0] >= steps:
                raise ValueError(f"resume: the job in {folder.name} is already complete (step {done[-1][0]} of "
                                 f"{steps}); nothing changed. Raise steps to train it further")
            latest = f"latest checkpoint: step {done[-1][0]}" if done else "no checkpoint yet: starts at step 0"
            return folder, f"resumes {folder.name} ({latest})"
    try:
        folder = reserve_folder(root, output_name)
    except OSError as err:
        raise ValueError(str(err)) from None
    note = "resume: no earlier job of this name, starts at step 0" if resume else "new job"
    return folder, f"{note}; folder {folder.name}"


def _train(spec: JobSpec, name: str, model, dataset, folders: Folders, resume: bool, warnings: list[str],
           validation, control) -> str:
    """A job's work: the training loop with the queue's control as its reporter; its message keeps the warnings."""
    message = run_training(spec, name, model, dataset, folders, control, resume=resume,
                           validation=validation).message
    return "\n".join([message, *(f"warning: {w}" for w in warnings)])


class _Submissions:
    """Which job the last run of a Train node with these exact inputs submitted, for `fingerprint_inputs`."""

    def __init__(self, keep: int = 64):
        self.keep = keep
        self._last: dict[tuple, tuple[str, str | None]] = {}  # input key -> (fingerprint, job id)

    @staticmethod
    def _key(inputs: dict) -> tuple:
        """The widget values: ComfyUI fingerprints before linked inputs exist; its cache keys those itself."""
        plain = (int, float, str, bool)
        return tuple(sorted((k, v) for k, v in inputs.items() if isinstance(v, plain)))

    def fingerprint(self, inputs: dict) -> str:
        fingerprint, job_id = self._last.get(self._key(inputs), (None, None))
        if fingerprint is not None and job_id is not None:
            try:
                if job_service.queue().get(job_id).state in ACTIVE:
                    return fingerprint
            except ValueError:
                pass
        fingerprint = uuid.uuid4().hex
        self._remember(self._key(inputs), (fingerprint, None))
        return fingerprint

    def submitted(self, inputs: dict, job_id: str) -> None:
        key = self._key(inputs)
        self._remember(key, (self._last.get(key, (uuid.uuid4().hex, None))[0], job_id))

    def _remember(self, key: tuple, value: tuple[str, str | None]) -> None:
        self._last.pop(key, None)
        self._last[key] = value
        while len(self._last) > self.keep:
            del self._last[next(iter(self._last))]


_submissions = _Submissions()


class TrainLycoris(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisTrain",
            display_name="Train LyCORIS",
            category=TRAIN_CATEGORY,
            description=(
                "Submits a training job and returns at once: the job trains in the background while the queue "
                "stays free (it pauses while a prompt runs). Checkpoints are written atomically every save_every "
                "steps and on cancel; resume continues from the latest. Objective per family: rectified flow for "
                "Flux / Flux 2, epsilon (or v) for SDXL; T-LoRA masks from each sample's timestep."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base model (not modified)."),
                LycorisDataset.Input("dataset", tooltip="From LyCORIS Dataset."),
                LycorisConfig.Input("config", tooltip="From LyCORIS Config: algorithm and targets."),
                io.Int.Input("steps", default=200, min=1, max=1_000_000, tooltip="Optimizer steps."),
                io.Int.Input("batch_size", default=1, min=1, max=256, tooltip="Items per micro-batch."),
                io.Int.Input("grad_accumulation", default=1, min=1, max=256, tooltip="Micro-batches per step."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-7, max=1.0, step=1e-5, round=1e-7,
                               tooltip="Peak learning rate."),
                io.Combo.Input("lr_schedule", options=list(SCHEDULES), default="constant",
                               tooltip="Learning-rate schedule after warmup."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100_000, tooltip="Linear warmup steps."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw",
                               tooltip="adamw8bit needs bitsandbytes, prodigy needs prodigyopt."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of init, noise and data order."),
                io.Combo.Input("dtype", options=list(DTYPES), default="float32",
                               tooltip="dtype of the trained adapter tensors."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="On: recompute each block in backward (exact; memory near the base model's "
                                         "forward). Off: keep every activation (faster, much more memory)."),
                io.Int.Input("save_every", default=50, min=1, max=100_000, tooltip="Checkpoint interval in steps."),
                io.Int.Input("keep_last", default=3, min=1, max=1000, tooltip="Checkpoints kept."),
                io.Combo.Input("nan_policy", options=list(NAN_POLICIES), default="stop",
                               tooltip="On a non-finite loss: stop (keeping the last good checkpoint) or skip the step."),
                io.String.Input("output_name", default="lycoris/trained",
                                tooltip="Adapter file name in models/loras (and the checkpoint folder name)."),
                io.Combo.Input("init_lora", options=_init_lora_files(), default=NO_INIT, optional=True,
                               tooltip="Start from this LyCORIS file in models/loras (SimpleTuner's --init_lora) "
                                       "instead of a fresh init; it must fit the config (same algo, dims and "
                                       "targets), else the prompt is refused naming the first key that differs."),
                io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.9999, step=0.0001, round=0.0001,
                               optional=True,
                               tooltip="Keep an EMA of the adapter (SimpleTuner's --use_ema / --ema_decay; its "
                                       "default is 0.995) and save it as ema/<name>.safetensors beside the adapter. "
                                       "0 = off. Kept in float32 on the CPU."),
                io.Int.Input("ema_update_interval", default=1, min=1, max=100_000, optional=True,
                             tooltip="Update the EMA every N optimizer steps (SimpleTuner's --ema_update_interval)."),
                io.String.Input("trigger_words", default="", optional=True,
                                tooltip="Comma-separated trigger words, written into the saved files' metadata as "
                                        "SimpleTuner does (trained_words, with ModelSpec title and architecture)."),
                io.Float.Input("init_lokr_norm", default=0.0, min=0.0, max=10.0, step=1e-4, round=1e-6, optional=True,
                               tooltip="LoKr's perturbed-normal init (SimpleTuner's --init_lokr_norm; good values "
                                       "1e-4 to 1e-2): lokr_w1 = 1 and lokr_w2 = a normal draw with the base "
                                       "weight's norm, std and mean, times this. Needs algo lokr with full_matrix "
                                       "true. 0 = off (LyCORIS's own init). Dropouts come from the config "
                                       "(dropout, rank_dropout, module_dropout)."),
                LycorisValidation.Input("validation", optional=True,
                                        tooltip="From LyCORIS Validation: previews while training."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="On: continue the newest job of output_name from its newest intact checkpoint "
                                         "(says which). Off: always a new job in a new folder."),
            ],
            outputs=[LycorisJob.Output("job", display_name="job", tooltip="For LyCORIS Job.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, dataset, config, resume, validation=None, **training) -> io.NodeOutput:
        spec = job_spec("Train LyCORIS", config, **training)
        warnings = check_submission("Train LyCORIS", config, model, dataset, spec)
        folder, note = job_folder(spec.output_name, resume, spec.steps)
        folders = Folders(folder, Path(folder_paths.get_folder_paths("loras")[0]),
                          init_lora_path(spec.init_lora) if spec.init_lora else None)
        work = functools.partial(_train, spec, spec.output_name, model, dataset, folders, resume, warnings, validation)
        job = job_service.queue().submit(spec, work, name=spec.output_name, folder=folder)
        _submissions.submitted({"model": model, "dataset": dataset, "config": config, "resume": resume, **training},
                               job.id)
        text = "\n".join([f"job {job.id} submitted: {spec.steps} steps; {note}",
                          memory_line(config, model, dataset, spec), *(f"warning: {w}" for w in warnings)])
        return io.NodeOutput(job, ui={"job_id": [job.id], "text": [text]})

    @classmethod
    def validate_inputs(cls, output_name) -> bool | str:
        return output_name_problem(output_name)

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        """While this node's job is queued or running, queueing the same prompt again reuses it (a graph that
        samples with the live checkpoint can be queued again); once the job has ended, a new job (or a resume)."""
        return _submissions.fingerprint(inputs)


class LycorisJobNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisJob",
            display_name="LyCORIS Job",
            category=TRAIN_CATEGORY,
            description="A training job's adapter and loss curve: wait for the job to finish (Cancel stops the "
                        "wait, not the job), or take its latest checkpoint now.",
            inputs=[
                LycorisJob.Input("job", tooltip="From Train LyCORIS."),
                io.Boolean.Input("wait", default=False,
                                 tooltip="Wait until the job ends; off: use the latest checkpoint right away."),
            ],
            outputs=[
                LycorisAdapter.Output("adapter", display_name="adapter", tooltip="The trained (or latest) adapter."),
                io.Image.Output("loss", display_name="loss curve", tooltip="Raw and smoothed loss so far."),
                io.Image.Output("validation", display_name="validation",
                                tooltip="The latest validation previews (one image per strength; "
                                        "an empty image without validation)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, job, wait):
        return (job.id, wait) if wait else (job.id, job.checkpoint, job.state)

    @classmethod
    def execute(cls, job, wait) -> io.NodeOutput:
        if wait:
            _wait(job)
        elif job.adapter is None:
            _wait(job, until_checkpoint=True)
        if job.adapter is None:
            raise ValueError(f"LyCORIS Job {job.id}: {job.state}, no checkpoint to use ({job.message})")
        text = f"job {job.id}: {job.state}, step {job.step}/{job.spec.steps}. {job.message}".strip()
        previews = torch.cat(job.previews) if job.previews else torch.zeros(1, 64, 64, 3)
        return io.NodeOutput(job.adapter, loss_curve(job.losses, title=f"loss: {job.name}"), previews,
                             ui={"job_id": [job.id], "text": [text]})


def _wait(job, until_checkpoint: bool = False) -> None:
    """Block this prompt (not the trainer) until the job ends or has a checkpoint; Cancel interrupts."""
    import comfy.model_management as mm
    from comfy.utils import ProgressBar

    bar = ProgressBar(job.spec.steps)
    with job_service.waiting_for_job():
        while job.state in ACTIVE and not (until_checkpoint and job.adapter is not None):
            mm.throw_exception_if_processing_interrupted()
            bar.update_absolute(job.step, job.spec.steps)
            time.sleep(0.1)


NODES = [LatentDataset, ImageDataset, FolderDataset, TrainLycoris, LycorisJobNode]
