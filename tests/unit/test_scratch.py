"""core.scratch: buffers reused within one model call, never kept after it."""

from __future__ import annotations

import gc
import weakref

import torch

from comfyui_lycoris.core import runtime, scratch


def test_a_slot_is_reused_and_grown_within_a_scope_and_released_after():
    like = torch.zeros(1)
    with scratch.scope():
        a = scratch.take("window", (4, 8), like)
        b = scratch.take("window", (2, 8), like)  # smaller: a view of the same buffer
        assert b.data_ptr() == a.data_ptr() and b.shape == (2, 8)
        other = scratch.take("block", (2, 8), like)  # another slot: its own buffer
        assert other.data_ptr() != a.data_ptr()
        half = scratch.take("window", (4, 8), like.half())  # another dtype: its own buffer
        assert half.dtype == torch.float16 and half.data_ptr() != a.data_ptr()
        small = weakref.ref(a.untyped_storage())
        del a, b
        gc.collect()
        assert small() is not None  # held by the scope
        big = scratch.take("window", (16, 8), like)  # larger: a new buffer replaces it
        assert big.shape == (16, 8)
        held = weakref.ref(big.untyped_storage())
        del big
        gc.collect()
        assert small() is None  # the smaller one was freed when it was replaced
        assert held() is not None  # the larger one is held until the scope ends
    gc.collect()
    assert held() is None  # nothing outlives the scope
    c, d = scratch.take("window", (4, 8), like), scratch.take("window", (4, 8), like)
    assert c.data_ptr() != d.data_ptr()  # outside a scope: plain allocations


def test_window_rows_fit_the_budget_but_stay_wide(monkeypatch):
    monkeypatch.setattr(scratch, "WINDOW_BYTES", 1000)
    monkeypatch.setattr(scratch, "WINDOW_MIN_ROWS", 4)
    assert scratch.window_rows(10, 10) == 10  # 100 bytes: one window
    assert scratch.window_rows(300, 10) == 100  # 3000 bytes: three equal windows
    assert scratch.window_rows(300, 10, copies=2) == 50  # a block beside each window: six
    assert scratch.window_rows(300, 1000) == 4  # rows of the whole budget: never narrower than 4
    assert scratch.window_rows(3, 1000) == 3


def test_sampling_calls_share_a_scope_training_calls_do_not():
    state = runtime.CallState({})
    with torch.no_grad(), runtime.active(state):
        assert scratch._SCOPE.get() is not None
    with torch.enable_grad(), runtime.active(state):
        assert scratch._SCOPE.get() is None
    assert scratch._SCOPE.get() is None
