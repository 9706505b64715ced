"""Shallow real-width model files in the layouts users download: seeded random weights, on demand.

No weights can be downloaded in tests, and the Tiny Model node's sizes are refused by ComfyUI's
model detection, so the path users take (a file in `models/` -> **Load Diffusion Model** / **Load
Checkpoint**) is tested with files written here: the original single-file key layout of each
family, every layer at its real width, but only a few blocks deep.

- `flux1_shapes()`: Flux 1 dev (Black Forest Labs' names as in `flux1-dev.safetensors`, `.scale`
  QK norms) at real width: hidden 3072, 24 heads, T5 4096 / CLIP 768 inputs; 1 double + 1 single
  block: 545 M parameters, 1.09 GB in bf16. ComfyUI 0.3.75 detects and loads it.
- `flux2_shapes()`: Flux 2 dev (`flux2-dev.safetensors` names) at real width: hidden 6144, 48
  heads, text 15360; 2.29 G parameters for 1 + 1 blocks (4.6 GB bf16, 9.2 GB once ComfyUI holds it
  in fp32 on a CPU). 0.3.75 detects only this width (it assumes 48 heads for Flux 2); Klein widths
  (3072 / 24 heads) need a newer ComfyUI (v0.33 reads the head count from the width).
  `flux2_klein_width_1x1` is Klein 4B's width (3072, 24 heads, text 7680, no guidance embedder), 1 + 1
  blocks: 563 M parameters, 1.1 GB in bf16.
- `sdxl_shapes()`: an SDXL-family checkpoint's UNet (`model.diffusion_model.*`, the SGM names of
  `sd_xl_base_1.0.safetensors`); detection only knows whole block layouts, the smallest being
  Segmind Vega's (745 M parameters at full SDXL width). Full SDXL is 2.57 G (10.3 GB in fp32).

Files are streamed to disk one tensor at a time (memory stays at a few tensors), written
atomically, and are bit-identical for the same layout, seed and dtype on any machine: each tensor
has its own generator seeded from (seed, key). Matrices are N(0, 1/fan_in), norm scales 1,
biases (and other vectors) N(0, 0.02^2).

    python scripts/model_files.py flux1|flux2|sdxl|<name in FILES> OUT_DIR [--dtype bf16|fp8_e4m3fn|fp32] [--seed N]

writes e.g. `OUT_DIR/flux1_real_width_1x1.safetensors` (a family name writes its first file in FILES;
`flux2_klein_width_1x1` the Klein-width Flux 2) (for ComfyUI's models/diffusion_models;
the SDXL file is a checkpoint for models/checkpoints). The SDXL layout and `detected_unet_config`
need ComfyUI importable (scripts/comfyenv.py sets that up for tests and benchmarks).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

Shapes = dict[str, tuple[int, ...]]

# torch dtype <-> safetensors dtype names (the subset model files use)
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
             torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
               "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


# -- layouts -------------------------------------------------------------------------------------

def _linear(out: Shapes, name: str, fan_in: int, fan_out: int, bias: bool = True) -> None:
    out[f"{name}.weight"] = (fan_out, fan_in)
    if bias:
        out[f"{name}.bias"] = (fan_out,)


def _embedder(out: Shapes, name: str, fan_in: int, hidden: int, bias: bool = True) -> None:
    """BFL's MLPEmbedder: in_layer, SiLU, out_layer."""
    _linear(out, f"{name}.in_layer", fan_in, hidden, bias)
    _linear(out, f"{name}.out_layer", hidden, hidden, bias)


def _qk_norms(out: Shapes, name: str, head_dim: int) -> None:
    out[f"{name}.query_norm.scale"] = (head_dim,)
    out[f"{name}.key_norm.scale"] = (head_dim,)


def flux1_shapes(hidden: int = 3072, heads: int = 24, depth: int = 1, single_depth: int = 1,
                 context_in_dim: int = 4096, vec_in_dim: int = 768, in_channels: int = 16,
                 guidance: bool = True) -> Shapes:
    """Keys and shapes of a Flux 1 single-file checkpoint (dev: guidance embedder; schnell: none).

    Full Flux 1 dev is hidden 3072, 24 heads, 19 double + 38 single blocks; the defaults keep the
    width and cut the depth to 1 + 1.
    """
    mlp, head_dim, patch = 4 * hidden, hidden // heads, 4  # mlp_ratio 4, 2x2 patches
    out: Shapes = {}
    _linear(out, "img_in", in_channels * patch, hidden)
    _embedder(out, "time_in", 256, hidden)
    _embedder(out, "vector_in", vec_in_dim, hidden)
    if guidance:
        _embedder(out, "guidance_in", 256, hidden)
    _linear(out, "txt_in", context_in_dim, hidden)
    for i in range(depth):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}"
            _linear(out, f"{b}_mod.lin", hidden, 6 * hidden)
            _linear(out, f"{b}_attn.qkv", hidden, 3 * hidden)
            _qk_norms(out, f"{b}_attn.norm", head_dim)
            _linear(out, f"{b}_attn.proj", hidden, hidden)
            _linear(out, f"{b}_mlp.0", hidden, mlp)
            _linear(out, f"{b}_mlp.2", mlp, hidden)
    for i in range(single_depth):
        b = f"single_blocks.{i}"
        _linear(out, f"{b}.linear1", hidden, 3 * hidden + mlp)
        _linear(out, f"{b}.linear2", hidden + mlp, hidden)
        _qk_norms(out, f"{b}.norm", head_dim)
        _linear(out, f"{b}.modulation.lin", hidden, 3 * hidden)
    _linear(out, "final_layer.linear", hidden, in_channels * patch)
    _linear(out, "final_layer.adaLN_modulation.1", hidden, 2 * hidden)
    return out


def flux2_shapes(hidden: int = 6144, heads: int = 48, depth: int = 1, single_depth: int = 1,
                 context_in_dim: int = 15360, in_channels: int = 128, guidance: bool = True) -> Shapes:
    """Keys and shapes of a Flux 2 single-file checkpoint: no biases, shared (global) modulations,
    SwiGLU feed-forwards (mlp_ratio 3, the first projection twice as wide).

    Flux 2 dev is hidden 6144, 48 heads, 8 double + 48 single blocks, text 15360; Klein 4B is
    hidden 3072, 24 heads, text 7680 (ComfyUI 0.3.75 detects only 48-head models).
    """
    mlp, head_dim = 3 * hidden, hidden // heads
    out: Shapes = {}
    _linear(out, "img_in", in_channels, hidden, bias=False)
    _embedder(out, "time_in", 256, hidden, bias=False)
    if guidance:
        _embedder(out, "guidance_in", 256, hidden, bias=False)
    _linear(out, "txt_in", context_in_dim, hidden, bias=False)
    _linear(out, "double_stream_modulation_img.lin", hidden, 6 * hidden, bias=False)
    _linear(out, "double_stream_modulation_txt.lin", hidden, 6 * hidden, bias=False)
    _linear(out, "single_stream_modulation.lin", hidden, 3 * hidden, bias=False)
    for i in range(depth):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}"
            _linear(out, f"{b}_attn.qkv", hidden, 3 * hidden, bias=False)
            _qk_norms(out, f"{b}_attn.norm", head_dim)
            _linear(out, f"{b}_attn.proj", hidden, hidden, bias=False)
            _linear(out, f"{b}_mlp.0", hidden, 2 * mlp, bias=False)
            _linear(out, f"{b}_mlp.2", mlp, hidden, bias=False)
    for i in range(single_depth):
        b = f"single_blocks.{i}"
        _linear(out, f"{b}.linear1", hidden, 3 * hidden + 2 * mlp, bias=False)
        _linear(out, f"{b}.linear2", hidden + mlp, hidden, bias=False)
        _qk_norms(out, f"{b}.norm", head_dim)
    _linear(out, "final_layer.linear", hidden, in_channels, bias=False)
    _linear(out, "final_layer.adaLN_modulation.1", hidden, 2 * hidden, bias=False)
    return out


# SDXL-family UNets ComfyUI's detection knows, as (name in its diffusers table, supported_models class).
# Detection matches whole block layouts, so these are the only sizes an SDXL checkpoint can have;
# Segmind Vega is the smallest (745 M UNet parameters at full SDXL width: 320/640/1280, text 2048).
SDXL_VARIANTS = {"sdxl": ("SDXL", "SDXL"), "segmind_vega": ("Segmind_Vega", "Segmind_Vega"),
                 "koala_700m": ("KOALA_700M", "KOALA_700M"), "ssd_1b": ("SSD_1B", "SSD1B")}
SDXL_UNET_PREFIX = "model.diffusion_model."  # the SGM checkpoint layout (sd_xl_base_1.0.safetensors)


def sdxl_unet_config(variant: str = "segmind_vega") -> dict:
    """ComfyUI's own `unet_config` of an SDXL-family variant (its diffusers conversion table holds them)."""
    import inspect

    import comfy.model_detection

    table, _ = SDXL_VARIANTS[variant]
    source = inspect.getsource(comfy.model_detection.unet_config_from_diffusers_unet)
    start = source.index(f"    {table} = {{")
    literal = source[source.index("{", start): source.index("}", start) + 1]
    config = eval(literal, {"dtype": None})  # a dict literal of ComfyUI's source: names, numbers, lists
    config.pop("dtype", None)
    return config


def sdxl_shapes(variant: str = "segmind_vega") -> Shapes:
    """Keys and shapes of an SDXL-family checkpoint's UNet (`model.diffusion_model.*`, SGM names).

    Read from ComfyUI's UNet built on `meta` (ComfyUI keeps the original SGM module names). Only the
    UNet: Load Checkpoint then returns no CLIP and a placeholder VAE (use Load CLIP / Load VAE).
    """
    import comfy.supported_models

    _, cls = SDXL_VARIANTS[variant]
    config = getattr(comfy.supported_models, cls)(sdxl_unet_config(variant))
    config.set_inference_dtype(torch.bfloat16, None)
    unet = config.get_model({}, "", device="meta").diffusion_model
    return {SDXL_UNET_PREFIX + k: tuple(v.shape) for k, v in unet.state_dict().items()}


# The files the tests and benchmarks use, by name: (family, layout function, its arguments).
FILES: dict[str, tuple[str, Callable[..., Shapes], dict]] = {
    "flux1_real_width_1x1": ("flux1", flux1_shapes, {}),
    "flux2_full_width_1x1": ("flux2", flux2_shapes, {}),
    # Flux 2 Klein 4B's width (3072, 24 heads, Qwen3 text 7680; no guidance embedder): newer ComfyUI only
    "flux2_klein_width_1x1": ("flux2", flux2_shapes, {"hidden": 3072, "heads": 24, "context_in_dim": 7680,
                                                      "guidance": False}),
    "sdxl_segmind_vega": ("sdxl", sdxl_shapes, {"variant": "segmind_vega"}),
}


def parameters(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes.values())


# -- values --------------------------------------------------------------------------------------

def _generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def tensor_value(key: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The seeded value of one tensor (independent of every other key, so of write order)."""
    if key.endswith(".scale"):  # RMSNorm scales (QK norms)
        return torch.ones(shape, dtype=dtype)
    value = torch.randn(shape, generator=_generator(seed, key))
    if len(shape) >= 2:
        value /= math.sqrt(math.prod(shape[1:]))
    else:
        value *= 0.02
    return value.to(dtype)


def _values(shapes: Shapes, seed: int, dtype: torch.dtype, workers: int = 2) -> Iterator[torch.Tensor]:
    """The tensors of `shapes` in key order, `workers` made at a time (torch's generator is serial)."""
    keys = sorted(shapes)
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for key in keys:
            pending.append(pool.submit(tensor_value, key, shapes[key], seed, dtype))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# -- writing and reading -------------------------------------------------------------------------

def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in memory order (little-endian on every platform torch runs on)."""
    flat = tensor.contiguous().view(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_model_file(path: str | os.PathLike[str], shapes: Shapes, seed: int = 0,
                     dtype: torch.dtype = torch.bfloat16, metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file with `shapes`' keys, seeded values in `dtype`; returns the path.

    Streams one tensor at a time (a header first, as safetensors lays files out), into a temporary
    file renamed into place at the end: a reader never sees a partial file.
    """
    path = Path(path)
    size = torch.tensor([], dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for key in sorted(shapes):
        nbytes = math.prod(shapes[key]) * size
        header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shapes[key]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(text)))
            fh.write(text)
            for value in _values(shapes, seed, dtype):
                fh.write(_raw_bytes(value))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def ensure_file(folder: str | os.PathLike[str], name: str = "flux1_real_width_1x1", seed: int = 0,
                dtype: torch.dtype = torch.bfloat16) -> Path:
    """`folder/<name>.safetensors` of FILES[name], written unless an identical one is there."""
    family, layout, kwargs = FILES[name]
    shapes = layout(**kwargs)
    path = Path(folder) / f"{name}.safetensors"
    tag = {"lycoris_test_model": json.dumps({"name": name, "seed": seed, "dtype": ST_DTYPES[dtype]})}
    if path.is_file() and read_metadata(path).get("lycoris_test_model") == tag["lycoris_test_model"]:
        return path
    return write_model_file(path, shapes, seed, dtype, {**tag, "family": family})


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def read_shapes(path: str | os.PathLike[str]) -> Shapes:
    """Keys and shapes stored in a safetensors file, without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def meta_state_dict(shapes: Shapes, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Weightless tensors of the layout: what ComfyUI's detection reads (key names and shapes)."""
    return {k: torch.empty(s, dtype=dtype, device="meta") for k, s in shapes.items()}


def detected_unet_config(shapes: Shapes) -> dict:
    """The `unet_config` ComfyUI's own model detection gives a file of this layout (needs ComfyUI).

    Runs what `comfy.sd.load_diffusion_model` runs before it reads weights (detection, then the
    model class built on `meta`); ValueError with ComfyUI's reason when either refuses.
    """
    import comfy.model_detection

    state_dict = meta_state_dict(shapes)
    # As load_diffusion_model_state_dict: a checkpoint's UNet prefix (model.diffusion_model.) is cut off
    prefix = comfy.model_detection.unet_prefix_from_state_dict(state_dict)
    unet = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    try:
        config = comfy.model_detection.model_config_from_unet(unet or state_dict, "")
    except Exception as err:  # detection itself raises for sizes it cannot describe
        raise ValueError(f"ComfyUI's detection refuses this layout: {type(err).__name__}: {err}") from err
    if config is None:
        raise ValueError("ComfyUI's detection does not recognise this layout")
    config.set_inference_dtype(torch.bfloat16, None)
    try:  # ComfyUI's own model class on `meta` (no memory): its checks are the ones loading runs
        config.get_model({}, "", device="meta")
    except Exception as err:
        raise ValueError(f"ComfyUI detects a {config.unet_config.get('image_model', type(config).__name__)} "
                         f"model but cannot build it: {type(err).__name__}: {err}") from err
    return dict(config.unet_config)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted({f for f, _, _ in FILES.values()} | set(FILES)),
                        help="a family (its first file in FILES) or a file name of FILES")
    parser.add_argument("out", type=Path, help="folder (e.g. ComfyUI/models/diffusion_models)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    name = args.family if args.family in FILES else next(n for n, (f, _, _) in FILES.items() if f == args.family)
    family, layout, kwargs = FILES[name]
    if family == "sdxl":  # its layout is read from ComfyUI's own UNet (COMFYUI_PATH or .comfyui/)
        from comfyenv import install_import_paths

        install_import_paths()
    print(f"{name}: {parameters(layout(**kwargs)) / 1e6:.0f} M parameters as {args.dtype}", flush=True)
    print(ensure_file(args.out, name, args.seed, DTYPE_NAMES[args.dtype]))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
