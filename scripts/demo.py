"""`make demo`: start ComfyUI headless with this pack, run the demo graph, say where output went.

For now the demo is a smoke run of the tiny model through a real sampler; the example-workflows
issue grows it into the full train -> apply -> A/B -> merge job.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfyenv import REPO, install_import_paths  # noqa: E402
from comfyserver import ComfyServer  # noqa: E402

OUT = REPO / "demo-output"


def smoke_prompt() -> dict:
    return {
        "model": {"class_type": "LycorisTinyModel", "inputs": {
            "family": "flux2", "width": 128, "heads": 1, "depth": 1, "single_depth": 1,
            "context_dim": 64, "seed": 0, "dtype": "float32"}},
        "pos": {"class_type": "LycorisTinyTextEncode", "inputs": {"model": ["model", 0], "text": "a cat", "tokens": 8}},
        "neg": {"class_type": "LycorisTinyTextEncode", "inputs": {"model": ["model", 0], "text": "", "tokens": 8}},
        "latent": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": 1, "steps": 8, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "demo/tiny_flux2"}},
    }


def main() -> int:
    install_import_paths()
    start = time.monotonic()
    base = REPO / ".cache" / "demo-base"
    server = ComfyServer(base)
    print(f"demo: starting ComfyUI at {server.url} (log: {server.log_path})", flush=True)
    server.start()
    try:
        print("demo: running the smoke graph (tiny Flux 2 -> KSampler -> SaveLatent)", flush=True)
        outputs = server.run(smoke_prompt())
    finally:
        server.stop()
    OUT.mkdir(exist_ok=True)
    written = []
    for item in outputs["save"]["latents"]:
        src = base / "output" / item["subfolder"] / item["filename"]
        dst = OUT / item["filename"]
        shutil.copyfile(src, dst)
        written.append(dst)
    print(f"demo: done in {time.monotonic() - start:.1f}s; wrote:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
