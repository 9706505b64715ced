"""Where the repository and the ComfyUI in use live; shared by tests, the demo and benchmarks."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_lycoris"  # import name of the pack in tests (ComfyUI uses its folder name)


def comfy_root() -> Path:
    """COMFYUI_PATH when set, else the pinned runtime that `make test` sets up in .comfyui/."""
    root = Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui").resolve()
    if not (root / "main.py").is_file():
        raise RuntimeError(f"No ComfyUI at {root}: run `make setup` (or set COMFYUI_PATH)")
    return root


def install_import_paths() -> None:
    """Make ComfyUI's modules and the pack (as package `comfyui_lycoris`) importable.

    ComfyUI goes first on sys.path so its top-level `nodes` module is not shadowed by the
    pack's `nodes/` package. The pack is registered as a bare package over the repo root, so
    `comfyui_lycoris.core` imports without running the pack's `__init__` (which needs ComfyUI).
    """
    root = str(comfy_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    if PACK_NAME not in sys.modules:
        pack = types.ModuleType(PACK_NAME)
        pack.__path__ = [str(REPO)]
        pack.__file__ = str(REPO / "__init__.py")
        sys.modules[PACK_NAME] = pack
