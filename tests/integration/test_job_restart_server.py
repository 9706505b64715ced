"""kill -9 of the server while a job writes checkpoints, then a restart: nothing is lost.

A server of its own (the shared one must not die): a job checkpoints every step; the whole
server process group is killed with SIGKILL mid-training, twice. After each kill every checkpoint
file in the job folder verifies (atomic writes: a torn temp file is never taken for one), and the
restarted server lists the job from its folder as interrupted, saying how to resume; resume on
continues from the newest checkpoint and finishes.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from graphs import train_prompt

from comfyserver import ComfyServer
from comfyui_lycoris.trainer.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.integration
NAME = "restart/job"


def _kill(server: ComfyServer) -> None:
    proc, server.proc = server.proc, None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _prompt(steps: int, resume: bool) -> dict:
    prompt = train_prompt(steps=steps, output_name=NAME, save_every=1)
    prompt["train"]["inputs"].update({"resume": resume, "keep_last": 3})
    return prompt


def _wait_step(server: ComfyServer, job_id: str, step: int, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = server.get(f"/lycoris/jobs/{job_id}")
        if job["step"] >= step or job["state"] not in ("queued", "running", "waiting"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_kill_during_checkpoints_then_restart_and_resume(tmp_path):
    base = tmp_path / "base"
    server = ComfyServer(base)
    server.start()
    try:
        outputs = server.run(_prompt(100000, resume=False))
        job_id = outputs["train"]["job_id"][0]
        folder = base / "output" / "lycoris_jobs" / NAME
        for kill in range(2):
            job = _wait_step(server, job_id, 4)
            assert job["state"] in ("running", "waiting"), job["message"]
            time.sleep(0.13 * (kill + 1))  # land somewhere inside the write cycle
            _kill(server)
            checkpoints = list_checkpoints(folder)
            assert checkpoints, "checkpoints survived"
            steps = [load_checkpoint(path).step for _, path in checkpoints]  # each one verifies its checksum
            assert steps == [s for s, _ in checkpoints]
            server = ComfyServer(base)
            server.start()
            listed = {j["id"]: j for j in server.get("/lycoris/jobs")["jobs"]}
            assert listed[job_id]["state"] == "interrupted" and listed[job_id]["from_disk"]
            assert "resume on" in listed[job_id]["message"]
            latest = steps[-1]
            outputs = server.run(_prompt(100000 if kill == 0 else latest + 2, resume=True))
            assert f"step {latest}" in outputs["train"]["text"][0], outputs["train"]["text"]
            job_id = outputs["train"]["job_id"][0]
        job = _wait_step(server, job_id, latest + 2)
        deadline = time.monotonic() + 120
        while job["state"] in ("queued", "running", "waiting"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
            job = server.get(f"/lycoris/jobs/{job_id}")
        assert job["state"] == "done", job["message"]
        assert job["losses"][0][0] == latest + 1, "continued from the newest checkpoint"
        assert "adapter saved" in job["message"]
    finally:
        server.stop()
