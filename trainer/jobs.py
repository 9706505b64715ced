"""Training jobs: a FIFO queue, one background worker thread, cancel flags, progress events.

The Train node only submits; the worker runs one job at a time on its own thread. Between steps
the job yields to ComfyUI (`busy()` is true while a prompt executes), so sampling with the live
checkpoint is never blocked. Each job has its own cancel flag: ComfyUI's global interrupt flag
belongs to the prompt being executed and is never touched here.
"""

from __future__ import annotations

import collections
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .spec import JobSpec

log = logging.getLogger("lycoris.trainer")
JOB_ID = re.compile(r"^[0-9a-f]{12}$")
ACTIVE = ("queued", "running", "waiting")


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
    work: Callable[[Job, JobControl], None]
    state: str = "queued"
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    message: str = ""
    its: float = 0.0
    eta_s: float | None = None
    checkpoint: str | None = None
    adapter: Any = None  # the latest LoadedAdapter snapshot (LYCORIS_ADAPTER)
    created: float = field(default_factory=time.time)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    done_event: threading.Event = field(default_factory=threading.Event)

    def summary(self) -> dict:
        last = self.losses[-1][1] if self.losses else None
        return {"id": self.id, "name": self.name, "state": self.state, "step": self.step, "steps": self.spec.steps,
                "loss": last if last is not None and math.isfinite(last) else None, "its": self.its, "eta_s": self.eta_s,
                "message": self.message, "checkpoint": self.checkpoint, "created": self.created}

    def detail(self) -> dict:
        losses = [[s, v if math.isfinite(v) else None] for s, v in self.losses]
        return {**self.summary(), "losses": losses, "spec": self.spec.to_json()}


class JobControl:
    """What a job's work uses to talk to the queue: progress, yielding, cancellation."""

    def __init__(self, job: Job, queue: JobQueue):
        self.job, self.queue = job, queue
        self._started = time.monotonic()
        self._first_step: int | None = None

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

    def report(self, step: int, loss: float, lr: float) -> None:
        """Record a finished step (1-based) and send a progress event."""
        job = self.job
        job.step = step
        job.losses.append((step, float(loss)))
        if self._first_step is None:
            self._first_step, self._started = step, time.monotonic()
        elapsed = time.monotonic() - self._started
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


class JobQueue:
    """FIFO of jobs run by one daemon worker thread."""

    def __init__(self, emit: Callable[[str, dict], None] | None = None, busy: Callable[[], bool] | None = None):
        self.emit = emit or (lambda event, data: None)
        self.busy = busy or (lambda: False)
        self._jobs: dict[str, Job] = {}
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._worker: threading.Thread | None = None

    def submit(self, spec: JobSpec, work: Callable[[Job, JobControl], None], name: str = "") -> Job:
        job = Job(uuid.uuid4().hex[:12], name or spec.output_name, spec, work)
        with self._cv:
            self._jobs[job.id] = job
            self._pending.append(job)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="lycoris-trainer", daemon=True)
                self._worker.start()
            self._cv.notify()
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
        self.set_state(job, state, message)
        job.done_event.set()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
                job = self._pending.popleft()
            self.set_state(job, "running", "")
            try:
                job.work(job, JobControl(job, self))
            except JobCancelled:
                self._finish(job, "cancelled", f"cancelled at step {job.step}; checkpoint kept")
            except JobStopped as stop:
                self._finish(job, "stopped", str(stop))
            except Exception as err:  # a failing job must never take the server down
                log.exception("LyCORIS training job %s failed", job.id)
                self._finish(job, "failed", f"{type(err).__name__}: {err}")
            else:
                self._finish(job, "done", job.message or f"finished {job.step} steps")
