"""here -> ComfyUI core: a file saved by this pack, loaded by ComfyUI's own LoRA loader, merges to the
same weights as this pack's merge, for the algorithms and layers ComfyUI 0.3.75 maps."""

import comfy.sd
import pytest
import torch
from model_pairs import make_pair
from safetensors.torch import load_file
from test_runtime_interop import lycoris_file

from comfyui_lycoris.core import api


def patched_weights(patcher) -> dict[str, torch.Tensor]:
    patcher.patch_model()
    try:
        return {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    finally:
        patcher.unpatch_model()


@pytest.mark.parametrize("family", ["flux1", "sdxl"])
@pytest.mark.parametrize("name", ["lora", "lokr-full", "full"])
def test_core_loader_merges_our_files_like_we_do(family, name, tmp_path):
    torch.set_num_threads(1)
    pair = make_pair(family)
    adapter = api.load_adapter(lycoris_file(pair, name, tmp_path / "src.safetensors"), pair.patcher)
    saved = api.save_adapter(adapter, tmp_path, "ours")
    core, _ = comfy.sd.load_lora_for_models(pair.patcher, None, load_file(str(saved)), 0.8, 0)
    core_keys = {k if isinstance(k, str) else k[0] for k in core.patches}
    assert len(core_keys) >= 10, f"ComfyUI mapped only {len(core_keys)} keys of {len(adapter.bindings)} modules"
    merged, _ = api.merge(pair.patcher, adapter, 0.8)
    ours, theirs = patched_weights(merged), patched_weights(core)
    for key in core_keys:
        short = key.removeprefix("diffusion_model.")
        assert torch.allclose(ours[short], theirs[short], atol=1e-5, rtol=1e-4), key
