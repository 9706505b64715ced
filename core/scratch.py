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

# A weight-sized transient (W' of a rebuilt layer, LoHa's ΔW) is built in steps of rows: as few
# equal steps as fit in WINDOW_BYTES, but never narrower than WINDOW_MIN_ROWS rows, since narrower
# products lose the matmul's speed (3072 x 12288 fp32, 1024 tokens: 85-row steps 1.78x the whole
# product, 256 rows 1.12x, 512 rows 1.01x; in bf16 oneDNN ran 2-2.8x at 512-768 rows of that layer,
# about 1.2x at 1024 and more). A rebuilt layer holds at most two such steps (W' and LoHa's block):
# 8 MiB on the bench model, below its largest weight (4608 x 512 fp32: 9 MiB), and a fraction of
# a real-width layer's weight (1024 rows of a 12288-input bf16 layer: 24 MiB of its 72 MiB).
# Measured on CPU (2 threads, bench model, LoHa r16): 3, 4 and 5 MiB steps within noise of each
# other, 5% less of the base forward than 16 MiB windows over unevenly cut 4 MiB blocks.
WINDOW_BYTES = 4 << 20
WINDOW_MIN_ROWS = 1024


def window_rows(rows: int, row_bytes: int) -> int:
    """Rows per step for a transient of `rows` rows of `row_bytes` each (see WINDOW_BYTES)."""
    steps = max(1, -(-rows * row_bytes // WINDOW_BYTES))
    return max(1, min(rows, max(-(-rows // steps), WINDOW_MIN_ROWS)))


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
