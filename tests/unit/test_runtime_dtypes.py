"""Bypass on low-precision bases: bf16 / fp16 weights, and fp8 storage with a compute dtype.

The base weights are never written (bitwise equal after use) and the adapted output follows the
fp32 result within the precision of the base dtype.
"""

import pytest
import torch
from model_pairs import SIZES, make_pair
from test_runtime_interop import lycoris_file

from comfyui_lycoris.core import api, host


@pytest.fixture(scope="module")
def flux2():
    torch.set_num_threads(1)
    return make_pair("flux2")


def low_precision_twin(pair, dtype, compute_dtype=None):
    patcher = host.build_tiny_model(SIZES[pair.family], dtype, compute_dtype)
    patcher.model.diffusion_model.load_state_dict(pair.patcher.model.diffusion_model.state_dict())
    return patcher


def denoised(pair, patcher, dtype):
    """The pair's inputs through `patcher` (inputs cast like a sampler would), in float32."""
    original = pair.inputs
    pair.inputs = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and k in ("x", "context") else v)
                   for k, v in original.items()}
    try:
        return pair.comfy_denoised(patcher).float()
    finally:
        pair.inputs = original


# (storage dtype, compute dtype, tolerance vs fp32 or None). fp16 follows fp32 closely. The tiny random
# model itself drifts by ~25% in bf16 and fp8 (base vs base), so there only the mechanics are checked
# here; the per-layer bf16 math is checked against LyCORIS in test_adapter_math.py.
CASES = [(torch.float16, None, 1e-2), (torch.bfloat16, None, None)]
if hasattr(torch, "float8_e4m3fn"):
    CASES.append((torch.float8_e4m3fn, torch.bfloat16, None))


@pytest.mark.parametrize("dtype, compute, tolerance", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("name", ["lokr-full", "lora-dora", "tlora"])
def test_low_precision_base(flux2, dtype, compute, tolerance, name, tmp_path):
    path = lycoris_file(flux2, name, tmp_path / f"{name}.safetensors")
    adapter = api.load_adapter(path, flux2.patcher)
    reference = flux2.comfy_denoised(api.apply(flux2.patcher, adapter, 1.0))
    twin = low_precision_twin(flux2, dtype, compute)
    before = {k: v.clone() for k, v in twin.model.diffusion_model.state_dict().items()}
    out = denoised(flux2, api.apply(twin, adapter, 1.0), compute or dtype)
    assert torch.isfinite(out).all()
    base_lp = denoised(flux2, twin, compute or dtype)
    assert float((out - base_lp).abs().max()) > 0.05 * float(base_lp.abs().max()), "the adapter is applied"
    if tolerance is not None:
        assert float((out - reference).abs().max()) <= tolerance * float(reference.abs().max()), "follows fp32"
    after = twin.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before)
    assert all(v.dtype == dtype for k, v in after.items() if k.endswith("weight") and v.ndim == 2)
