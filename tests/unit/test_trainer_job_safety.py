"""Jobs that lose nothing and hold nothing: resume rules, complete reruns, released models, records.

In-process (no server) on a tiny Flux 2: each test runs the real loop through the real JobQueue.
"""

from __future__ import annotations

import gc
import hashlib
import json
import weakref
from pathlib import Path

import pytest

from comfyui_lycoris.core import host
from comfyui_lycoris.core.tiny import TinySizes, pattern_latents
from comfyui_lycoris.trainer.checkpoint import list_checkpoints
from comfyui_lycoris.trainer.data import from_latent_batch
from comfyui_lycoris.trainer.job_folders import newest_folder, reserve_folder
from comfyui_lycoris.trainer.jobs import RECORD, JobQueue, jobs_on_disk
from comfyui_lycoris.trainer.loop import Folders, run_training
from comfyui_lycoris.trainer.spec import JobSpec

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SIZES = TinySizes(family="flux2", width=64, heads=2, depth=1, single_depth=1, context_dim=32, seed=2)


def make_model_and_data():
    model = host.build_tiny_model(SIZES)
    data = from_latent_batch({"samples": pattern_latents(128, 4, 4, 1, seed=1)}, host.tiny_conditioning(model, "x", 4))
    return model, data


@pytest.fixture(scope="module")
def setup():
    return make_model_and_data()


def spec(config: str | None = None, **overrides) -> JobSpec:
    return JobSpec(config_json=config or (CONFIGS / "flux2_lokr.json").read_text(), **{
        "steps": 6, "learning_rate": 1e-2, "save_every": 2, "keep_last": 5, "seed": 4, "output_name": "t",
        **overrides})


def submit(queue, model, data, folders, job_spec, resume=False, folder=None):
    def work(control):
        return run_training(job_spec, "t", model, data, folders, control, resume=resume).message

    job = queue.submit(job_spec, work, name="t", folder=folder)
    assert job.done_event.wait(300), "job ended"
    return job


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_off_never_reads_another_runs_state(setup, tmp_path):
    model, data = setup
    folders = Folders(tmp_path / "job", tmp_path / "loras")
    first = submit(JobQueue(), model, data, folders, spec())
    assert first.state == "done", first.message
    before = digest(tmp_path)
    second = submit(JobQueue(), model, data, folders, spec(seed=5))
    assert second.state == "stopped" and "resume is off" in second.message
    assert digest(tmp_path) == before, "nothing written"


def test_resume_says_what_it_took(setup, tmp_path):
    model, data = setup
    folders = Folders(tmp_path / "job", tmp_path / "loras")
    fresh = submit(JobQueue(), model, data, folders, spec(steps=4), resume=True)
    assert fresh.state == "done" and fresh.losses[0][0] == 1
    # The state message said there was nothing to resume before the run went on.
    longer = submit(JobQueue(), model, data, folders, spec(steps=6), resume=True)
    assert longer.state == "done" and longer.losses[0][0] == 5, longer.losses
    # A corrupt newest checkpoint: skipped, named, and the one before is taken.
    newest = list_checkpoints(folders.checkpoints)[-1][1]
    newest.write_bytes(newest.read_bytes()[:-100])
    events = []
    queue = JobQueue(emit=lambda event, data: events.append(data))
    again = submit(queue, model, data, folders, spec(steps=8), resume=True)
    said = [e.get("message", "") for e in events]
    assert any("resumed from checkpoint-00000004" in m and newest.name in m for m in said), said
    assert again.state == "done" and again.losses[0][0] == 5


def test_no_checkpoint_to_resume_is_said(setup, tmp_path):
    model, data = setup
    events = []
    queue = JobQueue(emit=lambda event, data: events.append(data))
    job = submit(queue, model, data, Folders(tmp_path / "job", tmp_path / "loras"), spec(steps=2), resume=True)
    assert job.state == "done"
    assert any("no checkpoint" in e.get("message", "") for e in events)


def test_a_complete_run_rerun_changes_nothing(setup, tmp_path):
    model, data = setup
    folders = Folders(tmp_path / "job", tmp_path / "loras")
    assert submit(JobQueue(), model, data, folders, spec()).state == "done"
    before = digest(tmp_path)
    rerun = submit(JobQueue(), model, data, folders, spec(), resume=True)
    assert rerun.state == "done" and "already complete" in rerun.message, rerun.message
    assert digest(tmp_path) == before


def test_multiplier_scales_the_trained_output(setup, tmp_path, monkeypatch):
    """LyCORIS trains base + multiplier * delta: the loop's model call runs the adapter at the config's
    multiplier, the run differs from multiplier 1, and the file records it."""
    from safetensors import safe_open

    import comfyui_lycoris.trainer.loop as loop

    model, data = setup
    config = json.loads((CONFIGS / "flux2_lokr.json").read_text())
    used, losses = [], {}

    class Recording(loop.ComfyPredictor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            used.append(self.strength)

    monkeypatch.setattr(loop, "ComfyPredictor", Recording)
    for m in (1, 3):
        folders = Folders(tmp_path / f"m{m}", tmp_path / "loras")
        job = submit(JobQueue(), model, data, folders, spec(json.dumps({**config, "multiplier": m}), steps=3,
                                                            output_name=f"m{m}"))
        assert job.state == "done", job.message
        losses[m] = [loss for _, loss in job.losses]
        with safe_open(str(sorted((tmp_path / "loras").glob(f"m{m}*.safetensors"))[0]), "pt") as fh:
            assert float(fh.metadata()["lycoris_pack.multiplier"]) == m
    assert used == [1.0, 3.0]
    assert losses[1][0] == losses[3][0], "step 1 starts from ΔW = 0 either way"
    assert losses[1][1:] != losses[3][1:], "then the multiplier changes what was learned"


def test_an_ended_job_releases_its_model_and_data(tmp_path):
    model, data = make_model_and_data()
    refs = weakref.ref(model), weakref.ref(data)
    job = submit(JobQueue(), model, data, Folders(tmp_path / "job", tmp_path / "loras"), spec(steps=2))
    assert job.state == "done" and job.adapter is not None
    del model, data
    gc.collect()
    assert refs[0]() is None and refs[1]() is None, "the finished job still holds the model or the dataset"


def test_finished_jobs_are_bounded_and_listed_after_a_restart(tmp_path):
    root = tmp_path / "lycoris_jobs"
    queue = JobQueue(keep_finished=2)
    jobs = []
    for i in range(3):
        folder = reserve_folder(root, "dup/x")
        job = queue.submit(spec(output_name="dup/x", seed=i), lambda control: "quick", name="dup/x", folder=folder)
        assert job.done_event.wait(30)
        jobs.append(job)
    assert [j.id for j in queue.jobs()] == [j.id for j in jobs[1:]]
    assert [p.name for p in sorted((root / "dup").iterdir())] == ["x", "x_00001", "x_00002"]
    assert newest_folder(root, "dup/x") == (root / "dup" / "x_00002").resolve()
    # A job that was running when the server stopped.
    record = json.loads((root / "dup" / "x" / RECORD).read_text())
    (root / "dup" / "x" / RECORD).write_text(json.dumps({**record, "state": "running", "step": 3}))
    found = {j.id: j for j in jobs_on_disk(root)}
    assert set(found) == {j.id for j in jobs}
    assert all(j.from_disk and j.work is None for j in found.values())
    interrupted = found[jobs[0].id]
    assert interrupted.state == "interrupted" and "resume on" in interrupted.message and interrupted.step == 3
    restarted = JobQueue(history=list(found.values()))
    assert {j.id for j in restarted.jobs()} == set(found)


def test_reserved_folders_are_never_shared(tmp_path):
    root = tmp_path / "jobs"
    folders = [reserve_folder(root, "a") for _ in range(5)]
    assert len(set(folders)) == 5 and all(f.is_dir() for f in folders)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="output_name"):
        reserve_folder(root, "link/x")
    with pytest.raises(ValueError, match="output_name"):
        reserve_folder(root, "/srv/elsewhere/x")
    assert list(outside.iterdir()) == []


def test_job_records_survive_concurrent_writers(tmp_path):
    """The submitting thread and the worker write a job's record at the same moments: never torn."""
    import threading

    from comfyui_lycoris.trainer.jobs import Job, _write_record

    folder = tmp_path / "job"
    folder.mkdir()
    job = Job("0123456789ab", "x", spec(), None, folder)

    def hammer(state: str) -> None:
        for i in range(200):
            job.state, job.message = state, state * (i % 7)
            _write_record(job)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in ("queued", "running", "done")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads((folder / RECORD).read_text())["id"] == job.id
    assert [p.name for p in folder.iterdir()] == [RECORD], "no temp file left behind"
