"""Tiny-model recipes: valid configs per family, clear errors, deterministic weights, real forwards."""

import pytest
import torch

from comfyui_lycoris.core import host
from comfyui_lycoris.core.tiny import TinyModelError, TinySizes, text_embedding, unet_config


@pytest.mark.parametrize(
    "sizes, field",
    [
        (TinySizes(family="sd15"), "family"),
        (TinySizes(width=100, heads=3), "width"),
        (TinySizes(width=32, heads=8), "head dim"),
        (TinySizes(width=96, heads=12, family="flux1"), "head dim"),
        (TinySizes(family="sdxl", width=48), "multiple of 32"),
        (TinySizes(depth=0), "depth"),
    ],
)
def test_bad_sizes_name_the_input(sizes, field):
    with pytest.raises(TinyModelError, match=field):
        unet_config(sizes)


def test_text_embedding_is_deterministic_and_caption_dependent():
    a1, p1 = text_embedding("a red cat", 8, 16, 4)
    a2, p2 = text_embedding("a red cat", 8, 16, 4)
    b, pb = text_embedding("a blue dog", 8, 16, 4)
    assert a1.shape == (1, 8, 16) and p1.shape == (1, 4)
    assert torch.equal(a1, a2) and torch.equal(p1, p2)
    assert not torch.equal(a1, b) and not torch.equal(p1, pb)


def _denoise_once(patcher, family, seed):
    """One call of ComfyUI's own apply_model on the tiny model, with tiny conditioning."""
    model = patcher.model
    channels = {"flux2": 128, "flux1": 16, "sdxl": 4}[family]
    x = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(seed))
    cond = host.tiny_conditioning(patcher, "a photo of a cat", 8)[0]
    extra = model.extra_conds(cross_attn=cond[0], pooled_output=cond[1]["pooled_output"],
                              width=64, height=64, guidance=3.5, device="cpu")
    kwargs = {k: v.cond for k, v in extra.items() if k != "c_crossattn"}
    sigma = torch.tensor([0.7])
    return model.apply_model(x, sigma, c_crossattn=extra["c_crossattn"].cond, **kwargs)


@pytest.mark.parametrize("family", ["flux2", "flux1", "sdxl"])
def test_tiny_model_is_real_and_seeded(family):
    width = 64 if family == "sdxl" else 64
    sizes = TinySizes(family=family, width=width, heads=2 if family != "sdxl" else 2, context_dim=32)
    m1 = host.build_tiny_model(sizes)
    m2 = host.build_tiny_model(sizes)
    m3 = host.build_tiny_model(TinySizes(**{**sizes.__dict__, "seed": 1}))
    assert host.model_family(m1) == family
    out1 = _denoise_once(m1, family, 0)
    assert torch.isfinite(out1).all()
    assert torch.equal(out1, _denoise_once(m2, family, 0)), "same seed, same model"
    assert not torch.allclose(out1, _denoise_once(m3, family, 0)), "another seed, another model"


def test_flux_configs_fit_the_installed_flux_params():
    """v0.33's FluxParams requires txt_ids_dims ([3] Flux 2, [] Flux 1); 0.3.75's has no such field."""
    from comfyui_lycoris.core.tiny import fit_flux_params

    config = unet_config(TinySizes())
    assert fit_flux_params(config, "flux2", {"hidden_size": True}) == config
    assert fit_flux_params(config, "flux2", {"txt_ids_dims": True})["txt_ids_dims"] == [3]
    assert fit_flux_params(unet_config(TinySizes(family="flux1", width=64, heads=2)), "flux1",
                           {"txt_ids_dims": True})["txt_ids_dims"] == []
    with pytest.raises(TinyModelError, match="new_field"):
        fit_flux_params(config, "flux2", {"new_field": True})
    assert fit_flux_params({"a": 1}, "sdxl", {"new_field": True}) == {"a": 1}
