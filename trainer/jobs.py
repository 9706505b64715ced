"""Training jobs: a FIFO queue, one background worker thread, cancel flags, progress events.

The Train node only submits; the worker runs one job at a time on its own thread. Between steps
the job yields to ComfyUI (`busy()` is true while a prompt executes), so sampling with the live
checkpoint is never blocked. Each job has its own cancel flag: ComfyUI's global interrupt flag
belongs to the prompt being executed and is never touched here.

A job's work is a closure over its model and dataset; it is dropped the moment the job ends, so a
finished, failed or cancelled job keeps only its summary, losses and latest adapter snapshot.
Finished jobs are kept up to `keep_finished`. A job with a folder writes `lycoris-job.json` there
(at submit and when it ends), so after a restart the jobs list shows the jobs found on disk.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .spec import JobSpec

log = logging.getLogger("lycoris.trainer")
JOB_ID = re.compile(r"^[0-9a-f]{12}$")
ACTIVE = ("queued", "running", "waiting")
RECORD = "lycoris-job.json"  # a job's record in its folder


class JobError(ValueError):
    """Unknown or malformed job id, or an action the job's state does not allow."""


class JobCancelled(Exception):
    """Raised inside a job's work when its cancel flag is set (after a final checkpoint)."""


class JobStopped(Exception):
    """The job stopped on purpose (e.g. a non-finite loss with nan_policy 'stop'); the message says why."""


@dataclass(eq=False)
class Job:
    id: str
    name: str
    spec: JobSpec
    work: Callable[[JobControl], str | None] | None  # returns the final message; dropped when the job ends
    folder: Path | None = None  # the folder the job owns (its checkpoints and record)
    state: str = "queued"
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    message: str = ""
    its: float = 0.0
    eta_s: float | None = None
    checkpoint: str | None = None
    adapter: Any = None  # the latest LoadedAdapter snapshot (LYCORIS_ADAPTER)
    created: float = field(default_factory=time.time)
    from_disk: bool = False  # found on disk after a restart: a summary, not a live job
    validation: list[dict] = field(default_factory=list)  # every preview: step, strength, path
    previews: list = field(default_factory=list)  # the latest round's images (IMAGE tensors)
    render_s: float = 0.0  # time spent rendering previews (not counted in its/s)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    done_event: threading.Event = field(default_factory=threading.Event)

    def summary(self) -> dict:
        last = self.losses[-1][1] if self.losses else None
        return {"id": self.id, "name": self.name, "state": self.state, "step": self.step, "steps": self.spec.steps,
                "loss": last if last is not None and math.isfinite(last) else None, "its": self.its, "eta_s": self.eta_s,
                "message": self.message, "checkpoint": self.checkpoint, "created": self.created,
                "folder": str(self.folder) if self.folder else None, "from_disk": self.from_disk,
                "output_name": self.spec.output_name}

    def detail(self, view: Callable[[Path], dict] | None = None) -> dict:
        """The summary with the loss history, the spec and the validation previews.

        `view(path)` gives a preview's `/view` parameters ({filename, subfolder, type}); ComfyUI's
        output folder is known only to the server."""
        losses = [[s, v if math.isfinite(v) else None] for s, v in self.losses]
        view = view or plain_view
        validation = [{"step": v["step"], "strength": v["strength"], **view(v["path"])} for v in self.validation]
        return {**self.summary(), "losses": losses, "spec": self.spec.to_json(), "validation": validation,
                "render_s": self.render_s}

    def record(self) -> dict:
        """What `lycoris-job.json` holds: enough to list the job after a restart and to resume it."""
        return {"id": self.id, "name": self.name, "state": self.state, "step": self.step, "message": self.message,
                "checkpoint": self.checkpoint, "created": self.created, "spec": self.spec.to_json()}


class JobControl:
    """What a job's work uses to talk to the queue (`trainer.loop.Reporter`): progress, yielding, cancel."""

    def __init__(self, job: Job, queue: JobQueue):
        self.job, self.queue = job, queue
        self._started = time.monotonic()
        self._first_step: int | None = None
        self._excluded = 0.0  # seconds spent rendering previews since the first step

    def cancelled(self) -> bool:
        return self.job.cancel_event.is_set()

    def pause_while_busy(self, poll_s: float = 0.05) -> None:
        """Wait while ComfyUI executes a prompt (so sampling gets the device), unless cancelled."""
        if not self.queue.busy():
            return
        self.queue.set_state(self.job, "waiting")
        while self.queue.busy() and not self.cancelled():
            time.sleep(poll_s)
        self.queue.set_state(self.job, "running")

    def say(self, message: str) -> None:
        """A status line for the job (resume decisions, skipped steps)."""
        self.queue.set_state(self.job, self.job.state, message)

    def preview(self, previews: list, seconds: float) -> None:
        """New validation previews (`trainer.validation.Preview`): kept, announced, their time kept apart."""
        job = self.job
        job.validation += [{"step": p.step, "strength": p.strength, "path": p.path} for p in previews]
        job.previews = [p.image for p in previews]
        job.render_s += seconds
        self._excluded += seconds
        view = self.queue.view
        self.queue.emit("lycoris.job.validation", {
            "job_id": job.id, "render_s": seconds,
            "previews": [{"step": p.step, "strength": p.strength, **view(p.path)} for p in previews]})

    def report(self, step: int, loss: float, lr: float) -> None:
        """Record a finished step (1-based) and send a progress event."""
        job = self.job
        job.step = step
        job.losses.append((step, float(loss)))
        if self._first_step is None:
            self._first_step, self._started, self._excluded = step, time.monotonic(), 0.0
        elapsed = time.monotonic() - self._started - self._excluded
        done = step - self._first_step
        job.its = done / elapsed if elapsed > 0 and done > 0 else 0.0
        job.eta_s = (job.spec.steps - step) / job.its if job.its > 0 else None
        finite = math.isfinite(loss)  # JSON has no NaN: the browser gets null
        self.queue.emit("lycoris.job.progress", {"job_id": job.id, "step": step, "steps": job.spec.steps,
                                                 "loss": float(loss) if finite else None, "lr": lr, "its": job.its,
                                                 "eta_s": job.eta_s, "state": job.state})

    def publish(self, adapter: Any, checkpoint: str | None) -> None:
        """Make a new adapter snapshot (and its checkpoint file) the job's latest."""
        self.job.adapter, self.job.checkpoint = adapter, checkpoint
        if checkpoint:
            match = re.search(r"checkpoint-(\d+)", Path(checkpoint).name)
            if match and not self.job.losses:  # resumed: the job starts at the checkpoint's step
                self.job.step = int(match.group(1))


_RECORD_LOCK = threading.Lock()  # the submitting thread and the worker both write records


def _write_record(job: Job) -> None:
    """`lycoris-job.json` in the job's folder, atomically (a private temp file, then rename, one writer at
    a time); a failure is logged, never fatal."""
    if job.folder is None or not job.folder.is_dir():
        return
    target = job.folder / RECORD
    temp = target.with_name(f".{RECORD}.{uuid.uuid4().hex[:8]}.tmp")
    with _RECORD_LOCK:
        try:
            temp.write_text(json.dumps(job.record(), indent=1))
            os.replace(temp, target)
        except OSError as err:
            log.warning("LyCORIS job %s: could not write %s: %s", job.id, target, err)
            temp.unlink(missing_ok=True)


def jobs_on_disk(root: Path, limit: int = 200, depth: int = 4) -> list[Job]:
    """Summaries of the jobs recorded under `root` (newest first, at most `limit`), for after a restart.

    A job recorded as queued or running was interrupted by the restart: its state says so, and
    its message how to continue it.
    """
    found: list[Job] = []
    if not root.is_dir():
        return found
    paths = [p for p in root.rglob(RECORD) if len(p.relative_to(root).parts) <= depth + 1 and not p.is_symlink()]
    for path in paths:
        try:
            data = json.loads(path.read_text())
            spec = JobSpec.from_json(data["spec"])
            job = Job(str(data["id"]), str(data["name"]), spec, None, path.parent, state=str(data["state"]),
                      step=int(data["step"]), message=str(data.get("message", "")),
                      checkpoint=data.get("checkpoint"), created=float(data["created"]), from_disk=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("LyCORIS: skipping unreadable job record %s: %s", path, err)
            continue
        if not JOB_ID.match(job.id):
            continue
        if job.state in ACTIVE:
            job.state = "interrupted"
            job.message = (f"interrupted by a restart at step {job.step}: queue Train LyCORIS with output_name "
                           f"'{spec.output_name}' and resume on to continue from its latest checkpoint")
        job.done_event.set()
        found.append(job)
    return sorted(found, key=lambda j: j.created, reverse=True)[:limit]


def plain_view(path: Path) -> dict:
    """A file's `/view` parameters when no server says where its output folder is."""
    return {"filename": path.name, "subfolder": str(path.parent), "type": "output"}


class JobQueue:
    """FIFO of jobs run by one daemon worker thread."""

    def __init__(self, emit: Callable[[str, dict], None] | None = None, busy: Callable[[], bool] | None = None,
                 keep_finished: int = 100, history: list[Job] | None = None,
                 view: Callable[[Path], dict] | None = None):
        """`view(path)`: a job file's `/view` parameters ({filename, subfolder, type}) for the browser."""
        self.emit = emit or (lambda event, data: None)
        self.busy = busy or (lambda: False)
        self.view = view or plain_view
        self.keep_finished = keep_finished
        self._jobs: dict[str, Job] = {job.id: job for job in history or []}
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._worker: threading.Thread | None = None

    def submit(self, spec: JobSpec, work: Callable[[JobControl], str | None], name: str = "",
               folder: Path | None = None) -> Job:
        job = Job(uuid.uuid4().hex[:12], name or spec.output_name, spec, work, folder)
        with self._cv:
            self._jobs[job.id] = job
            self._pending.append(job)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="lycoris-trainer", daemon=True)
                self._worker.start()
            self._cv.notify()
        _write_record(job)
        self.emit("lycoris.job.state", {"job_id": job.id, "state": job.state, "message": "queued"})
        return job

    def get(self, job_id: str) -> Job:
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            raise JobError(f"job id: '{job_id}' is not a job id (12 hex digits)")
        try:
            return self._jobs[job_id]
        except KeyError:
            raise JobError(f"job id: no job '{job_id}'") from None

    def jobs(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.created)

    def active_in(self, folder: Path) -> Job | None:
        """The queued or running job that owns `folder`, if any."""
        return next((j for j in self._jobs.values() if j.state in ACTIVE and j.folder == folder), None)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state in ACTIVE:
            job.cancel_event.set()
            with self._cv:
                if job in self._pending:  # never started: nothing to save
                    self._pending.remove(job)
                    self._finish(job, "cancelled", "cancelled before it started")
        return job

    def set_state(self, job: Job, state: str, message: str | None = None) -> None:
        job.state = state
        if message is not None:
            job.message = message
        self.emit("lycoris.job.state", {"job_id": job.id, "state": state, "message": job.message})

    def _finish(self, job: Job, state: str, message: str) -> None:
        job.work = None  # drops the model and dataset the work captured
        self.set_state(job, state, message)
        _write_record(job)
        self._prune()
        job.done_event.set()

    def _prune(self) -> None:
        """Keep at most `keep_finished` ended jobs (the oldest go first)."""
        with self._cv:
            ended = [j for j in sorted(self._jobs.values(), key=lambda j: j.created) if j.state not in ACTIVE]
            for job in ended[: max(0, len(ended) - self.keep_finished)]:
                del self._jobs[job.id]

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
                job = self._pending.popleft()
            self.set_state(job, "running", "")
            _write_record(job)
            work, control = job.work, JobControl(job, self)
            try:
                message = work(control) if work is not None else "nothing to run"
            except JobCancelled:
                self._finish(job, "cancelled", f"cancelled at step {job.step}; checkpoint kept")
            except JobStopped as stop:
                self._finish(job, "stopped", str(stop))
            except Exception as err:  # a failing job must never take the server down
                log.exception("LyCORIS training job %s failed", job.id)
                self._finish(job, "failed", f"{type(err).__name__}: {err}")
            else:
                self._finish(job, "done", message or job.message or f"finished {job.step} steps")
            finally:
                del work, control
