"""Atomic, pickle-free checkpoints: exact round trips, crash safety, pruning, validation."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfyui_lycoris.trainer.checkpoint import (
    CheckpointError,
    TrainingState,
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
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
