"""Paired timing (wall clock and CPU time) and memory accounting in bytes of torch tensors."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch


@dataclass
class Times:
    """Per-call wall-clock and process CPU seconds of one side of a paired measurement."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # all threads of this process: moves less than wall time under load


def paired_times(a: Callable[[int], object], b: Callable[[int], object], repeats: int,
                 warmup: int = 1) -> tuple[Times, Times]:
    """Times of a(i) and b(i), called alternately (a, b, a, b...) after `warmup` untimed rounds,
    so load from other processes falls on both sides alike."""
    for i in range(warmup):
        a(i)
        b(i)
    ta, tb = Times(), Times()
    for i in range(warmup, warmup + repeats):
        for fn, out in ((a, ta), (b, tb)):
            wall, cpu = time.perf_counter(), time.process_time()
            fn(i)
            out.wall.append(time.perf_counter() - wall)
            out.cpu.append(time.process_time() - cpu)
    return ta, tb


def _tensors(obj, seen: set[int], depth: int = 0) -> Iterable[torch.Tensor]:
    """Every tensor reachable from obj through containers and plain objects' attributes."""
    if depth > 12 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.state_dict(keep_vars=True).values()
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            yield from _tensors(value, seen, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
        yield from _tensors(vars(obj), seen, depth + 1)
    elif hasattr(obj, "__slots__"):
        for slot in obj.__slots__:
            yield from _tensors(getattr(obj, slot, None), seen, depth + 1)


def storages(*roots) -> dict[int, int]:
    """data_ptr -> bytes of every distinct storage reachable from roots."""
    out: dict[int, int] = {}
    seen: set[int] = set()
    for root in roots:
        for tensor in _tensors(root, seen):
            if tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def patcher_storages(patcher) -> dict[int, int]:
    """Tensors a ModelPatcher keeps alive: the model's weights, ComfyUI's weight backups and patches,
    and the model options (where this pack's adapters live)."""
    return storages(patcher.model.diffusion_model, patcher.backup, patcher.patches,
                    getattr(patcher, "object_patches_backup", {}), patcher.model_options)


def added_bytes(after: dict[int, int], before: dict[int, int]) -> int:
    return sum(n for ptr, n in after.items() if ptr not in before)


def weight_fingerprint(module: torch.nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """name -> (data_ptr, copy of the values) of every parameter and buffer."""
    return {name: (t.data_ptr(), t.detach().clone()) for name, t in module.state_dict(keep_vars=True).items()}


def bytes_written(module: torch.nn.Module, fingerprint: dict) -> int:
    """Bytes of weights that moved or changed since `fingerprint`."""
    total = 0
    for name, t in module.state_dict(keep_vars=True).items():
        ptr, values = fingerprint[name]
        if t.data_ptr() != ptr or not torch.equal(t.detach(), values):
            total += t.numel() * t.element_size()
    return total


@contextlib.contextmanager
def _quiet_fd2():
    """Silence C++ writes to stderr (the profiler's start/stop lines) for a moment."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclass
class AllocationTrace:
    """Every allocation and free of CPU tensor memory made while a call ran, in time order.

    From torch.profiler's raw allocator records (`profile_memory=True`): the CPU allocator reports
    each allocation and each free of a block it handed out while profiling was on, including
    temporaries that live and die inside one op (kernel workspaces, the intermediates of
    composite ops). Blocks allocated before the call are not in it.
    """

    events: list[tuple[int, int, int]]  # (time ns, block address, +bytes allocated / -bytes freed)

    @property
    def net(self) -> int:
        """Bytes allocated during the call and still alive at its end."""
        return sum(delta for _, _, delta in self.events)

    def peak(self, exclude: Iterable[int] = ()) -> int:
        """Highest bytes alive at any moment among the call's allocations.

        `exclude`: addresses of blocks alive at the call's end or when they were noted (e.g. the
        gradients just before the optimizer drops them): the last allocation at each such address,
        and its free, are left out of the count.
        """
        addresses = set(exclude)
        last = {address: i for i, (_, address, delta) in enumerate(self.events) if delta > 0 and address in addresses}
        skipped, pending = set(last.values()), set()
        current = peak = 0
        for i, (_, address, delta) in enumerate(self.events):
            if i in skipped:
                pending.add(address)
            elif delta < 0 and address in pending:
                pending.discard(address)
            else:
                current += delta
                peak = max(peak, current)
        return peak


def trace_allocations(fn: Callable[[], object]) -> AllocationTrace:
    """The CPU allocations and frees of fn() (see `AllocationTrace`)."""
    from torch._C._profiler import _EventType

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():
        profiler.__enter__()
    try:
        fn()
    finally:
        with _quiet_fd2():
            profiler.__exit__(None, None, None)
    events, stack = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            fields = event.extra_fields
            events.append((event.start_time_ns, fields.ptr, fields.alloc_size))
    events.sort(key=lambda e: e[0])
    return AllocationTrace(events)


def peak_tensor_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[int, int]:
    """(peak, net) bytes of torch tensors allocated while fn() runs, above what was alive before.

    CPU: from every allocation and free the allocator made during the call (`trace_allocations`),
    temporaries inside single ops included. CUDA: `torch.cuda.max_memory_allocated` over the call.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, torch.cuda.memory_allocated(device) - before
    trace = trace_allocations(fn)
    return trace.peak(), trace.net
