"""Headless runs of an exported job folder: the same loop as the Train node, without a server.

`python -m trainer run <job folder | job.json>` (see `trainer/__main__.py`), also under
`torchrun` for data parallel training (`trainer.distributed`). Rank 0 prints one progress line
per `--log-every` steps; the process ends with exit code 0 when the adapter is written, else
non-zero with a one-line reason on stderr: 1 failed, 2 unusable job or arguments, 3 stopped
(non-finite loss), 4 cancelled (SIGINT / SIGTERM: a checkpoint is written first when possible).
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
from .checkpoint import latest_checkpoint
from .distributed import World, init_from_env, shutdown
from .jobfile import MODEL_FOLDERS, JobFileError, ModelRef, load_dataset, read_job
from .jobs import Job, JobCancelled, JobControl, JobQueue, JobStopped
from .loop import Folders, run_training
from .spec import SpecError

EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_CANCELLED = 1, 2, 3, 4
# Test hook: "<rank>:<step>" makes that rank exit at once (os._exit) right after finishing that step.
EXIT_AT_ENV = "LYCORIS_TRAINER_EXIT_AT"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        patcher = host.build_tiny_model(model.tiny, _DTYPES.get(model.dtype, torch.float32))
    else:
        import comfy.sd
        import folder_paths

        candidates = [override] if override else [Path(model.path)] if model.path else []
        if not override and model.file:
            found = folder_paths.get_full_path(MODEL_FOLDERS[model.kind], model.file)
            candidates.append(Path(found) if found else None)
        path = next((p for p in candidates if p is not None and p.is_file()), None)
        if path is None:
            raise JobFileError(f"model: {model.describe()} not found (looked at "
                               f"{', '.join(str(p) for p in candidates if p) or 'nothing'}); pass --model PATH")
        if model.kind == "diffusion_model":
            patcher = comfy.sd.load_diffusion_model(str(path))
        else:
            patcher = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]
    if model.architecture and architecture_key(host.model_unet_config(patcher)) != model.architecture:
        raise JobFileError(f"model: {model.describe()} is not the architecture the job was exported for")
    return patcher


class HeadlessControl(JobControl):
    """Progress lines on rank 0, cancel requests agreed across ranks, and the rank-exit test hook."""

    def __init__(self, job: Job, world: World, log_every: int, out: TextIO):
        super().__init__(job, JobQueue())
        self.world, self.log_every, self.out = world, max(1, log_every), out
        hook = os.environ.get(EXIT_AT_ENV, "")
        self.exit_at = tuple(int(x) for x in hook.split(":")) if hook else None

    def cancelled(self) -> bool:  # the loop asks once per step, on every rank: so this may be a collective
        return self.world.any(self.job.cancel_event.is_set())

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


def run_job(args: argparse.Namespace, world: World, out: TextIO = sys.stdout) -> int:
    """Load the job folder, the model and the dataset; train; return the exit code."""
    _force_cpu_without_cuda()

    def say(text: str, stream: TextIO | None = None) -> None:  # decisions all ranks share: rank 0 tells
        if world.is_main:
            print(text, file=stream or out, flush=True)

    folder = read_job(args.job)
    spec = folder.spec
    say(f"job {folder.folder}: {spec.steps} steps, global batch {spec.batch_size} x {spec.grad_accumulation}, "
        f"{world.size} process(es){f' ({world.backend})' if world.size > 1 else ''}, model {folder.model.describe()}")
    if spec.batch_size % world.size:
        say(f"warning: batch_size {spec.batch_size} does not split evenly over {world.size} processes")
    started = time.monotonic()
    patcher = load_model(folder.model, args.model)
    data = load_dataset(folder.dataset)
    folders = Folders(folder.checkpoints, args.loras or folder.loras)
    latest = latest_checkpoint(folders.checkpoints)
    if latest is not None:
        say(f"resuming from {latest.name}")
    job = Job(uuid.uuid4().hex[:12], folder.name, spec, work=lambda job, control: None)
    job.state = "running"
    control = HeadlessControl(job, world, args.log_every, out)
    previous = _on_signal(job)
    try:
        path = run_training(job, control, patcher, data, folders, world)
    except JobCancelled:
        say(f"cancelled at step {job.step}; checkpoint kept: {job.checkpoint}", sys.stderr)
        return EXIT_CANCELLED
    except JobStopped as stop:
        say(f"stopped: {stop}", sys.stderr)
        return EXIT_STOPPED
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    say(f"done in {time.monotonic() - started:.1f}s: {job.step} steps; adapter saved to {path}")
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
