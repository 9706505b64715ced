"""`python -m trainer run <job>` from the pack's root folder (also `torchrun ... -m trainer run <job>`).

Only bootstraps: puts ComfyUI on sys.path (COMFYUI_PATH, else the pinned `.comfyui/`, else the
ComfyUI this pack is installed in as `custom_nodes/<pack>`), registers the pack as the bare
package `comfyui_lycoris` (its `__init__`, which registers nodes, is not run) so the trainer's
relative imports work, and hands over to `comfyui_lycoris.trainer.headless`. Nothing imports
torch before that, so the headless module decides devices.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_lycoris"


def comfy_root() -> Path | None:
    """The ComfyUI to import: COMFYUI_PATH, the pinned runtime in .comfyui/, or the one we are installed in."""
    explicit = os.environ.get("COMFYUI_PATH")
    candidates = [Path(explicit)] if explicit else [REPO / ".comfyui", REPO.parent.parent]
    return next((c.resolve() for c in candidates if (c / "main.py").is_file() and (c / "comfy").is_dir()), None)


def bootstrap() -> None:
    root = comfy_root()
    if root is None:
        where = os.environ.get("COMFYUI_PATH") or f"{REPO / '.comfyui'} or {REPO.parent.parent}"
        print(f"error: no ComfyUI at {where}: set COMFYUI_PATH (or run `make setup`)", file=sys.stderr)
        raise SystemExit(2)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # first: ComfyUI's top-level `nodes` must win over the pack's nodes/
    if PACK_NAME not in sys.modules:
        pack = types.ModuleType(PACK_NAME)
        pack.__path__ = [str(REPO)]
        pack.__file__ = str(REPO / "__init__.py")
        sys.modules[PACK_NAME] = pack


def main() -> int:
    bootstrap()
    from comfyui_lycoris.trainer.headless import main as headless_main

    return headless_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
