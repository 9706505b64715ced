"""Bad names and values through the live server: every input that names a file or folder refuses
unsafe names (the message names the input), NaN strengths are refused, the server keeps answering,
nothing is written outside its base directory and no earlier file changes."""

import hashlib
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from graphs import TINY, train_prompt
from lycoris_reference import save_random_lycoris_file

from comfyenv import REPO
from comfyserver import PromptError
from comfyui_lycoris.core.config import parse_config
from comfyui_lycoris.core.families import profile_named
from comfyui_lycoris.core.tiny import TinySizes, unet_config

pytestmark = pytest.mark.integration

SIZES = TinySizes(**{k: v for k, v in TINY.items() if k != "dtype"})
ADAPTER = "badinput_lokr.safetensors"
EXPORT_TINY = "tiny (rebuilt from its recipe)"

# names every name input must refuse; the symlink cases are added per input (they need a folder)
BAD_NAMES = ["/srv/elsewhere/x", "../x", "../../x", "con", "nul", "NUL.safetensors", " ", "a/.hidden", "x.", "x" * 300,
             "a\\..\\..\\x", "C:/x", "a:b", "a\nb"]
IDS = [repr(n[:16]) for n in BAD_NAMES]


# -- fixtures and helpers --

@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A folder outside the server's base directory that symlinks inside it point at; must stay empty."""
    return tmp_path_factory.mktemp("outside-target")


@pytest.fixture(scope="module")
def server(comfy_server, outside):
    """The live server with an adapter file and symlinks out of loras/, output/ and output/lycoris_jobs/."""
    base = comfy_server.base
    loras, output = base / "models" / "loras", base / "output"
    config = parse_config((REPO / "configs" / "flux2_lokr.json").read_text())
    model = profile_named("flux2").build_skeleton(unet_config(SIZES), device="cpu")
    save_random_lycoris_file(config, model, loras / ADAPTER)
    (output / "lycoris_jobs").mkdir(parents=True, exist_ok=True)
    for link in (loras / "escape", output / "escape", output / "lycoris_jobs" / "escape"):
        if not link.is_symlink():
            link.symlink_to(outside, target_is_directory=True)
    for link in (loras / "victim.safetensors", output / "victim.safetensors"):
        if not link.is_symlink():
            link.symlink_to(outside / "victim.safetensors")
    yield comfy_server
    for link in (loras / "escape", output / "escape", output / "lycoris_jobs" / "escape",
                 loras / "victim.safetensors", output / "victim.safetensors"):
        link.unlink(missing_ok=True)


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root` (symlinks recorded, not followed)."""
    files = {}
    for folder, dirs, names in os.walk(root, followlinks=False):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = Path(folder, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                files[rel] = "link -> " + os.readlink(path)
            else:
                files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def wait_for_idle_jobs(server, timeout: float = 300) -> None:
    """Training jobs of other tests write into the base directory; let them finish first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(j["state"] not in ("queued", "running", "waiting") for j in server.get("/lycoris/jobs")["jobs"]):
            return
        time.sleep(0.5)
    raise TimeoutError("training jobs of other tests did not finish")


@contextmanager
def nothing_written(server, outside: Path):
    """No file of the base directory changes or appears, nothing lands in `outside` or /srv/elsewhere."""
    wait_for_idle_jobs(server)
    before = snapshot(server.base)
    assert not any(outside.iterdir())
    elsewhere = Path("/srv/elsewhere").exists()
    yield
    wait_for_idle_jobs(server)
    after = snapshot(server.base)
    changed = sorted(k for k in before if after.get(k) != before[k])
    added = sorted(set(after) - set(before))
    assert not changed, f"files changed or removed: {changed}"
    assert not added, f"files written: {added}"
    assert list(outside.rglob("*")) == [], "something was written through a symlink"
    assert Path("/srv/elsewhere").exists() == elsewhere
    assert server.get("/system_stats")["system"]["comfyui_version"], "the server still answers"


def refused(server, prompt: dict, *needles: str) -> str:
    """Run `prompt`, which must fail (at validation or when a node runs); the message contains `needles`."""
    with pytest.raises(PromptError) as err:
        server.run(prompt, timeout=120)
    text = str(err.value)
    for needle in needles:
        assert needle in text, text
    return text


# -- graphs --

def save_graph(filename: str, folder: str = "loras", overwrite: bool = False, linked: bool = False) -> dict:
    g = {
        "model": {"class_type": "LycorisTinyModel", "inputs": TINY},
        "load": {"class_type": "LycorisLoad", "inputs": {"model": ["model", 0], "lora_name": ADAPTER, "strict": True}},
        "write": {"class_type": "LycorisSave", "inputs": {"adapter": ["load", 0], "filename": filename,
                                                         "folder": folder, "overwrite": overwrite}},
    }
    if linked:  # a name from another node is only known when the graph runs
        g["name"] = {"class_type": "PrimitiveString", "inputs": {"value": filename}}
        g["write"]["inputs"]["filename"] = ["name", 0]
    return g


def strength_graph(strength, node: str = "apply", linked: bool = False) -> dict:
    g = {
        "model": {"class_type": "LycorisTinyModel", "inputs": TINY},
        "load": {"class_type": "LycorisLoad", "inputs": {"model": ["model", 0], "lora_name": ADAPTER, "strict": True}},
        "pos": {"class_type": "LycorisTinyTextEncode", "inputs": {"model": ["model", 0], "text": "a cat", "tokens": 4}},
        "latent": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    value = ["value", 0] if linked else strength
    if linked:
        g["value"] = {"class_type": "PrimitiveFloat", "inputs": {"value": strength}}
    latent = ["latent", 0]
    if node == "apply":
        g["adapt"] = {"class_type": "LycorisApply", "inputs": {"model": ["model", 0], "adapter": ["load", 0],
                                                              "strength": value}}
    elif node == "merge":
        g["adapt"] = {"class_type": "LycorisMerge", "inputs": {"model": ["model", 0], "adapter": ["load", 0],
                                                              "strength": value, "tlora_timestep": -1}}
    else:
        g["adapt"] = {"class_type": "LycorisAB", "inputs": {"model": ["model", 0], "adapter": ["load", 0],
                                                           "strengths": strength, "latent": latent}}
        latent = ["adapt", 1]
    g["sample"] = {"class_type": "KSampler", "inputs": {
        "model": ["adapt", 0], "positive": ["pos", 0], "negative": ["pos", 0], "latent_image": latent, "seed": 7,
        "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    g["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "badinput"}}
    return g


def export_graph(output_name: str) -> dict:
    g = train_prompt(steps=2, output_name=output_name)
    inputs = {k: v for k, v in g.pop("train")["inputs"].items() if k != "resume"}
    g["export"] = {"class_type": "LycorisExportJob",
                   "inputs": {**inputs, "base_model": EXPORT_TINY, "tiny_seed": TINY["seed"]}}
    return g


# -- Save LyCORIS: filename --

@pytest.mark.parametrize("name", BAD_NAMES, ids=IDS)
def test_save_refuses_bad_filenames(server, outside, name):
    with nothing_written(server, outside):
        refused(server, save_graph(name), "(LycorisSave)", "filename: ")


@pytest.mark.parametrize("name, folder, overwrite", [
    ("escape/x", "loras", False), ("escape/x", "output", False), ("escape/x", "loras", True),
    ("escape/deeper/x", "output", True), ("victim", "loras", False), ("victim", "output", True),
])
def test_save_refuses_symlinks_out_of_its_folder(server, outside, name, folder, overwrite):
    with nothing_written(server, outside):
        text = refused(server, save_graph(name, folder, overwrite), "(LycorisSave)", "filename: ")
        assert "resolves outside the output folder" in text or "is a symbolic link" in text, text


@pytest.mark.parametrize("name", ["../x", "/srv/elsewhere/x", "escape/x", "con"])
def test_save_refuses_a_bad_linked_filename_when_it_runs(server, outside, name):
    with nothing_written(server, outside):
        refused(server, save_graph(name, linked=True), "(LycorisSave)", "filename: ")


def test_save_still_writes_good_names(server):
    loras = server.base / "models" / "loras"
    server.run(save_graph("badinput/ünïcode (v2).safetensors"))
    assert (loras / "badinput" / "ünïcode (v2).safetensors").is_file()
    server.run(save_graph("badinput/ünïcode (v2)", linked=True))  # another graph shape: runs again
    assert sorted(p.name for p in (loras / "badinput").iterdir()) == ["ünïcode (v2).safetensors",
                                                                     "ünïcode (v2)_00001.safetensors"]


# -- Export LyCORIS Job: output_name --

@pytest.mark.parametrize("name", BAD_NAMES, ids=IDS)
def test_export_refuses_bad_job_names(server, outside, name):
    with nothing_written(server, outside):
        refused(server, export_graph(name), "(LycorisExportJob)", "output_name: ")


@pytest.mark.parametrize("name", ["escape", "escape/x", "escape/deeper/x"])
def test_export_refuses_a_job_folder_through_a_symlink(server, outside, name):
    with nothing_written(server, outside):
        refused(server, export_graph(name), "output_name: ", "resolves outside output/lycoris_jobs")


# -- Train LyCORIS: output_name (refused when the prompt is queued, before any node runs) --

@pytest.mark.parametrize("name", BAD_NAMES, ids=IDS)
def test_train_refuses_bad_output_names(server, outside, name):
    with nothing_written(server, outside):
        refused(server, train_prompt(steps=2, output_name=name), "(LycorisTrain)", "output_name: ")
    assert not any(j["name"] == name for j in server.get("/lycoris/jobs")["jobs"]), "no job was submitted"


@pytest.mark.parametrize("name", ["escape/x", "escape", "escape/deeper/x"])
def test_train_refuses_a_job_folder_through_a_symlink(server, outside, name):
    with nothing_written(server, outside):
        refused(server, train_prompt(steps=2, output_name=name), "output_name: ", "resolves outside")


# -- strengths --

@pytest.mark.parametrize("node", ["apply", "merge"])
@pytest.mark.parametrize("linked", [False, True], ids=["widget", "linked"])
def test_nan_strength_is_refused(server, outside, node, linked):
    with nothing_written(server, outside):
        refused(server, strength_graph(math.nan, node, linked), "strength: must be a finite number, got nan")


@pytest.mark.parametrize("node", ["apply", "merge"])
def test_infinite_strength_is_refused(server, outside, node):
    for value in (math.inf, -math.inf):
        with nothing_written(server, outside):  # (a Float node refuses inf itself: ComfyUI's range check)
            refused(server, strength_graph(value, node), f"strength: must be a finite number, got {value}")


@pytest.mark.parametrize("text", ["nan", "0, inf", "-inf, 1", "0, 11"])
def test_ab_refuses_non_finite_strengths(server, outside, text):
    with nothing_written(server, outside):
        refused(server, strength_graph(text, "ab"), "strengths: ")

