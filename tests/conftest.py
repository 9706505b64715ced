"""Test-wide setup: import paths, and the live ComfyUI server fixture for integration tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from comfyenv import install_import_paths  # noqa: E402

install_import_paths()


def _cpu_unless_cuda() -> None:
    """In-process ComfyUI (unit tests) picks CUDA from a CUDA build of torch; use the CPU without one."""
    import torch
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True


_cpu_unless_cuda()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: thread hand-offs cost more than they save (2-3x slower on a busy 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One real ComfyUI server (CPU, 127.0.0.1, a free port, only this pack) per test session."""
    from comfyserver import ComfyServer

    server = ComfyServer(tmp_path_factory.mktemp("comfy-base"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
