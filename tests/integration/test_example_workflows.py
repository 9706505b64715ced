"""Every workflow in example_workflows/ is valid and runs: converted to an API prompt by the pack's
converter (scripts/workflow_api.py), submitted to the live server, run to success on tiny models,
its outputs checked. The real frontend loads each file and queues the same prompt.

01 trains the adapter that 02 and 03 load, so they run in file order (module fixtures). Training
runs fewer steps than the shipped workflows (which `make demo` runs as they are) to keep this short.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from workflow_api import ui_to_api

from comfyenv import REPO
from comfyserver import ARTIFACTS

pytestmark = pytest.mark.integration

WORKFLOWS = REPO / "example_workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
NUMBERED = {name.split("_", 1)[0]: name for name in NAMES}  # "01" -> "01_Train a Flux 2 LoKr" (names are titles)
TEST_STEPS = 40  # training steps here (the shipped 01 trains longer)


def workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def find(prompt: dict, class_type: str, title: str | None = None) -> str:
    """The id of the one node of `class_type` (whose title contains `title`)."""
    ids = [i for i, n in prompt.items() if n["class_type"] == class_type
           and (title is None or title.lower() in n["_meta"]["title"].lower())]
    assert len(ids) == 1, f"{class_type} {title or ''}: {ids}"
    return ids[0]


def files(server, outputs: dict, node_id: str, kind: str = "images") -> list[Path]:
    items = outputs[node_id][kind]
    paths = [server.base / item.get("type", "output") / item["subfolder"] / item["filename"] for item in items]
    for path in paths:
        assert path.is_file(), path
    return paths


def latent(path: Path) -> torch.Tensor:
    return load_file(str(path))["latent_tensor"]


@pytest.fixture(scope="module")
def info(comfy_server):
    return comfy_server.get("/object_info")


@pytest.fixture(scope="module")
def prompts(info):
    return {name: ui_to_api(workflow(name), info) for name in NAMES}


@pytest.fixture(scope="module")
def trained(comfy_server, prompts):
    """01 run (shortened): outputs, the job record and the adapter file."""
    prompt = json.loads(json.dumps(prompts[NUMBERED["01"]]))
    train = find(prompt, "LycorisTrain")
    prompt[train]["inputs"]["steps"] = TEST_STEPS
    name = prompt[train]["inputs"]["output_name"]
    shutil.rmtree(comfy_server.base / "models" / "loras" / Path(name).parent, ignore_errors=True)
    started = time.monotonic()
    outputs = comfy_server.run(prompt, timeout=600)
    job = comfy_server.get(f"/lycoris/jobs/{outputs[train]['job_id'][0]}")
    print(f"01: {TEST_STEPS} steps trained and run in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return {"prompt": prompt, "outputs": outputs, "job": job,
            "adapter": comfy_server.base / "models" / "loras" / f"{name}.safetensors"}


def test_every_workflow_converts(prompts, info):
    assert set(NUMBERED) >= {"01", "02", "03", "04", "05", "06", "07"}
    for name, prompt in prompts.items():
        assert prompt, name
        for entry in prompt.values():
            assert entry["class_type"] in info


def test_01_trains_a_flux2_lokr(comfy_server, trained):
    prompt, outputs, job = trained["prompt"], trained["outputs"], trained["job"]
    assert prompt[find(prompt, "LycorisConfig")]["inputs"]["preset"] == "flux2_lokr"
    assert job["state"] == "done" and job["step"] == TEST_STEPS, job["message"]
    losses = [loss for _, loss in job["losses"]]
    tenth = max(1, len(losses) // 10)
    assert sum(losses[-tenth:]) / tenth < sum(losses[:tenth]) / tenth, "the loss falls"
    with safe_open(str(trained["adapter"]), "pt") as f:
        config = json.loads(f.metadata()["lycoris_config"])
        assert config["algo"] == "lokr" and config["factor"] == 4 and config["full_matrix"] is True
        assert any(k.startswith("lycoris_") and k.endswith(".lokr_w1") for k in f.keys())
    (loss_png,) = files(comfy_server, outputs, find(prompt, "SaveImage", "loss"))
    assert Image.open(loss_png).size == (640, 360)
    (data,) = files(comfy_server, outputs, find(prompt, "SaveLatent", "training"), "latents")
    assert latent(data).shape == (1, 128, 8, 8)
    assert "Flux2Attention" in outputs[find(prompt, "LycorisPlan")]["text"][0]


@pytest.fixture(scope="module")
def ab_run(comfy_server, prompts, trained):
    prompt = prompts[NUMBERED["02"]]
    return prompt, comfy_server.run(prompt)


def test_02_applies_and_renders_the_ab_grid(comfy_server, ab_run, trained):
    prompt, outputs = ab_run
    (grid,) = files(comfy_server, outputs, find(prompt, "SaveImage", "grid"))
    width, height = Image.open(grid).size
    assert width > 3 * 128 and height > 128, "three columns of 128 px previews and a label row"
    (applied,) = files(comfy_server, outputs, find(prompt, "SaveImage", "applied"))
    assert Image.open(applied).size == (128, 128)
    (ab,) = files(comfy_server, outputs, find(prompt, "SaveLatent", "A/B"), "latents")
    samples = latent(ab)
    assert samples.shape == (3, 128, 8, 8)
    (data,) = files(comfy_server, trained["outputs"], find(trained["prompt"], "SaveLatent", "training"), "latents")
    distance = [float(((s - latent(data)[0]) ** 2).mean()) for s in samples]
    assert distance[2] < distance[0], f"strength 1 is closer to the training latent than 0: {distance}"


def test_03_merges_and_saves(comfy_server, prompts, ab_run, trained):
    prompt = prompts[NUMBERED["03"]]
    outputs = comfy_server.run(prompt)
    exported = Path(outputs[find(prompt, "LycorisSave")]["text"][0].removeprefix("saved "))
    assert exported.is_file() and load_file(str(exported)).keys() == load_file(str(trained["adapter"])).keys()
    merged_models = list((comfy_server.base / "output" / "lycoris-demo").glob("merged_flux2*.safetensors"))
    assert merged_models, "Save Model wrote the merged model"
    (merged,) = files(comfy_server, outputs, find(prompt, "SaveLatent", "merged"), "latents")
    ab_prompt, ab_outputs = ab_run
    (ab,) = files(comfy_server, ab_outputs, find(ab_prompt, "SaveLatent", "A/B"), "latents")
    assert torch.allclose(latent(merged)[0], latent(ab)[2], atol=1e-3), "merged = applied at strength 1"


def test_04_trains_tlora_and_plots_its_mask(comfy_server, prompts):
    prompt = prompts[NUMBERED["04"]]
    assert prompt[find(prompt, "LycorisConfig")]["inputs"]["preset"] == "tlora"
    outputs = comfy_server.run(prompt, timeout=600)
    (mask,) = files(comfy_server, outputs, find(prompt, "SaveImage", "mask"))
    assert Image.open(mask).size == (768, 512)
    files(comfy_server, outputs, find(prompt, "SaveImage", "sample"))
    job = comfy_server.get(f"/lycoris/jobs/{outputs[find(prompt, 'LycorisTrain')]['job_id'][0]}")
    assert job["state"] == "done"
    with safe_open(str(comfy_server.base / "models" / "loras" / "lycoris-demo" / "tlora.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["lycoris_config"])["algo"] == "tlora"


def test_05_trains_sdxl_attention_only(comfy_server, prompts):
    prompt = prompts[NUMBERED["05"]]
    outputs = comfy_server.run(prompt, timeout=600)
    plan = outputs[find(prompt, "LycorisPlan")]["text"][0]
    assert "Attention" in plan and "FeedForward" not in plan
    files(comfy_server, outputs, find(prompt, "SaveImage", "sample"))
    job = comfy_server.get(f"/lycoris/jobs/{outputs[find(prompt, 'LycorisTrain')]['job_id'][0]}")
    assert job["state"] == "done", job["message"]
    keys = load_file(str(comfy_server.base / "models" / "loras" / "lycoris-demo" / "sdxl_attention_lokr.safetensors"))
    assert keys and all("_attn" in k for k in keys), "attention layers only"


def test_06_loads_a_simpletuner_file(comfy_server, prompts):
    """Runs as shipped: the LoKr file it loads (written by LyCORIS itself on the diffusers twin of the workflow's
    tiny model, as SimpleTuner saves it) ships in example_workflows/loras/, which the pack lists among the loras."""
    prompt = prompts[NUMBERED["06"]]
    load = prompt[find(prompt, "LycorisLoad")]["inputs"]
    shipped = WORKFLOWS / "loras" / load["lora_name"]
    assert shipped.is_file() and shipped.stat().st_size < 200_000, shipped
    assert not (comfy_server.base / "models" / "loras" / load["lora_name"]).exists(), "nothing copied by hand"
    assert load["lora_name"] in comfy_server.get("/object_info/LycorisLoad")["LycorisLoad"]["input"]["required"][
        "lora_name"][1]["options"]
    with safe_open(str(shipped), "pt") as f:
        assert json.loads(f.metadata()["lycoris_config"])["algo"] == "lokr"
        assert all(k.startswith("lycoris_transformer_blocks_") or k.startswith("lycoris_single_transformer_blocks_")
                   for k in f.keys())
    outputs = comfy_server.run(prompt)
    assert "not in this model" not in outputs[find(prompt, "LycorisLoad")]["text"][0]
    (grid,) = files(comfy_server, outputs, find(prompt, "SaveImage", "grid"))
    assert Image.open(grid).size[0] > 2 * 128
    (ab,) = files(comfy_server, outputs, find(prompt, "SaveLatent"), "latents")
    samples = latent(ab)
    assert samples.shape[0] == 2 and not torch.allclose(samples[0], samples[1], atol=1e-3), "the file changes the model"


def test_07_compares_named_variants_in_one_batch(comfy_server, prompts):
    """Runs as shipped (06's file): four named variants of one adapter in one sampler run, a grid labelled with
    their names (exactness against separate applications: test_strength_shape_server.py)."""
    prompt = prompts[NUMBERED["07"]]
    names = []
    node_id = find(prompt, "LycorisAB")
    link = prompt[node_id]["inputs"]["variants"]
    while link:  # the chain, last variant first
        variant = prompt[link[0]]["inputs"]
        names.insert(0, variant["name"])
        link = variant.get("variants")
    assert names == ["full", "double blocks only", "single blocks only", "early steps only"]
    outputs = comfy_server.run(prompt)
    (ab,) = files(comfy_server, outputs, find(prompt, "SaveLatent", "variant"), "latents")
    samples = latent(ab)
    assert samples.shape == (4, 128, 8, 8)
    for i in range(4):
        for j in range(i):
            assert not torch.allclose(samples[i], samples[j], atol=1e-3), f"{names[i]} looks like {names[j]}"
    (grid,) = files(comfy_server, outputs, find(prompt, "SaveImage", "variants grid"))
    assert Image.open(grid).size[0] > 4 * 128, "four columns of 128 px previews"
    (plot,) = files(comfy_server, outputs, find(prompt, "SaveImage", "schedule"))
    assert Image.open(plot).size == (512, 256)


# ---------------------------------------------------------------- the real frontend

CHROMIUM = Path("/usr/bin/chromium")

# Runs in its own process: the browser tests may hold playwright's sync API open in this one.
FRONTEND = r"""
import json, sys
from pathlib import Path
from playwright.sync_api import sync_playwright

url, workflows, shots = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
results, errors = {}, []
with sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                 args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
    page = browser.new_page(viewport={"width": 1600, "height": 900})
    page.on("pageerror", lambda err: errors.append(f"{err.name}: {err.message}"))
    page.goto(url)
    page.wait_for_function("() => window.comfyAPI?.app?.app?.graph && "
                           "window.LiteGraph?.registered_node_types?.LycorisTinyLatentPreview", timeout=60_000)
    dialog = page.locator(".p-dialog", has_text="Templates")  # a first visit opens the template browser
    try:
        dialog.wait_for(state="visible", timeout=5_000)
        dialog.locator("button:has(i.pi-times)").click()
        dialog.wait_for(state="hidden")
    except Exception:  # no dialog: nothing to close
        pass
    for name, workflow in workflows.items():
        results[name] = page.evaluate('''async (wf) => {
            const app = window.comfyAPI.app.app;
            await app.loadGraphData(structuredClone(wf), true, true, null);
            const saved = app.graph.serialize();
            const missing = saved.nodes.map((n) => n.type).filter((t) => !window.LiteGraph.registered_node_types[t]);
            const {output} = await app.graphToPrompt();
            const items = [...app.graph.nodes, ...app.graph.groups];  // the whole workflow in view
            const x0 = Math.min(...items.map((n) => n.pos[0])), y0 = Math.min(...items.map((n) => n.pos[1] - 40));
            const x1 = Math.max(...items.map((n) => n.pos[0] + n.size[0]));
            const y1 = Math.max(...items.map((n) => n.pos[1] + n.size[1]));
            app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], {zoom: 0.95});
            app.canvas.setDirty(true, true);
            return {output, missing, widgets: Object.fromEntries(saved.nodes.map((n) => [n.id, n.widgets_values]))};
        }''', workflow)
        page.wait_for_timeout(300)
        page.screenshot(path=str(shots / f"{name}.png"))
    browser.close()
print(json.dumps({"results": results, "errors": errors}))
"""


def test_the_frontend_loads_each_workflow_and_queues_the_same_prompt(comfy_server, prompts, tmp_path):
    """The server's own frontend in headless Chromium (tests/browser installs it); skipped without one."""
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright is not installed (tests/browser installs it)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (tests/browser installs it)")
    shots = ARTIFACTS / "workflows"
    shots.mkdir(parents=True, exist_ok=True)
    (tmp_path / "workflows.json").write_text(json.dumps({name: workflow(name) for name in NAMES}))
    done = subprocess.run([sys.executable, "-c", FRONTEND, comfy_server.url, str(tmp_path / "workflows.json"),
                           str(shots)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    for name in NAMES:
        result = answer["results"][name]
        assert not result["missing"], f"{name}: the frontend does not know {result['missing']}"
        expected = {i: {"class_type": n["class_type"], "inputs": n["inputs"]} for i, n in prompts[name].items()}
        got = {i: {"class_type": n["class_type"], "inputs": n["inputs"]} for i, n in result["output"].items()}
        assert got == expected, f"{name}: the frontend queues a different prompt"
        for node in workflow(name)["nodes"]:
            assert result["widgets"][str(node["id"])] == node["widgets_values"], f"{name}: node {node['id']} widgets"
    assert not answer["errors"], answer["errors"]
