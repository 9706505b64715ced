"""Scratch memory shared by the adapted layers of one model call.

A rebuilt layer needs a transient window of W' (and LoHa a block of ΔW rows). Allocating them
anew in every layer of every call costs the allocator and, for blocks this large, fresh pages
that the kernel faults in and zeroes each time: measured on the bench model (CPU, 2 threads,
LoHa r16), a third of the rebuild's cost. Inside `scope()` (one model call, see
`core.runtime.active`) `take` hands out views of buffers kept until the scope ends, each grown to
the largest request: the transient peak stays one layer's window and block, and nothing outlives
the call. Outside a scope `take` simply allocates.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import torch

_SCOPE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lycoris_scratch", default=None)


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """Buffers taken in this context (thread) are reused until it ends, then freed."""
    token = _SCOPE.set({})
    try:
        yield
    finally:
        _SCOPE.reset(token)


def take(slot: str, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape` in like's dtype and device.

    In a scope it is a view of the slot's buffer: valid until the same slot is taken again, so a
    slot belongs to one caller at a time ("window": `_Plan.run`, "block": an adapter's writer).
    """
    buffers = _SCOPE.get()
    if buffers is None:
        return like.new_empty(tuple(shape))
    n = math.prod(shape)
    key = (slot, like.dtype, like.device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < n:
        buffers.pop(key, None)  # free the smaller one before allocating
        buffer = buffers[key] = like.new_empty(n)
    return buffer[:n].view(tuple(shape))
