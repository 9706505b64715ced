"""Configs through the live server: each bad config is a node error with its message; the server stays up."""

import json

import pytest
from config_cases import BAD_CONFIGS

from comfyserver import PromptError

pytestmark = pytest.mark.integration

TINY = {"family": "flux2", "width": 64, "heads": 2, "depth": 2, "single_depth": 2, "context_dim": 32,
        "seed": 0, "dtype": "float32"}


def plan_prompt(preset: str, config_json: str = "", tiny: dict = TINY) -> dict:
    return {
        "model": {"class_type": "LycorisTinyModel", "inputs": tiny},
        "config": {"class_type": "LycorisConfig", "inputs": {"preset": preset, "config_json": config_json}},
        "plan": {"class_type": "LycorisPlan", "inputs": {"model": ["model", 0], "config": ["config", 0]}},
    }


def test_every_bad_config_is_a_node_error_and_a_good_prompt_follows(comfy_server):
    for bad, message in BAD_CONFIGS:
        with pytest.raises(PromptError) as err:
            comfy_server.run(plan_prompt("custom", json.dumps(bad, allow_nan=True)))
        assert message in str(err.value), f"expected {message!r} in {err.value}"
        assert err.value.details["status"]["messages"][-1][1]["node_type"] == "LycorisConfig"
    outputs = comfy_server.run(plan_prompt("flux2_lokr"))
    summary = outputs["plan"]["text"][0]
    assert "Flux2Attention" in summary and "Flux2FeedForward" in summary and "Flux2ParallelSelfAttention" in summary


def test_malformed_json_and_overrides(comfy_server):
    with pytest.raises(PromptError, match="malformed JSON at line 1, column 17"):
        comfy_server.run(plan_prompt("custom", '{"algo": "lokr",,}'))
    with pytest.raises(PromptError, match="factor: must be -1 .automatic. or a positive integer, got 0"):
        comfy_server.run(plan_prompt("flux2_lokr", '{"factor": 0}'))
    summary = comfy_server.run(plan_prompt("lora", '{"linear_dim": 4}'))["plan"]["text"][0]
    assert "lora dim 4" in summary


def test_zero_matches_names_the_models_classes(comfy_server):
    with pytest.raises(PromptError) as err:
        comfy_server.run(plan_prompt("sdxl_lokr_attention"))
    text = str(err.value)
    assert "Attention matched no layer of this Flux 2 model" in text
    assert "use target_module ['Flux2Attention', 'Flux2FeedForward', 'Flux2ParallelSelfAttention']" in text
