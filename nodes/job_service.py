"""The one job queue of this ComfyUI process, wired to the server: events, yielding, routes.

`busy()` is true while a prompt executes, except while that prompt is only waiting for a job
(a LyCORIS Job node with wait on): the trainer must keep going then, or both would wait forever.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ..trainer.jobs import JobError, JobQueue, jobs_on_disk

log = logging.getLogger("lycoris.trainer")
_lock = threading.Lock()
_waiting = 0
_queue: JobQueue | None = None


def _server():
    try:
        from server import PromptServer

        return PromptServer.instance
    except Exception:  # no server (unit tests, headless)
        return None


def _emit(event: str, data: dict) -> None:
    server = _server()
    if server is not None:
        server.send_sync(event, data)  # safe from another thread


def _busy() -> bool:
    server = _server()
    running = bool(getattr(getattr(server, "prompt_queue", None), "currently_running", None))
    with _lock:
        return running and _waiting == 0


class waiting_for_job:
    """Context manager a node uses while it blocks on a job, so the trainer does not yield to it."""

    def __enter__(self):
        global _waiting
        with _lock:
            _waiting += 1

    def __exit__(self, *exc):
        global _waiting
        with _lock:
            _waiting -= 1


def _history() -> list:
    """Jobs recorded in output/lycoris_jobs by earlier runs of the server (after a restart)."""
    try:
        import folder_paths
    except ImportError:  # no ComfyUI (unit tests)
        return []
    return jobs_on_disk(Path(folder_paths.get_output_directory()) / "lycoris_jobs")


def _view(path: Path) -> dict:
    """`/view` parameters of a file in ComfyUI's output folder (job folders live there)."""
    import folder_paths

    relative = Path(path).resolve().relative_to(Path(folder_paths.get_output_directory()).resolve())
    return {"filename": relative.name, "subfolder": relative.parent.as_posix(), "type": "output"}


def queue() -> JobQueue:
    global _queue
    with _lock:
        if _queue is None:
            _queue = JobQueue(emit=_emit, busy=_busy, history=_history(), view=_view)
        return _queue


def register_routes() -> None:
    """GET /lycoris/jobs, GET /lycoris/jobs/{id}, POST /lycoris/jobs/{id}/cancel (also under /api)."""
    server = _server()
    if server is None or getattr(server, "_lycoris_job_routes", False):
        return
    from aiohttp import web

    routes = server.routes

    def _job_or_error(request):
        try:
            return queue().get(request.match_info["job_id"]), None
        except JobError as err:
            status = 404 if "no job" in str(err) else 400
            return None, web.json_response({"error": str(err)}, status=status)

    @routes.get("/lycoris/jobs")
    async def list_jobs(request):
        return web.json_response({"jobs": [job.summary() for job in queue().jobs()]})

    @routes.get("/lycoris/jobs/{job_id}")
    async def get_job(request):
        job, error = _job_or_error(request)
        return error or web.json_response(job.detail(queue().view))

    @routes.post("/lycoris/jobs/{job_id}/cancel")
    async def cancel_job(request):
        job, error = _job_or_error(request)
        if error:
            return error
        queue().cancel(job.id)
        return web.json_response(job.summary())

    server._lycoris_job_routes = True
