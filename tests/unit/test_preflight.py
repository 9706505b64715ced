"""Preflight at submit: errors naming the field for what cannot train, warnings for what was probably not meant."""

from pathlib import Path

import pytest
import torch

from comfyui_lycoris.core import host
from comfyui_lycoris.core.config import parse_config
from comfyui_lycoris.core.plan_report import summarize
from comfyui_lycoris.core.tiny import TinySizes, text_embedding, unet_config
from comfyui_lycoris.trainer.data import TrainingSet
from comfyui_lycoris.trainer.preflight import LATENT_CHANNELS, PreflightError, preflight, review
from comfyui_lycoris.trainer.spec import JobSpec

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SIZES = {f: TinySizes(family=f, width=64, heads=2, depth=1, single_depth=1, context_dim=32) for f in LATENT_CHANNELS}
UNET = {f: unet_config(s) for f, s in SIZES.items()}
POOLED = {"flux2": 32, "flux1": 32, "sdxl": 1280}
LORA = {"algo": "lora", "multiplier": 1.0, "linear_dim": 8, "linear_alpha": 4}
GENERIC_LOKR = {  # SimpleTuner's documented example config
    "algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 10,
    "apply_preset": {"target_module": ["Attention", "FeedForward"],
                     "module_algo_map": {"Attention": {"factor": 10}, "FeedForward": {"factor": 4}}}}


def preset(name):
    return parse_config((CONFIGS / f"{name}.json").read_text())


def dataset(family, channels=None, text_width=32, pooled_width=None, count=2, hw=8):
    channels = channels or LATENT_CHANNELS[family]
    cond, pooled = text_embedding("a cat", 4, text_width, pooled_width or POOLED[family])
    return TrainingSet([torch.zeros(channels, hw, hw) for _ in range(count)], [[[cond, {"pooled_output": pooled}]]])


def test_latent_channels_match_comfyui_latent_formats():
    for family, sizes in SIZES.items():
        assert host.latent_layout(host.build_tiny_model(sizes))[0] == LATENT_CHANNELS[family]


def test_matching_config_and_data_pass_with_no_warnings():
    for family, config in (("flux2", "flux2_lokr"), ("flux1", "flux1_lokr"), ("sdxl", "sdxl_lokr_attention")):
        assert preflight(preset(config), UNET[family], dataset(family), JobSpec(preset(config).to_json())) == []


def test_config_matching_no_layer_is_an_error_naming_the_classes():
    with pytest.raises(PreflightError, match=r"^apply_preset: Flux2Attention.* matched no layer of this SDXL model"):
        preflight(preset("flux2_lokr"), UNET["sdxl"], dataset("sdxl"))


def test_unsupported_model_is_an_error_naming_the_model():
    with pytest.raises(PreflightError, match="^model: "):
        preflight(preset("lora"), {"image_model": "wan21"})


def test_sdxl_latents_for_flux2_is_an_error_naming_the_dataset():
    with pytest.raises(PreflightError) as err:
        preflight(preset("flux2_lokr"), UNET["flux2"], dataset("flux2", channels=4), latent_channels=128)
    assert str(err.value) == ("dataset: items 0, 1 (2 of 2) have 4-channel latents (an SDXL / SD 1.x latent), but "
                              "this Flux 2 model takes 128-channel latents; encode the images with this model's VAE")


def test_one_bad_latent_among_good_ones_is_named():
    data = dataset("flux1")
    data.latents.append(torch.zeros(128, 8, 8))
    with pytest.raises(PreflightError, match=r"dataset: item 2 has 128-channel latents \(a Flux 2 latent\), but this "
                                             r"Flux 1 model takes 16-channel latents"):
        preflight(preset("flux1_lokr"), UNET["flux1"], data)


def test_conditioning_of_another_width_is_an_error():
    with pytest.raises(PreflightError, match="dataset: the conditioning is 2048 wide, but this Flux 2 model's text "
                                             "input is 32 wide"):
        preflight(preset("flux2_lokr"), UNET["flux2"], dataset("flux2", text_width=2048))
    with pytest.raises(PreflightError, match="dataset: the conditioning has a 768 wide pooled_output, but this SDXL "
                                             "model takes 1280"):
        preflight(preset("sdxl_lokr_attention"), UNET["sdxl"], dataset("sdxl", pooled_width=768))


def test_rank_beyond_a_layers_width_warns_or_errs_naming_the_field_and_layers():
    """Beyond some layers' width: a warning (LyCORIS and SimpleTuner train it, wasting parameters);
    beyond every adapted layer's width: an error."""
    config = {**LORA, "linear_dim": 48, "apply_preset": {"target_module": ["Attention"]}}
    warnings = preflight(config, UNET["sdxl"])
    text = next(w for w in warnings if w.startswith("linear_dim: rank"))
    assert text.startswith("linear_dim: rank 48 is more than 22 of the 88 adapted layers can hold")
    assert "attn2.to_k (128x32: rank at most 32)" in text and "Use linear_dim 32 or less" in text
    with pytest.raises(PreflightError, match=r"(?m)^linear_dim: rank 100000 is more than 88 of the 88 adapted layers"):
        preflight({**config, "linear_dim": 100000}, UNET["sdxl"])
    # the same through a per-class override, and for T-LoRA / LoHa
    override = {**config, "linear_dim": 4, "apply_preset": {"target_module": ["Attention"],
                                                            "module_algo_map": {"Attention": {"dim": 40}}}}
    assert any(w.startswith("apply_preset.module_algo_map.Attention.dim: rank 40")
               for w in preflight(override, UNET["sdxl"]))
    named = {**LORA, "algo": "loha", "apply_preset": {"target_name": ["context_embedder"],
                                                      "name_algo_map": {"context_embedder": {"dim": 33}}}}
    with pytest.raises(PreflightError, match=r"^apply_preset\.name_algo_map\['context_embedder'\]\.dim: rank 33 .*"
                                             r"context_embedder \(64x32: rank at most 32\)"):
        preflight(named, UNET["flux2"])
    assert preflight({**config, "algo": "tlora", "linear_dim": 32, "linear_alpha": 16}, UNET["sdxl"]) is not None


def test_absurd_rank_is_an_error_with_the_size_and_the_plan_shows_it():
    config = parse_config({**LORA, "linear_dim": 99999999999, "apply_preset": {"target_module": ["Flux2Attention"]}})
    with pytest.raises(PreflightError) as err:
        preflight(config, UNET["flux2"])
    first = str(err.value).splitlines()[0]
    assert first.startswith("linear_dim: 99999999999 would make a 372.5 TB adapter (102,399,999,998,976 parameters")
    assert "the limit is 4x the model or 1.0 TB" in first
    found = review(config, UNET["flux2"])
    text = summarize(found.plan, errors=found.errors, warnings=found.warnings)
    assert text.startswith("ERRORS (2): Train LyCORIS refuses this config on this model\n  x linear_dim: 99999999999 "
                           "would make a 372.5 TB adapter")
    assert "file size about 372.5 TB in fp32, 186.3 TB in bf16" in text


def test_adapter_bigger_than_the_model_is_a_warning():
    config = {**LORA, "algo": "loha", "linear_dim": 64,
              "apply_preset": {"target_module": ["Flux2Attention", "Flux2FeedForward", "Flux2ParallelSelfAttention"]}}
    warnings = preflight(config, UNET["flux2"])
    assert warnings == ["linear_dim: 64 makes a 1.7 MB adapter (434,176 parameters, 1.5x this Flux 2 model's "
                        "288,960): the adapter is bigger than the model it adapts"]


def test_lokr_rank_that_lycoris_turns_into_a_full_matrix_is_a_warning():
    warnings = preflight({**GENERIC_LOKR, "apply_preset": {"target_module": ["Attention"]}}, UNET["sdxl"])
    assert len(warnings) == 1 and warnings[0].startswith("linear_dim: 10000 is at least half of the LoKr w2 factor on "
                                                         "88 of the 88 adapted layers")
    assert "as full_matrix: true would) and ignores the alpha (scale 1)" in warnings[0]
    mixed = preflight({**GENERIC_LOKR, "linear_dim": 16, "factor": 4, "apply_preset": {"target_module": ["Linear"]}},
                      UNET["flux2"])
    assert any("the other 11 LoKr layers keep a low-rank w2" in w for w in mixed)
    assert preflight({**GENERIC_LOKR, "full_matrix": True, "apply_preset": {"target_module": ["Attention"]}},
                     UNET["sdxl"]) == []


def test_plan_warnings_come_back_from_preflight():
    warnings = preflight(GENERIC_LOKR, UNET["flux1"], dataset("flux1"))
    assert warnings[0].startswith("apply_preset.target_module: 'Attention' matched no module of this Flux 1 model")


def test_batch_larger_than_any_bucket_is_a_warning():
    config = preset("flux2_lokr")
    spec = JobSpec(config.to_json(), batch_size=4)
    assert preflight(config, UNET["flux2"], dataset("flux2", count=3), spec) == [
        "batch_size: 4, but the largest size bucket holds 3 items (with repeats), so no batch holds more than 3"]
    data = dataset("flux2", count=3)
    data.repeats = 2
    assert preflight(config, UNET["flux2"], data, spec) == []
