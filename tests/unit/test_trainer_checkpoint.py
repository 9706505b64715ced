"""Atomic, pickle-free checkpoints: exact round trips, crash safety, pruning, validation, checksums,
and resuming from the newest intact checkpoint."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfyui_lycoris.trainer import checkpoint as checkpoint_module
from comfyui_lycoris.trainer.checkpoint import (
    CHECKSUM_KEY,
    CheckpointError,
    NoIntactCheckpointError,
    TrainingState,
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    resume_point,
    save_checkpoint,
)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]


def _trained_optimizer() -> tuple[list[torch.Tensor], torch.optim.AdamW]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_()]
    optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        (params[0].pow(2).sum() + params[1].sin().sum()).backward()
        optimizer.step()
    return params, optimizer


def _state(step: int, optimizer: torch.optim.Optimizer, generator: torch.Generator | None = None) -> TrainingState:
    adapter = {"lycoris_a.lokr_w1": torch.full((2, 2), float(step)), "lycoris_a.alpha": torch.tensor(1.0)}
    rng = capture_rng({"noise": generator} if generator is not None else None)
    return TrainingState(step, adapter, optimizer.state_dict(), rng, {"name": "job", "steps": 30}, {"loss": 0.5})


def _assert_same(a, b) -> None:
    """Deep equality with exact tensors (dtype, shape, values) and exact container types."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_adamw_state_round_trips_exactly(tmp_path):
    params, optimizer = _trained_optimizer()
    path = save_checkpoint(tmp_path, _state(3, optimizer))
    loaded = load_checkpoint(path)
    _assert_same(loaded.optimizer, optimizer.state_dict())
    assert loaded.step == 3 and loaded.job == {"name": "job", "steps": 30} and loaded.extra == {"loss": 0.5}
    # Loading into a fresh optimizer continues exactly like the original.
    clones = [p.detach().clone().requires_grad_() for p in params]
    resumed = torch.optim.AdamW(clones, lr=1.0)
    resumed.load_state_dict(loaded.optimizer)
    for opt, ps in ((optimizer, params), (resumed, clones)):
        opt.zero_grad()
        (ps[0].pow(2).sum() + ps[1].sin().sum()).backward()
        opt.step()
    for a, b in zip(params, clones):
        assert torch.equal(a, b)


def test_rng_states_round_trip(tmp_path):
    _, optimizer = _trained_optimizer()
    generator = torch.Generator().manual_seed(42)
    path = save_checkpoint(tmp_path, _state(1, optimizer, generator))
    expected_noise, expected_global = torch.randn(4, generator=generator), torch.randn(4)
    other = torch.Generator().manual_seed(0)
    restore_rng(load_checkpoint(path).rng, {"noise": other})
    assert torch.equal(torch.randn(4, generator=other), expected_noise)
    assert torch.equal(torch.randn(4), expected_global)
    with pytest.raises(CheckpointError, match="generator 'data'"):
        restore_rng(load_checkpoint(path).rng, {"data": other})


def test_crash_between_write_and_rename_keeps_previous(tmp_path):
    """A process killed after the temp file is written but before the rename: nothing partial is used."""
    _, optimizer = _trained_optimizer()
    save_checkpoint(tmp_path, _state(10, optimizer))
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO / 'scripts')!r})
        from comfyenv import install_import_paths
        install_import_paths()
        import torch
        from comfyui_lycoris.trainer import checkpoint
        os.replace = lambda *a, **k: os._exit(3)  # the crash, right before the rename
        state = checkpoint.TrainingState(20, {{"lycoris_a.lokr_w1": torch.ones(2, 2)}},
                                         {{"state": {{}}, "param_groups": []}})
        checkpoint.save_checkpoint({str(tmp_path)!r}, state)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint-00000020.")
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "checkpoint-00000010.safetensors"
    assert load_checkpoint(latest).step == 10
    # The next save cleans the stale temp file up.
    save_checkpoint(tmp_path, _state(30, optimizer), keep_last=5)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_failed_write_removes_its_temp_file(tmp_path, monkeypatch):
    _, optimizer = _trained_optimizer()
    save_checkpoint(tmp_path, _state(1, optimizer))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("comfyui_lycoris.trainer.checkpoint.os.replace", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, _state(2, optimizer))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001.safetensors"]


def test_keep_last_prunes_oldest(tmp_path):
    _, optimizer = _trained_optimizer()
    for step in (5, 10, 15, 20):
        save_checkpoint(tmp_path, _state(step, optimizer), keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [15, 20]
    with pytest.raises(CheckpointError, match="keep_last"):
        save_checkpoint(tmp_path, _state(25, optimizer), keep_last=0)


def test_latest_skips_corrupt_and_foreign_files(tmp_path):
    _, optimizer = _trained_optimizer()
    save_checkpoint(tmp_path, _state(5, optimizer))
    (tmp_path / "checkpoint-00000009.safetensors").write_bytes(b"\x00" * 10)  # truncated
    save_file({"x": torch.zeros(1)}, str(tmp_path / "checkpoint-00000008.safetensors"))  # not ours
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000005.safetensors"
    with pytest.raises(CheckpointError, match="checkpoint-00000009.safetensors: not a readable"):
        load_checkpoint(tmp_path / "checkpoint-00000009.safetensors")
    with pytest.raises(CheckpointError, match="not a trainer checkpoint"):
        load_checkpoint(tmp_path / "checkpoint-00000008.safetensors")
    assert latest_checkpoint(tmp_path / "missing") is None


def test_unstorable_values_are_named(tmp_path):
    _, optimizer = _trained_optimizer()
    state = _state(1, optimizer)
    state.optimizer["param_groups"][0]["schedule"] = object()
    with pytest.raises(CheckpointError, match=r"optimizer\.param_groups\.0\.schedule: cannot store a object"):
        save_checkpoint(tmp_path, state)
    state = _state(1, optimizer)
    state.job["when"] = {1, 2}
    with pytest.raises(CheckpointError, match="not JSON"):
        save_checkpoint(tmp_path, state)
    assert not list(tmp_path.iterdir())


# -- checksums and resume ------------------------------------------------------------------------

def _data_start(path: Path) -> int:
    """Offset of the first tensor byte: after the 8-byte length and the JSON header."""
    with open(path, "rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


def _three_checkpoints(folder: Path) -> list[Path]:
    _, optimizer = _trained_optimizer()
    return [save_checkpoint(folder, _state(step, optimizer)) for step in (10, 20, 30)]


def test_checksum_is_written_and_verified(tmp_path):
    _, optimizer = _trained_optimizer()
    path = save_checkpoint(tmp_path, _state(7, optimizer))
    loaded = load_checkpoint(path)
    assert loaded.notes == []
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as fh:
        checksum = json.loads(fh.metadata()[CHECKSUM_KEY])
        keys = sorted(fh.keys())
    assert checksum["algorithm"] == "sha256" and sorted(checksum["tensors"]) == keys


def test_bad_data_bytes_behind_a_good_header_are_named(tmp_path):
    older, newer = _three_checkpoints(tmp_path)[1:]
    start = _data_start(newer)
    with open(newer, "r+b") as fh:  # NaN bytes over the start of the data region; the header is untouched
        fh.seek(start)
        fh.write(struct.pack("<f", float("nan")))
    with pytest.raises(CheckpointError, match=r"checkpoint-00000030\.safetensors: data corrupted: 1 of 9 tensors do "
                                              r"not match their checksum \(\w+\.[\w.]+\)$"):
        load_checkpoint(newer)
    point = resume_point(tmp_path)
    assert point.path == older and point.step == 20
    assert len(point.skipped) == 1 and point.skipped[0][0] == newer and "data corrupted" in point.skipped[0][1]
    assert point.notes[0].startswith("skipped checkpoint-00000030.safetensors: data corrupted")
    assert latest_checkpoint(tmp_path) == older  # the old name gives the same answer


def test_truncated_latest_falls_back_to_the_previous(tmp_path):
    older, newer = _three_checkpoints(tmp_path)[1:]
    size = newer.stat().st_size
    with open(newer, "r+b") as fh:
        fh.truncate(size - 10)
    with pytest.raises(CheckpointError, match=rf"checkpoint-00000030\.safetensors: truncated: {size - 10} bytes, "
                                              rf"its header describes {size}"):
        load_checkpoint(newer)
    point = resume_point(tmp_path)
    assert point.path == older and point.state.step == 20
    assert [(p.name, why.split(":")[0]) for p, why in point.skipped] == [("checkpoint-00000030.safetensors", "truncated")]


def test_altered_metadata_and_misnamed_files_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file as raw_save

    path = _three_checkpoints(tmp_path)[-1]
    with safe_open(str(path), framework="pt") as fh:
        metadata, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    raw_save(tensors, str(path), {**metadata, "extra": json.dumps({"loss": 9.0})})
    with pytest.raises(CheckpointError, match="metadata does not match its checksum"):
        load_checkpoint(path)
    renamed = tmp_path / "checkpoint-00000040.safetensors"
    renamed.write_bytes((tmp_path / "checkpoint-00000020.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="holds step 20, not the step in its name"):
        load_checkpoint(renamed)
    point = resume_point(tmp_path)
    assert point.step == 20 and [p.name for p, _ in point.skipped] == [renamed.name, path.name]


def test_all_corrupt_is_an_error_listing_every_file(tmp_path):
    paths = _three_checkpoints(tmp_path)
    paths[0].write_bytes(b"\x00" * 10)
    with open(paths[1], "r+b") as fh:
        fh.truncate(paths[1].stat().st_size // 2)
    with open(paths[2], "r+b") as fh:
        fh.seek(paths[2].stat().st_size - 4)
        fh.write(b"\xff\xff\xff\xff")
    with pytest.raises(NoIntactCheckpointError) as caught:
        resume_point(tmp_path)
    message = str(caught.value)
    assert "no intact checkpoint" in message and "\n" not in message
    for path, reason in [(paths[2], "data corrupted"), (paths[1], "truncated"), (paths[0], "not a readable")]:
        assert f"{path.name}: {reason}" in message
    assert [p for p, _ in caught.value.skipped] == paths[::-1]
    with pytest.raises(CheckpointError, match="no intact checkpoint"):  # never None: no silent restart at step 0
        latest_checkpoint(tmp_path)
    assert resume_point(tmp_path / "missing") is None and resume_point(tmp_path / "missing") is None


def test_checkpoint_without_checksum_loads_with_a_note(tmp_path):
    from safetensors.torch import save_file as raw_save

    _, optimizer = _trained_optimizer()
    tensors, metadata = checkpoint_module._contents(_state(5, optimizer))
    del metadata[CHECKSUM_KEY]  # what checkpoints looked like before checksums
    raw_save(tensors, str(tmp_path / "checkpoint-00000005.safetensors"), metadata)
    point = resume_point(tmp_path)
    assert point.step == 5 and point.skipped == []
    assert point.notes == ["checkpoint-00000005.safetensors: written without a checksum (older format); "
                           "its data could not be verified"]
    _assert_same(point.state.optimizer, optimizer.state_dict())


def test_write_that_does_not_verify_prunes_nothing(tmp_path, monkeypatch):
    _, optimizer = _trained_optimizer()
    for step in (1, 2):
        save_checkpoint(tmp_path, _state(step, optimizer), keep_last=2)
    real = checkpoint_module.atomic_save_file

    def damaged(tensors, metadata, final):
        real(tensors, metadata, final)
        with open(final, "r+b") as fh:
            fh.truncate(final.stat().st_size - 1)

    monkeypatch.setattr(checkpoint_module, "atomic_save_file", damaged)
    with pytest.raises(CheckpointError, match="checkpoint-00000003.safetensors: truncated"):
        save_checkpoint(tmp_path, _state(3, optimizer), keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2, 3]
    assert resume_point(tmp_path).step == 2


_KILL_SCRIPT = """
import os, sys, time
sys.path.insert(0, {scripts!r})
from comfyenv import install_import_paths
install_import_paths()
import torch
from comfyui_lycoris.core import adapter_file
from comfyui_lycoris.trainer import checkpoint

def state(step):
    adapter = {{f"lycoris_m{{i}}.lokr_w1": torch.full((256, 256), float(step)) for i in range(8)}}
    return checkpoint.TrainingState(step, adapter, {{"state": {{}}, "param_groups": []}})

if {mode!r} == "half":  # stop half way through writing the temp file, and wait to be killed
    from safetensors.torch import save

    def half_written(tensors, path, metadata):
        data = save(tensors, metadata)
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        print("writing", flush=True)
        time.sleep(600)

    adapter_file.save_file = half_written
    checkpoint.save_checkpoint({folder!r}, state(20))
else:  # keep writing checkpoints until killed
    print("writing", flush=True)
    for step in range(20, 100000):
        checkpoint.save_checkpoint({folder!r}, state(step), keep_last=2)
"""


def _killed_writer(folder: Path, mode: str, delay: float = 0.0) -> None:
    script = _KILL_SCRIPT.format(scripts=str(REPO / "scripts"), folder=str(folder), mode=mode)
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = writer.stdout.readline()
        assert line.strip() == "writing", writer.stderr.read()
        time.sleep(delay)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.stdout.close()
        writer.stderr.close()
    assert writer.returncode == -signal.SIGKILL


def test_sigkill_in_the_middle_of_a_write_keeps_the_previous_checkpoint(tmp_path):
    _, optimizer = _trained_optimizer()
    previous = save_checkpoint(tmp_path, _state(10, optimizer))
    _killed_writer(tmp_path, "half")
    partial = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(partial) == 1 and partial[0].name.startswith(".checkpoint-00000020.") and partial[0].stat().st_size
    assert list_checkpoints(tmp_path) == [(10, previous)]  # the partial file is not taken for a checkpoint
    point = resume_point(tmp_path)
    assert point.path == previous and point.skipped == [] and point.state.step == 10
    save_checkpoint(tmp_path, _state(11, optimizer))  # the next save cleans up, even without pruning
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000010.safetensors",
                                                          "checkpoint-00000011.safetensors"]


@pytest.mark.parametrize("delay", [0.7, 1.3])
def test_sigkill_at_any_time_leaves_only_intact_checkpoints(tmp_path, delay):
    """A writer saving (and pruning) in a loop, killed at an arbitrary moment: whatever is listed is intact."""
    _killed_writer(tmp_path, "loop", delay)
    listed = list_checkpoints(tmp_path)
    assert listed, "the writer was killed before its first checkpoint; raise the delay"
    for step, path in listed:
        assert load_checkpoint(path).step == step
    point = resume_point(tmp_path)
    assert point.skipped == [] and point.step == listed[-1][0]
