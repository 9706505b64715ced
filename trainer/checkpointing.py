"""Exact gradient checkpointing of a ComfyUI diffusion model's blocks, and the uncheckpointed mode.

ComfyUI's Flux blocks update tensors in place (`img += ...`), the block's own inputs included.
`torch.utils.checkpoint` (what ComfyUI core's trainer wraps every block in) recomputes a block
from the very tensors it was called with, which the block itself (and its successors) have
updated by then: the recomputation sees other values and the gradients come out silently wrong
(FACTS.md §6: relative error 0.63 on a tiny Flux 2).

Here each block (an element of the model's top-level block lists, and SDXL's middle block; for
SDXL the layers of those blocks, see `checkpoint_units`) runs as one `_Checkpointed` autograd
function:

- forward: the tensor inputs are copied once into *private* tensors that only the checkpoint
  holds (nothing the block or anything after it does in place can reach them); the block runs
  without autograd on a second, throw-away copy, so no activation of it is kept.
- backward: the block is recomputed from fresh copies of the private inputs with autograd on,
  inside the context the forward ran in (the adapter runtime keeps its per-call state, strengths
  and T-LoRA masks, in a `contextvars` context; backward may run on another thread), and
  back-propagated. Adapter parameters inside the block receive their gradients there; the
  inputs' gradients flow on to the previous block.

Inputs shared by every block (Flux's rotary `pe`, the modulation vector) are copied once per
step, not per block: a copy is reused while the original tensor is alive and unchanged (same
object, same version counter). A block whose inputs need no gradient (the first one) still
reaches backward through an anchor input, so its adapter parameters get gradients.

Peak memory is then one private copy of each block's inputs plus one block's activations during
its recomputation: what core's checkpointing costs, with exact gradients (tests compare against
the uncheckpointed gradient and finite differences in float64).

Without checkpointing (`checkpointing=False`) every tensor autograd saves is copied when it is
saved (`snapshot_saved_tensors`), so in-place updates cannot reach backward either: faster (no
recomputation), at the memory cost of keeping every activation.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..core import host

_ORIGINAL = "_lycoris_trainer_forward"
_BLOCK_LISTS = ("double_blocks", "single_blocks", "transformer_blocks", "input_blocks", "output_blocks")
_SINGLE_BLOCKS = ("middle_block",)


def checkpoint_units(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of a ComfyUI diffusion model that are recomputed in backward.

    Every element of its top-level block lists (Flux: double/single blocks; SDXL: input/output
    blocks) and SDXL's middle block. An SDXL block is a `TimestepEmbedSequential`, whose layers
    ComfyUI's UNet calls one by one (`forward_timestep_embed`) without calling the block itself:
    there the layers are the units. Embedders and the final layer are cheap and stay as they are.
    """
    blocks: list[torch.nn.Module] = []
    for name, child in root.named_children():
        if name in _BLOCK_LISTS and isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            blocks += list(child.children())
        elif name in _SINGLE_BLOCKS:
            blocks.append(child)
    units: list[torch.nn.Module] = []
    for block in blocks:
        units += list(block.children()) if isinstance(block, torch.nn.Sequential) else [block]
    return units


# -- flattening a block's arguments into tensors and a structure ---------------------------------

_SKIP_KEYS = ("transformer_options",)  # passed through, never searched for tensors


def _flatten(value: Any, tensors: list[torch.Tensor]) -> Any:
    """`value` with every tensor replaced by its index in `tensors` (tuples, lists, dicts, dataclasses)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _Slot(len(tensors) - 1)
    if isinstance(value, (tuple, list)):
        items = [_flatten(v, tensors) for v in value]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, dict):
        # transformer_options: passed as it was at call time (top-level forwards update e.g. block_index)
        return {k: (dict(v) if k in _SKIP_KEYS and isinstance(v, dict) else v if k in _SKIP_KEYS
                    else _flatten(v, tensors)) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _Data(type(value), {f.name: _flatten(getattr(value, f.name), tensors)
                                   for f in dataclasses.fields(value)})
    return value


def _unflatten(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, _Slot):
        return tensors[value.index]
    if isinstance(value, (tuple, list)):
        items = [_unflatten(v, tensors) for v in value]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, dict):
        return {k: (v if k in _SKIP_KEYS else _unflatten(v, tensors)) for k, v in value.items()}
    if isinstance(value, _Data):
        return value.cls(**{k: _unflatten(v, tensors) for k, v in value.fields.items()})
    return value


@dataclasses.dataclass(frozen=True)
class _Slot:
    index: int


@dataclasses.dataclass(frozen=True)
class _Data:
    cls: type
    fields: dict


# -- the autograd function ----------------------------------------------------------------------


class _Snapshots:
    """Private copies of block inputs for one forward pass, shared while the original is unchanged."""

    def __init__(self) -> None:
        self._copies: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}

    def copy_of(self, tensor: torch.Tensor) -> torch.Tensor:
        entry = self._copies.get(id(tensor))
        if entry is not None:
            ref, version, copy = entry
            if ref() is tensor and tensor._version == version:
                return copy
        copy = tensor.detach().clone()
        key, copies = id(tensor), self._copies

        def forget(ref: weakref.ref) -> None:  # the original is gone: graphs still holding the copy keep it
            if copies.get(key, (None,))[0] is ref:
                del copies[key]

        copies[key] = (weakref.ref(tensor, forget), tensor._version, copy)
        return copy

    def clear(self) -> None:
        self._copies.clear()


class _Checkpointed(torch.autograd.Function):
    """out = block(*inputs), storing only private copies of the inputs; the block reruns in backward."""

    @staticmethod
    def forward(ctx, call: _Call, anchor: torch.Tensor, *inputs: torch.Tensor):
        ctx.call = call
        ctx.private = [call.snapshots.copy_of(t) for t in inputs]
        ctx.needs_grad = [t.requires_grad for t in inputs]
        with torch.no_grad():
            out = call.run([t.clone() for t in inputs])
        flat: list[torch.Tensor] = []
        call.out_structure = _flatten(out, flat)
        return tuple(flat)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        leaves = [p.detach().requires_grad_(need) for p, need in zip(ctx.private, ctx.needs_grad)]
        # The block updates its inputs and intermediates in place: it runs on non-leaf copies of the
        # leaves, and what it saves for its own backward is copied when saved (one block at a time).
        # The model runs again here: in ComfyUI's autograd-capable ops (v0.33's fused RoPE has no backward).
        with torch.enable_grad(), snapshot_saved_tensors(), host.training_ops():
            out = ctx.call.run([leaf.clone() for leaf in leaves])
        flat: list[torch.Tensor] = []
        _flatten(out, flat)
        pairs = [(o, g) for o, g in zip(flat, grads) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads = tuple(leaf.grad if need else None for leaf, need in zip(leaves, ctx.needs_grad))
        ctx.private = ctx.call = None
        return (None, None, *input_grads)


@dataclasses.dataclass(eq=False)
class _Call:
    """One checkpointed block call: how to (re)run it on a list of input tensors."""

    original: Callable
    structure: Any  # the call's (args, kwargs) with tensors replaced by slots
    context: contextvars.Context
    snapshots: _Snapshots
    out_structure: Any = None

    def run(self, tensors: list[torch.Tensor]) -> Any:
        args, kwargs = _unflatten(self.structure, tensors)
        # A fresh copy of the caller's context per run: forward and recomputation may overlap.
        return self.context.copy().run(self.original, *args, **kwargs)


class Checkpointer:
    """Context manager: the blocks of `root` are checkpointed exactly while autograd is on.

    Calls without autograd (sampling, `torch.no_grad`) run the block as it is. On exit every
    wrapped forward is restored and the step's private input copies are dropped.
    """

    def __init__(self, root: torch.nn.Module):
        self.root = root
        self.snapshots = _Snapshots()
        self._anchor = torch.zeros((), requires_grad=True)
        self._wrapped: list[torch.nn.Module] = []

    def _wrap(self, module: torch.nn.Module) -> None:
        original = module.forward
        snapshots, anchor = self.snapshots, self._anchor

        def checkpointed(*args, **kwargs):
            if not torch.is_grad_enabled():
                return original(*args, **kwargs)
            tensors: list[torch.Tensor] = []
            call = _Call(original, _flatten((args, kwargs), tensors), contextvars.copy_context(), snapshots)
            flat = _Checkpointed.apply(call, anchor, *tensors)
            return _unflatten(call.out_structure, list(flat))

        setattr(module, _ORIGINAL, "forward" in module.__dict__ and original)  # False: the class's own forward
        module.forward = checkpointed
        self._wrapped.append(module)

    def __enter__(self) -> Checkpointer:
        for unit in checkpoint_units(self.root):
            if not hasattr(unit, _ORIGINAL):
                self._wrap(unit)
        return self

    def __exit__(self, *exc) -> None:
        for unit in self._wrapped:
            own = getattr(unit, _ORIGINAL)
            if own:
                unit.forward = own  # an instance-level forward someone else had set
            else:
                del unit.forward
            delattr(unit, _ORIGINAL)
        self._wrapped.clear()
        self.snapshots.clear()


def gradient_checkpointing(root: torch.nn.Module) -> Checkpointer:
    """`with gradient_checkpointing(diffusion_model):` blocks are recomputed exactly in backward."""
    return Checkpointer(root)


@contextlib.contextmanager
def snapshot_saved_tensors() -> Iterator[None]:
    """Autograd keeps a private copy of every tensor it saves for backward, taken when it is saved.

    The uncheckpointed mode: in-place updates after the save cannot reach backward, and nothing
    is recomputed; every activation is kept for the whole forward (plus the copies).
    """
    with torch.autograd.graph.saved_tensors_hooks(_private, lambda t: t):
        yield


def _private(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a tensor autograd saves; module parameters and views of them (a Linear saves its
    weight transposed), never updated in a forward, as they are."""
    if isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter):
        return tensor
    return tensor.clone()


def memory_mode(root: torch.nn.Module, checkpointing: bool) -> contextlib.AbstractContextManager:
    """The context a training step's forward and backward run in: exact either way."""
    return gradient_checkpointing(root) if checkpointing else snapshot_saved_tensors()
