"""The LyCORIS Plan node through the live server: warnings and Train-time errors come first in its text."""

import json
import re
from pathlib import Path

import pytest
from graphs import TINY

pytestmark = pytest.mark.integration

FLUX1 = {**TINY, "family": "flux1"}
GENERIC = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 10,
           "apply_preset": {"target_module": ["Attention", "FeedForward"],
                            "module_algo_map": {"Attention": {"factor": 10}, "FeedForward": {"factor": 4}}}}


def plan_prompt(config: dict, tiny: dict) -> dict:
    return {
        "model": {"class_type": "LycorisTinyModel", "inputs": tiny},
        "config": {"class_type": "LycorisConfig", "inputs": {"preset": "custom", "config_json": json.dumps(config)}},
        "plan": {"class_type": "LycorisPlan", "inputs": {"model": ["model", 0], "config": ["config", 0]}},
    }


def test_plan_warns_that_generic_attention_matches_nothing_on_flux1(comfy_server):
    summary = comfy_server.run(plan_prompt(GENERIC, FLUX1))["plan"]["text"][0]
    lines = summary.splitlines()
    assert lines[0] == "WARNINGS (2): this config probably does not do what you meant"
    assert lines[1] == ("  ! apply_preset.target_module: 'Attention' matched no module of this Flux 1 model, so no "
                        "attention layer is adapted (only FeedForward: 4 modules); this model's attention classes: "
                        "FluxAttention")
    assert lines[2].startswith("  ! linear_dim: 10000 is at least half of the LoKr w2 factor")
    assert "FeedForward: 4 modules" in summary and "FluxAttention:" not in summary.split("LyCORIS plan for")[1]


def test_plan_shows_an_absurd_size_as_an_error_with_the_size(comfy_server):
    config = {"algo": "lora", "multiplier": 1.0, "linear_dim": 99999999999, "linear_alpha": 1,
              "apply_preset": {"target_module": ["Flux2Attention"]}}
    summary = comfy_server.run(plan_prompt(config, TINY))["plan"]["text"][0]
    assert summary.startswith("ERRORS (2): Train LyCORIS refuses this config on this model\n"
                              "  x linear_dim: 99999999999 would make a 372.5 TB adapter")


def test_plan_shows_the_memory_estimate_for_the_size_asked(comfy_server):
    """The estimate for the connected model, with and without checkpointing; a bigger size needs more."""
    config = json.loads((Path(__file__).resolve().parents[2] / "configs" / "flux2_lokr.json").read_text())
    peaks = {}
    for size in (256, 512):
        prompt = plan_prompt(config, TINY)
        prompt["plan"]["inputs"].update({"width": size, "height": size, "batch_size": 2})
        summary = comfy_server.run(prompt)["plan"]["text"][0]
        found = re.findall(r"Estimated training peak: ([\d.]+) (MiB|GiB) \((\d+)x(\d+) px, batch 2, "
                           r"gradient checkpointing (on|off)", summary)
        assert [(w, h, mode) for _, _, w, h, mode in found] == [(str(size), str(size), "on"),
                                                               (str(size), str(size), "off")], summary
        peaks[size] = [float(v) * (1024 if unit == "GiB" else 1) for v, unit, *_ in found]
        assert peaks[size][0] < peaks[size][1], "checkpointing needs less"
    assert peaks[512][0] > peaks[256][0] and peaks[512][1] > peaks[256][1]
