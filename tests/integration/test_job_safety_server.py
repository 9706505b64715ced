"""Training jobs through the live server that lose nothing, leak nothing and write nowhere else.

Each case ends with the same checks: the server still answers, no file appeared outside the
folders the case was allowed to write (the job's own folder, the adapter, its latents), and no
file that existed before changed. A case starts when no other job is active, so every write
during it is its own.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from graphs import train_prompt

from comfyserver import PromptError

pytestmark = pytest.mark.integration

ACTIVE = ("queued", "running", "waiting")
CUSTOM = "custom"
IGNORED = ("user/", "temp/")  # ComfyUI's own settings and previews


def snapshot(base: Path) -> dict[str, str]:
    files = {}
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base).as_posix()
        if path.is_file() and not path.is_symlink() and not rel.startswith(IGNORED) and "custom_nodes" not in rel:
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


class Watch:
    """Before/after of the server's base folder; `check(allowed)` after a case."""

    def __init__(self, server):
        self.server = server
        idle(server)
        self.before = snapshot(server.base)

    def check(self, *allowed: str) -> list[str]:
        """`allowed`: path prefixes (relative to the base folder) the case may write."""
        assert self.server.get("/system_stats")["system"], "the server answers"
        idle(self.server)
        after = snapshot(self.server.base)
        # Inside its own job folder a job rotates checkpoints and updates its record; elsewhere nothing changes.
        changed = [p for p, h in self.before.items() if after.get(p) != h and not p.startswith(allowed)]
        assert not changed, f"earlier files changed or vanished: {changed[:5]}"
        new = [p for p in after if p not in self.before]
        stray = [p for p in new if not p.startswith(allowed)]
        assert not stray, f"written outside {allowed}: {stray[:5]}"
        return new


def idle(server, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while any(j["state"] in ACTIVE for j in server.get("/lycoris/jobs")["jobs"]):
        assert time.monotonic() < deadline, "other jobs did not end"
        time.sleep(0.2)


def job(server, outputs) -> dict:
    return server.get(f"/lycoris/jobs/{outputs['train']['job_id'][0]}")


def ended(server, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = server.get(f"/lycoris/jobs/{job_id}")
        if found["state"] not in ACTIVE:
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.2)


def train(steps: int, name: str, seed: int = 0, resume: bool = False, save_every: int = 2) -> dict:
    prompt = train_prompt(steps=steps, output_name=name, save_every=save_every)
    prompt["train"]["inputs"].update({"seed": seed, "resume": resume})
    return prompt


def test_same_name_jobs_get_their_own_folders(comfy_server):
    watch = Watch(comfy_server)
    first = job(comfy_server, comfy_server.run(train(4, "safety/dup", seed=0)))
    second = job(comfy_server, comfy_server.run(train(4, "safety/dup", seed=1)))
    assert first["id"] != second["id"] and first["folder"] != second["folder"]
    done = [ended(comfy_server, j["id"]) for j in (first, second)]
    assert [j["state"] for j in done] == ["done", "done"], [j["message"] for j in done]
    assert all(j["step"] == 4 for j in done), "the second job trained its own 4 steps"
    files = sorted((comfy_server.base / "models" / "loras" / "safety").glob("dup*.safetensors"))
    assert len(files) == 2 and files[0].read_bytes() != files[1].read_bytes()
    watch.check("output/lycoris_jobs/safety/dup", "models/loras/safety/dup")


def test_requeueing_the_same_prompt_submits_a_new_job_once_the_last_ended(comfy_server):
    watch = Watch(comfy_server)
    prompt = train(100000, "safety/again")
    first = job(comfy_server, comfy_server.run(prompt))["id"]
    assert job(comfy_server, comfy_server.run(prompt))["id"] == first, "while it runs, the same job"
    comfy_server.post(f"/lycoris/jobs/{first}/cancel", {})
    assert ended(comfy_server, first)["state"] == "cancelled"
    second = job(comfy_server, comfy_server.run(prompt))["id"]
    assert second != first, "ComfyUI's cache did not serve the ended job"
    comfy_server.post(f"/lycoris/jobs/{second}/cancel", {})
    assert ended(comfy_server, second)["state"] == "cancelled"
    prompt["train"]["inputs"]["resume"] = True
    resumed = job(comfy_server, comfy_server.run(prompt))
    assert resumed["id"] not in (first, second) and resumed["folder"] == ended(comfy_server, second)["folder"]
    comfy_server.post(f"/lycoris/jobs/{resumed['id']}/cancel", {})
    ended(comfy_server, resumed["id"])
    watch.check("output/lycoris_jobs/safety/again")


def test_resume_after_cancel_names_its_checkpoint_and_skips_a_corrupt_one(comfy_server):
    watch = Watch(comfy_server)
    running = job(comfy_server, comfy_server.run(train(100000, "safety/resume", save_every=2)))
    deadline = time.monotonic() + 120
    while comfy_server.get(f"/lycoris/jobs/{running['id']}")["step"] < 5:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    comfy_server.post(f"/lycoris/jobs/{running['id']}/cancel", {})
    cancelled = ended(comfy_server, running["id"])
    assert cancelled["state"] == "cancelled"
    folder = Path(cancelled["folder"])
    checkpoints = sorted(folder.glob("checkpoint-*.safetensors"))
    assert len(checkpoints) >= 2
    newest = checkpoints[-1]
    newest.write_bytes(newest.read_bytes()[:-64])  # a torn file
    watch.before = snapshot(comfy_server.base)
    resumed = job(comfy_server, comfy_server.run(train(int(newest.stem.split("-")[1]) + 2, "safety/resume",
                                                       resume=True)))
    assert resumed["folder"] == cancelled["folder"]
    done = ended(comfy_server, resumed["id"])
    assert done["state"] == "done", done["message"]
    assert done["losses"][0][0] == int(checkpoints[-2].stem.split("-")[1]) + 1, "continued from the intact one"
    new = watch.check("output/lycoris_jobs/safety/resume", "models/loras/safety/resume")
    assert any(p.endswith(".safetensors") and p.startswith("models/loras") for p in new)


def test_resuming_a_complete_job_changes_nothing(comfy_server):
    first = ended(comfy_server, job(comfy_server, comfy_server.run(train(2, "safety/complete")))["id"])
    assert first["state"] == "done"
    watch = Watch(comfy_server)
    with pytest.raises(PromptError, match="already complete"):
        comfy_server.run(train(2, "safety/complete", resume=True))
    assert watch.check() == []


def test_resume_with_nothing_to_resume_says_so(comfy_server):
    watch = Watch(comfy_server)
    outputs = comfy_server.run(train(2, "safety/fresh", resume=True))
    assert "starts at step 0" in outputs["train"]["text"][0]
    assert ended(comfy_server, outputs["train"]["job_id"][0])["state"] == "done"
    watch.check("output/lycoris_jobs/safety/fresh", "models/loras/safety/fresh")


def _sample(server, prefix: str) -> bytes:
    prompt = train(1, "unused")
    del prompt["train"], prompt["data"], prompt["config"], prompt["latents"]
    prompt.update({
        "neg": {"class_type": "LycorisTinyTextEncode", "inputs": {"model": ["model", 0], "text": "", "tokens": 4}},
        "empty": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "positive": ["cond", 0], "negative": ["neg", 0], "latent_image": ["empty", 0],
            "seed": 3, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}},
    })
    outputs = server.run(prompt)
    saved = outputs["save"]["latents"][0]
    path = server.base / "output" / saved["subfolder"] / saved["filename"]
    from safetensors.torch import load_file

    return load_file(str(path))["latent_tensor"].numpy().tobytes()


def test_sampling_the_trained_model_is_unchanged_before_during_and_after(comfy_server):
    """The job trains on the same MODEL object a sampling prompt uses: nothing it does is visible there."""
    before = _sample(comfy_server, "safety/sample_before")
    running = job(comfy_server, comfy_server.run(train(100000, "safety/shared")))
    deadline = time.monotonic() + 120
    while comfy_server.get(f"/lycoris/jobs/{running['id']}")["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    during = _sample(comfy_server, "safety/sample_during")
    assert comfy_server.get(f"/lycoris/jobs/{running['id']}")["state"] in ACTIVE
    comfy_server.post(f"/lycoris/jobs/{running['id']}/cancel", {})
    ended(comfy_server, running["id"])
    after = _sample(comfy_server, "safety/sample_after")
    assert before == during == after


@pytest.mark.parametrize("change,field", [
    ({"config": {"class_type": "LycorisConfig", "inputs": {
        "preset": CUSTOM, "config_json": json.dumps({"algo": "lora", "multiplier": 1, "linear_dim": 4,
                                                     "linear_alpha": 4, "apply_preset": {"target_module": ["NoSuchClass"]}})}}},
     "apply_preset"),
    ({"config": {"class_type": "LycorisConfig", "inputs": {"preset": "lora",
                                                          "config_json": '{"linear_dim": 99999999999}'}}},
     "linear_dim"),
    ({"latents": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}},
     "dataset"),
], ids=["no-layer", "absurd-rank", "sdxl-latents"])
def test_bad_submissions_fail_the_prompt_not_only_the_job(comfy_server, change, field):
    watch = Watch(comfy_server)
    jobs_before = len(comfy_server.get("/lycoris/jobs")["jobs"])
    prompt = train(2, "safety/refused")
    prompt.update(change)
    with pytest.raises(PromptError, match=f"Train LyCORIS: {field}"):
        comfy_server.run(prompt)
    assert len(comfy_server.get("/lycoris/jobs")["jobs"]) == jobs_before, "no job was submitted"
    assert watch.check() == []


def test_a_config_probably_not_meant_warns_on_train(comfy_server):
    prompt = train(2, "safety/warned")
    prompt["config"]["inputs"].update({"preset": CUSTOM, "config_json": json.dumps(
        {"algo": "lora", "multiplier": 1, "linear_dim": 4, "linear_alpha": 4,
         "apply_preset": {"target_module": ["Attention", "Flux2FeedForward"]}})})
    outputs = comfy_server.run(prompt)
    assert "warning: apply_preset.target_module: 'Attention' matched no module" in outputs["train"]["text"][0]
    done = ended(comfy_server, outputs["train"]["job_id"][0])
    assert done["state"] == "done" and "warning: apply_preset.target_module" in done["message"]


def test_comfyuis_cancel_stops_the_waiting_prompt_and_not_the_job(comfy_server):
    """ComfyUI's "Cancel current run" is for the prompt: a Job node waiting on the job stops waiting, and
    the job trains on (the trainer's ComfyUI ops must not take the global interrupt flag; they did)."""
    prompt = train(100000, "safety/comfy_cancel")
    prompt["job"] = {"class_type": "LycorisJob", "inputs": {"job": ["train", 0], "wait": True}}
    waiting = comfy_server.submit(prompt)
    deadline = time.monotonic() + 120
    while not (jobs := [j for j in comfy_server.get("/lycoris/jobs")["jobs"]
                        if j["name"].startswith("safety/comfy_cancel") and j["state"] in ACTIVE and j["step"] >= 2]):
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.1)
    running = jobs[0]
    for _ in range(3):  # a Cancel can land between steps or inside one
        comfy_server.post("/interrupt", {})
        time.sleep(0.3)
    with pytest.raises(PromptError, match="(?i)interrupt"):
        comfy_server.wait(waiting, timeout=60)
    step = comfy_server.get(f"/lycoris/jobs/{running['id']}")["step"]
    while (now := comfy_server.get(f"/lycoris/jobs/{running['id']}"))["step"] < step + 3:
        assert now["state"] in ACTIVE, f"the job ended on ComfyUI's cancel: {now['state']}: {now['message']}"
        assert time.monotonic() < deadline + 120, "the job stopped training"
        time.sleep(0.1)
    comfy_server.post(f"/lycoris/jobs/{running['id']}/cancel", {})
    assert ended(comfy_server, running["id"])["state"] == "cancelled"
    assert _sample(comfy_server, "safety/after_comfy_cancel"), "the next prompt runs"
