"""Scratch memory shared by the adapted layers of one model call.

A rebuilt layer needs a transient window of W' (and LoHa a block of ΔW rows). Allocating them
anew in every layer of every call costs the allocator and, for blocks this large, fresh pages
that the kernel faults in and zeroes each time: on the bench model (CPU, 2 threads, LoHa r16) up
to 0.07 of the base forward in interleaved runs (1.40x -> 1.33x), within noise at real width.
Inside `scope()` (one model call, see
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

# A rebuilt layer builds its W' in windows of rows, each just before its product, and LoHa's
# writer its ΔW in blocks as large as a window (`ModuleAdapter.rebuild_blocks`). Window and blocks
# together stay within WINDOW_BYTES: as few equal windows as fit, but never narrower than
# WINDOW_MIN_ROWS rows, since narrower products lose the matmul's speed (3072 x 12288 fp32, 1024
# tokens: 85-row windows 1.78x the whole product, 256 rows 1.12x, 512 rows 1.01x; in bf16 oneDNN ran
# 2-2.8x at 512-768 rows of that layer, about 1.2x at 1024 and more). On the bench model (largest
# weight 4608 x 512 fp32: 9 MiB) a LoKr layer then runs in one or two windows (4 MiB windows, three:
# 1.31x of the base forward against 1.21x with 8 or 16 MiB) and LoHa in 4 MiB windows plus their
# blocks, below that weight; a real-width layer holds a fraction of its own weight (1024 rows of a
# 12288-input bf16 layer: 24 MiB of its 72 MiB).
WINDOW_BYTES = 8 << 20
WINDOW_MIN_ROWS = 1024


def window_rows(rows: int, row_bytes: int, copies: int = 1) -> int:
    """Rows per window of a transient of `rows` rows of `row_bytes`, `copies` of it held at once."""
    steps = max(1, -(-rows * row_bytes * copies // WINDOW_BYTES))
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
