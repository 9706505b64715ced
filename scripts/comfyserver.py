"""Starts a real ComfyUI server with only this pack loaded, and talks to it over HTTP.

The server runs with `--base-directory` in a temporary folder (its own models/, input/,
output/, custom_nodes/ with a link to this pack), so the ComfyUI under test is never modified.
It is stopped in every case: fixture teardown, an `atexit` hook, and its own process group.
`COMFYUI_FRONTEND_ROOT` makes it serve another frontend build (see FRONTEND_ROOT).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from comfyenv import REPO, comfy_root

PACK_LINK = "comfyui-lycoris"
ARTIFACTS = REPO / "test-artifacts"
# COMFYUI_FRONTEND_ROOT=<folder with index.html>: the server serves that frontend (ComfyUI's --front-end-root),
# e.g. the newest comfyui-frontend-package that scripts/setup.sh unpacks into .cache/.
FRONTEND_ROOT = os.environ.get("COMFYUI_FRONTEND_ROOT", "")


class PromptError(RuntimeError):
    """A prompt was refused at validation or failed during execution; `.details` has the JSON."""

    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base_dir: Path, python: str = sys.executable):
        self.base = Path(base_dir)
        self.python = python
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = str(uuid.uuid4())
        self.proc: subprocess.Popen | None = None
        ARTIFACTS.mkdir(exist_ok=True)
        self.log_path = ARTIFACTS / "comfyui-server.log"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> None:
        for sub in ("custom_nodes", "models/loras", "input", "output", "user", "temp"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_LINK
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        cmd = [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base), "--disable-all-custom-nodes",
            "--whitelist-custom-nodes", PACK_LINK, "--database-url", "sqlite:///:memory:",
        ]
        if FRONTEND_ROOT:  # another frontend than the installed package's (make test's second browser pass)
            cmd += ["--front-end-root", FRONTEND_ROOT]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=comfy_root(), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} at start-up:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=15)
        self._log.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- HTTP ------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def post(self, path: str, payload: dict, timeout: float = 30.0):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
            return json.loads(body) if body else None  # ComfyUI's /interrupt answers with no body

    def submit(self, prompt: dict) -> str:
        """POST /prompt; a validation failure raises PromptError with the server's node errors."""
        try:
            return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]
        except urllib.error.HTTPError as err:
            details = json.loads(err.read() or b"{}")
            raise PromptError(_describe_refusal(details), details) from None

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Wait for a prompt in /history; returns its outputs or raises PromptError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error":
                    raise PromptError(_describe_failure(status), entry)
                if status.get("completed", True):
                    return entry.get("outputs", {})
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running a prompt:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f}s")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        return self.wait(self.submit(prompt), timeout)


def _describe_refusal(details: dict) -> str:
    parts = [details.get("error", {}).get("message", "prompt refused")]
    for node_id, info in details.get("node_errors", {}).items():
        for e in info.get("errors", []):
            parts.append(f"node {node_id} ({info.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(parts)


def _describe_failure(status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_message')}"
        if kind == "execution_interrupted":
            return f"node {data.get('node_id')} ({data.get('node_type')}): interrupted"
    return "execution failed"
