"""Data parallel training across torchrun processes, over the adapter parameters only.

The base model is frozen, so DistributedDataParallel's job reduces to its gradient semantics:
after every backward the adapter gradients are summed across ranks (one flat all-reduce per
bucket, before the non-finite check, clipping and the optimizer step), which is what DDP does
for the parameters that train. Every rank then takes the identical optimizer step.

Equivalence with one process at the same global batch and seed:
- every rank draws the *global* batch (data order, caption dropout) from the shared data
  generator, and the noise levels and noise for the whole global batch, then keeps its slice
  (`World.shard`: contiguous, sizes differ by at most one); so the generator advances exactly as
  in one process and a checkpoint's RNG state is global;
- each rank's loss is weighted by its share of the global batch and the gradients are summed,
  which gives the gradient of the global batch's mean loss, whatever the slice sizes;
- the loss is agreed (summed) across ranks before any backward, so a non-finite loss anywhere
  skips or stops the step on every rank together, and collectives never go out of step.

Rank 0 writes checkpoints and the final adapter (the loop: `World.is_main`, then a barrier); all
ranks resume from the same checkpoint, and rank 0's adapter is broadcast at the start, as DDP
broadcasts parameters. `World()` is the single process: no collectives, `step.train_step`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .objectives import Objective
from .step import Batch, Predict, StepResult, finish_step, skip_step, train_step

BACKEND_ENV = "LYCORIS_DIST_BACKEND"  # override the backend (default: nccl with CUDA, gloo without)
_BUCKET = 1 << 24  # gradient elements per all-reduce


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run; `World()` is a plain single-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""  # "" when no process group is used

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where collective buffers live: the rank's GPU for NCCL, the CPU otherwise."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def shard(self, total: int) -> slice:
        """This rank's contiguous slice of `total` items (slice sizes differ by at most one)."""
        return slice(total * self.rank // self.size, total * (self.rank + 1) // self.size)

    # -- collectives (no-ops for a single process) ------------------------------------------

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks of a few numbers (float64)."""
        if self.size == 1:
            return [float(v) for v in values]
        buffer = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(buffer)
        return buffer.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (e.g. a cancel request that reached one rank)."""
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def agree(self, value: int, what: str) -> None:
        """Raise on every rank unless all ranks hold the same integer `value`."""
        if self.size == 1:
            return
        high, low = self.max([value, -value])
        if high != -low:
            raise RuntimeError(f"{what}: ranks disagree ({int(-low)} vs {int(high)}); the job folder must be on a "
                               "filesystem every node sees")

    def max(self, values: Sequence[float]) -> list[float]:
        if self.size == 1:
            return [float(v) for v in values]
        buffer = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(buffer, op=dist.ReduceOp.MAX)
        return buffer.tolist()

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite `tensors` with rank 0's values."""
        if self.size == 1:
            return
        with torch.no_grad():
            for tensor in tensors:
                buffer = tensor.detach().to(self.comm_device, copy=True).contiguous()
                dist.broadcast(buffer, src=0)
                tensor.copy_(buffer)

    def broadcast_text(self, text: str) -> str:
        """Rank 0's `text` on every rank (also a barrier)."""
        if self.size == 1:
            return text
        data = torch.tensor(list(text.encode()) if self.is_main else [], dtype=torch.uint8)
        length = torch.tensor([data.numel()], dtype=torch.int64, device=self.comm_device)
        dist.broadcast(length, src=0)
        buffer = data.to(self.comm_device) if self.is_main else torch.empty(int(length), dtype=torch.uint8,
                                                                            device=self.comm_device)
        dist.broadcast(buffer, src=0)
        return bytes(buffer.cpu().tolist()).decode()

    def sync_start(self, step: int, params: Sequence[torch.Tensor]) -> None:
        """Every rank starts at the same step with rank 0's adapter (as DDP broadcasts its parameters)."""
        self.agree(step, "resume step")
        self.broadcast_(params)

    # -- the step -------------------------------------------------------------------------------

    def train_step(self, predict: Predict, objective: Objective, batches: Sequence[Batch],
                   params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, generator: torch.Generator,
                   max_grad_norm: float | None = None) -> StepResult:
        """`step.train_step` over this rank's slice of each global micro-batch, gradients summed over ranks."""
        if self.size == 1:
            return train_step(predict, objective, batches, params, optimizer, generator, max_grad_norm)
        if not batches:
            raise ValueError("batches: a step needs at least one micro-batch")
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i, batch in enumerate(batches):
            loss, share = self._local_loss(predict, objective, batch, generator)
            value = self.sum([float(loss.detach()) * share if loss is not None else 0.0])[0]
            if not math.isfinite(value):
                return skip_step(optimizer, value, f"non-finite loss {value} in micro-batch {i + 1}/{len(batches)}; "
                                               "optimizer step skipped")
            if loss is not None:
                (loss * (share / len(batches))).backward()
            total += value / len(batches)
        self.sum_gradients(params)
        return finish_step(optimizer, params, total, max_grad_norm)

    def _local_loss(self, predict: Predict, objective: Objective, batch: Batch,
                    generator: torch.Generator) -> tuple[torch.Tensor | None, float]:
        """Loss on this rank's slice and the slice's share of the batch; noise drawn as `step.batch_loss` does."""
        x0 = batch.latents
        total = x0.shape[0]
        levels = objective.sample(total, generator, objective.image_tokens(tuple(x0.shape)))
        noise = torch.randn(tuple(x0.shape), generator=generator, dtype=torch.float32).to(x0)
        part = self.shard(total)
        if part.start == part.stop:
            return None, 0.0
        inputs = objective.make_inputs(x0, noise, levels)
        cond = shard_conditioning(batch.cond, part, total)
        weights = inputs.weights[part] if inputs.weights is not None else None
        pred = predict(inputs.model_input[part], inputs.sigma[part], cond, inputs.timesteps[part])
        loss = objective.loss(pred, inputs.target[part].to(pred.device), weights)
        return loss, (part.stop - part.start) / total

    def sum_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Sum `.grad` over ranks (float32 buffers); a parameter without a gradient on every rank keeps none."""
        present = self.sum([1.0 if p.grad is not None else 0.0 for p in params])
        live = [p for p, n in zip(params, present) if n > 0]
        for bucket in _buckets(live):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flat = torch.cat([g.detach().reshape(-1).to(self.comm_device, torch.float32) for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for p, g in zip(bucket, grads):
                value = flat[offset:offset + g.numel()].view(g.shape).to(device=g.device, dtype=g.dtype)
                p.grad = value
                offset += g.numel()


def shard_conditioning(cond: Mapping, part: slice, total: int) -> dict:
    """This rank's samples of a stacked conditioning dict (tensors with the batch as dim 0)."""
    if not isinstance(cond, Mapping):
        raise TypeError(f"conditioning: data parallel training needs a dict of model inputs, got {type(cond).__name__}")
    return {k: v[part] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == total else v
            for k, v in cond.items()}


def _buckets(params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        if bucket and size + p.numel() > _BUCKET:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket



def init_from_env() -> World:
    """The World torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK; MASTER_ADDR/PORT for the rendezvous).

    Without torchrun, or with one process, no process group is made. With CUDA each rank uses the
    GPU of its local rank (ComfyUI then loads models on it) and NCCL; without, gloo on the CPU.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
    dist.init_process_group(backend)
    return World(rank, size, local, backend)


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
