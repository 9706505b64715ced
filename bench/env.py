"""Process setup shared by every benchmark: import paths, CPU-only ComfyUI, thread count."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / ".work"  # adapter files written during a run (git-ignored)


def setup(threads: int) -> None:
    """Make ComfyUI and the pack importable, pin ComfyUI to the CPU, and fix torch's threads.

    Must run before anything imports `comfy.model_management` (it picks its device on import).
    """
    # Threads that spin while waiting (OpenMP's default) collapse when other processes share the
    # cores: a forward then takes 5-20x longer at 2 threads. Passive waiting keeps figures usable.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # torch.profiler (memory figures) logs errors only
    scripts = str(REPO / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    from comfyenv import install_import_paths

    install_import_paths()
    import torch
    from comfy.cli_args import args

    args.cpu = True  # the anchors in FACTS.md §6 are CPU figures; a CUDA build would pick the GPU
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
