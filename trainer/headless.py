"""Headless runs of an exported job folder: the same loop as the Train node, without a server.

`python -m trainer run <job folder | job.json>` (see `trainer/__main__.py`), also under
`torchrun` for data parallel training (`trainer.distributed`). Rank 0 prints one progress line
per `--log-every` steps; the process ends with exit code 0 when the adapter is written, else
non-zero with a one-line reason on stderr: 1 failed, 2 unusable job or arguments (a job.json
field of the wrong type or range, a bad LyCORIS config or tiny recipe, checkpoints that exist but
are all corrupt; the message names the field or lists each file and why), 3 stopped (non-finite
loss), 4 cancelled (SIGINT / SIGTERM: a checkpoint is written first when possible).

A model file is loaded as the graph loaded it: a diffusion model through core's Load Diffusion
Model with the job's `weight_dtype` (fp8_e4m3fn...; "default" for jobs exported before the field),
a checkpoint as Load Checkpoint does; the run says which dtype the linear weights are held in.

Resume takes the newest intact checkpoint (`checkpoint.resume_point`; corrupt newer ones are named
on stderr and skipped). Running a job again after it finished (a checkpoint at the last step)
says it is already complete, names the adapter file (`checkpoint.final_adapter`) or says it is
missing, and exits 0 without loading the model or writing anything.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, TextIO

import torch

from ..core import host
from ..core.adapter_set import architecture_key
from ..core.dtypes import TORCH_DTYPES
from ..core.paths import PathNameError, resolve_inside
from .checkpoint import CheckpointError, ResumePoint, final_adapter, resume_point
from .distributed import World, init_from_env, shutdown
from .jobfile import MODEL_FOLDERS, JobFileError, ModelRef, load_dataset, read_job
from .jobs import Job, JobCancelled, JobControl, JobQueue, JobStopped
from .loop import Folders, run_training
from .spec import SpecError

EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_CANCELLED = 1, 2, 3, 4
# Test hook: "<rank>:<step>" makes that rank exit at once (os._exit) right after finishing that step.
EXIT_AT_ENV = "LYCORIS_TRAINER_EXIT_AT"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Run an exported LyCORIS training job.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train a job folder (also under torchrun for several processes/GPUs)")
    run.add_argument("job", type=Path, help="job folder (or its job.json), from the Export LyCORIS Job node")
    run.add_argument("--loras", type=Path, default=None,
                     help="folder for the final adapter (default: <job>/loras)")
    run.add_argument("--model", type=Path, default=None,
                     help="base model file, overriding the job's reference (file kinds only)")
    run.add_argument("--log-every", type=int, default=1, metavar="N", help="print progress every N steps")
    run.add_argument("--traceback", action="store_true", help="on failure, print the traceback too")
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {text}"[:2000]


def _force_cpu_without_cuda() -> None:
    """Before ComfyUI's model management is imported: without CUDA, ComfyUI must use the CPU."""
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True


def load_model(model: ModelRef, override: Path | None = None) -> Any:
    """The base model of a job reference as a ComfyUI MODEL; checks its architecture."""
    if model.kind == "tiny":
        patcher = host.build_tiny_model(model.tiny, TORCH_DTYPES.get(model.dtype, torch.float32))
    else:
        import folder_paths

        candidates = [override] if override else [Path(model.path)] if model.path else []
        if not override and model.file:
            found = folder_paths.get_full_path(MODEL_FOLDERS[model.kind], model.file)
            candidates.append(Path(found) if found else None)
        path = next((p for p in candidates if p is not None and p.is_file()), None)
        if path is None:
            raise JobFileError(f"model: {model.describe()} not found (looked at "
                               f"{', '.join(str(p) for p in candidates if p) or 'nothing'}); pass --model PATH")
        if model.kind == "diffusion_model":  # with the weight dtype the job was exported with (fp8...)
            offered = host.unet_weight_dtypes()
            if model.weight_dtype not in offered:
                raise JobFileError(f"model.weight_dtype: this ComfyUI's Load Diffusion Model offers "
                                   f"{', '.join(offered)} (got {model.weight_dtype!r})")
            patcher = host.load_diffusion_model_file(path, model.weight_dtype)
        else:
            patcher = host.load_checkpoint_model_file(path)
    if model.architecture and architecture_key(host.model_unet_config(patcher)) != model.architecture:
        raise JobFileError(f"model: {model.describe()} is not the architecture the job was exported for")
    return patcher


def find_init_lora(job_loras: Path, name: str) -> Path | None:
    """A job's `init_lora` file: in the job folder's loras/ (where Export copies it), else in ComfyUI's loras
    folder of this machine; None when neither has it (the run stops saying so)."""
    if not name:
        return None
    try:
        path = resolve_inside(job_loras, name, "spec.init_lora", new=False, where="the job's loras folder")
    except PathNameError as err:
        raise JobFileError(str(err)) from None
    if path.is_file():
        return path
    import folder_paths

    found = folder_paths.get_full_path("loras", name)
    return Path(found) if found else None


class HeadlessControl(JobControl):
    """Progress lines on rank 0, cancel requests agreed across ranks, and the rank-exit test hook."""

    def __init__(self, job: Job, world: World, log_every: int, out: TextIO):
        super().__init__(job, JobQueue())
        self.world, self.log_every, self.out = world, max(1, log_every), out
        hook = os.environ.get(EXIT_AT_ENV, "")
        self.exit_at = tuple(int(x) for x in hook.split(":")) if hook else None

    def cancelled(self) -> bool:  # the loop asks once per step, on every rank: so this may be a collective
        return self.world.any(self.job.cancel_event.is_set())

    def say(self, message: str) -> None:  # the loop's status lines (resume decisions, skipped steps)
        self.job.message = message
        if self.world.is_main:
            print(message, file=self.out, flush=True)

    def preview(self, previews: list, seconds: float) -> None:  # rank 0 renders; it tells where they went
        super().preview(previews, seconds)
        for preview in previews:
            print(f"validation step {preview.step} strength {preview.strength:g}: {preview.path} ({seconds:.1f}s)",
                  file=self.out, flush=True)

    def report(self, step: int, loss: float, lr: float) -> None:
        super().report(step, loss, lr)
        if self.exit_at == (self.world.rank, step):
            os._exit(17)
        steps = self.job.spec.steps
        if self.world.is_main and (step % self.log_every == 0 or step == steps):
            eta = f"{self.job.eta_s:.0f}s" if self.job.eta_s is not None else "?"
            print(f"step {step}/{steps} loss {loss:.6g} lr {lr:.3g} {self.job.its:.2f} it/s eta {eta}",
                  file=self.out, flush=True)


def _on_signal(job: Job) -> dict:
    """SIGINT / SIGTERM cancel the job after the current step (checkpoint kept); returns the old handlers."""

    def handler(signum, frame):
        job.cancel_event.set()
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once

    return {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}


def find_resume_point(checkpoints: Path) -> ResumePoint | None:
    """`resume_point`, with all-corrupt checkpoints as an unusable job folder (exit code 2), not a failure."""
    try:
        return resume_point(checkpoints)
    except CheckpointError as err:
        raise JobFileError(f"checkpoints: {err}") from None


def run_job(args: argparse.Namespace, world: World, out: TextIO = sys.stdout) -> int:
    """Load the job folder, the model and the dataset; train; return the exit code."""
    _force_cpu_without_cuda()

    def say(text: str, stream: TextIO | None = None) -> None:  # decisions all ranks share: rank 0 tells
        if world.is_main:
            print(text, file=stream or out, flush=True)

    folder = read_job(args.job)
    spec = folder.spec
    folders = Folders(folder.checkpoints, args.loras or folder.loras, find_init_lora(folder.loras, spec.init_lora))
    resume = find_resume_point(folders.checkpoints)  # before loading anything heavy
    start = resume.step if resume is not None else 0
    world.agree(start, "resume step")
    if resume is not None:
        for note in resume.notes:
            say(f"warning: {note}", sys.stderr)
    if start >= spec.steps:  # finished: say so, name the adapter, write nothing (the loop is never entered)
        adapter = world.broadcast_text(str(final_adapter(folders.adapters, spec.output_name, start) or ""))
        found = f"adapter: {adapter}" if adapter else (f"no adapter of {start} steps named {spec.output_name} "
                                                        f"in {folders.adapters}")
        say(f"job {folder.folder} is already complete ({start} of {spec.steps} steps, {resume.path.name}); "
            f"{found}; nothing to do")
        return 0
    say(f"job {folder.folder}: {spec.steps} steps, global batch {spec.batch_size} x {spec.grad_accumulation}, "
        f"{world.size} process(es){f' ({world.backend})' if world.size > 1 else ''}, model {folder.model.describe()}")
    if spec.batch_size % world.size:
        say(f"warning: batch_size {spec.batch_size} does not split evenly over {world.size} processes")
    started = time.monotonic()
    patcher = load_model(folder.model, args.model)
    settings = host.memory_settings(patcher)
    say(f"base model loaded: linear weights {', '.join(host.linear_weight_dtypes(patcher))}, computed in "
        f"{str(settings['compute_dtype']).removeprefix('torch.')}")
    data = load_dataset(folder.dataset)
    if resume is not None:
        say(f"resuming from {resume.path.name}")
    job = Job(uuid.uuid4().hex[:12], folder.name, spec, None)
    job.state, job.step = "running", start  # the loop's report() moves job.step on from here
    control = HeadlessControl(job, world, args.log_every, out)
    previous = _on_signal(job)
    try:
        outcome = run_training(spec, folder.name, patcher, data, folders, control, world, resume=True,
                               validation=folder.validation)
    except JobCancelled:
        say(f"cancelled at step {job.step}; checkpoint kept: {job.checkpoint}", sys.stderr)
        return EXIT_CANCELLED
    except JobStopped as stop:
        say(f"stopped: {stop}", sys.stderr)
        return EXIT_STOPPED
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    result = f"adapter saved to {outcome.path}" if outcome.path else outcome.message
    say(f"done in {time.monotonic() - started:.1f}s: trained steps {start + 1} to {outcome.steps} of {spec.steps}; "
        f"{result}")
    return 0


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = _parser().parse_args(argv)
    world = World()
    try:
        world = init_from_env()
        return run_job(args, world, out)
    except (JobFileError, SpecError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except Exception as err:  # one line, not a traceback (unless asked): the reason is what the user needs
        if args.traceback:
            traceback.print_exc()
        where = f"rank {world.rank}: " if world.size > 1 else ""
        print(f"error: {where}{_one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    finally:
        shutdown(world)
