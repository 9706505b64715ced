"""The T-LoRA Mask Visualizer in a live server: optional inputs left out, then a model connected."""

import pytest

pytestmark = pytest.mark.integration


def _visualizer(**extra) -> dict:
    inputs = {"rank": 32, "min_rank": 1, "alpha": 1.0, "compare_alphas": "2", "scheduler": "karras",
              "steps": 8, "denoise": 1.0, "width": 768, "height": 512, **extra}
    return {"class_type": "LycorisTLoraMaskVisualizer", "inputs": inputs}


def test_visualizer_previews_with_and_without_a_model(comfy_server):
    alone = comfy_server.run({"1": _visualizer()})
    assert alone["1"]["images"][0]["type"] == "temp"
    model = {"family": "flux2", "width": 128, "heads": 1, "depth": 1, "single_depth": 1,
             "context_dim": 64, "seed": 0, "dtype": "float32"}
    with_model = comfy_server.run({"1": {"class_type": "LycorisTinyModel", "inputs": model},
                                   "2": _visualizer(model=["1", 0])})
    assert with_model["2"]["images"][0]["filename"].endswith(".png")
