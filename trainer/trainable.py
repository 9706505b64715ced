"""Trainable adapters that ARE the runtime's objects: training and applying share one code path.

For every target of a plan the initial tensors come from LyCORIS itself (its module class built
around a stand-in layer that carries the real base weight rows, so T-LoRA's SVD init sees the
real weight and LoKr/LoRA start at ΔW = 0), taken the way LyCORIS saves them, and parsed by
`core.adapters.parse_module`, the same math object that Apply uses at inference. Its tensors are
then replaced by leaf tensors with `requires_grad`, so the runtime's hooks produce a
differentiable adapted output (delta path or rebuilt weight, see `core.runtime`) and the
optimizer updates exactly what gets saved.

The runtime uses these modules directly: it never moves or casts an adapter's own tensors (it
reads placed copies), and tensors that require grad are cast per call and never cached, so the
optimizer's leaves stay the saved tensors and no tensor of an earlier step's graph is reused.

As in LyCORIS: `use_scalar` trains a `scalar` (0 at first) beside unscaled factors and the file
gets the factor times the scalar (`custom_state_dict`); dropouts apply in training calls only
(`core.dropout`); SimpleTuner's `init_lokr_norm` runs on LyCORIS's module (`trainer.lokr_init`).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from ..core.adapter_set import LoadedAdapter, architecture_key
from ..core.adapters import LayerSpec, ModuleAdapter, parse_module
from ..core.config import LycorisConfig
from ..core.dropout import DropoutError, DropoutSettings, ModuleDraw
from ..core.families.base import take_rows
from ..core.lycoris_modules import build_adapter
from ..core.runtime import Application, ModuleBinding, TLoraSchedule
from ..core.targets import Plan, PlannedTarget, skeleton_for
from .lokr_init import LokrInitError, check_lokr_norm, init_lokr_norm

# Saved tensors that are settings or frozen references, never optimised.
FROZEN_KEYS = frozenset({"alpha", "on_input", "base_q", "base_p", "base_lambda"})
# Saved tensors that fix the module's math at parse time: a checkpoint must agree on them.
_FIXED_KEYS = frozenset({"alpha", "on_input"})
_TLORA_BASE = ("base_q", "base_p", "base_lambda")
_DROPOUTS = ("dropout", "rank_dropout", "module_dropout")

BaseWeight = Callable[[PlannedTarget], torch.Tensor]


class TrainerError(ValueError):
    """A plan, state dict or setting the trainer cannot use; the message names the module or key."""


def comfy_base_weights(diffusion_model: torch.nn.Module) -> BaseWeight:
    """Base weight of a target from a ComfyUI diffusion model: the route's rows of its module's weight."""

    def weight(target: PlannedTarget) -> torch.Tensor:
        return take_rows(target.route, diffusion_model.get_submodule(target.route.comfy_module).weight.detach())

    return weight


def _stand_in(layer: torch.nn.Module, weight: torch.Tensor) -> torch.nn.Module:
    """A plain torch layer with the diffusers layer's geometry carrying `weight` (a private copy).

    Built with `skip_init`: no random init to waste time on, and the global RNG is not touched.
    """
    shape = tuple(weight.shape)
    if isinstance(layer, torch.nn.Linear):
        module = torch.nn.utils.skip_init(torch.nn.Linear, shape[1], shape[0], bias=False, device=weight.device)
    else:
        conv = {3: torch.nn.Conv1d, 4: torch.nn.Conv2d, 5: torch.nn.Conv3d}[len(shape)]
        module = torch.nn.utils.skip_init(conv, shape[1] * layer.groups, shape[0], shape[2:], layer.stride,
                                          layer.padding, layer.dilation, layer.groups, bias=False, device=weight.device)
    module.weight.data = weight
    return module


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """LyCORIS draws its init from the global RNG; fork it so a job's init is reproducible and private."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def lycoris_initial_params(target: PlannedTarget, layer: torch.nn.Module, base: torch.Tensor, seed: int,
                           init_device: torch.device, lokr_norm: float = 0.0) -> dict[str, torch.Tensor]:
    """The tensors LyCORIS initialises for `target` and saves (T-LoRA: plus its frozen SVD base).

    `lokr_norm` > 0: then SimpleTuner's `init_lokr_norm` on the module, from the same seeded stream.
    With use_scalar the factors are LyCORIS's parameters as they are (unscaled) plus `scalar`.
    """
    weight = base.detach().to(device=init_device, dtype=torch.float32, copy=True)
    if tuple(weight.shape) != tuple(target.weight_shape):
        raise TrainerError(f"{target.lora_name}: base weight shape {tuple(weight.shape)} is not the planned "
                           f"{tuple(target.weight_shape)}")
    stand_in = _stand_in(layer, weight)
    with _seeded(seed ^ zlib.crc32(target.lora_name.encode()), init_device):
        module = build_adapter(target, stand_in)
        if lokr_norm:
            try:
                check_lokr_norm(target.algo, target.lora_name, module)
            except LokrInitError as err:
                raise TrainerError(str(err)) from None
            init_lokr_norm(module, lokr_norm)
    module.apply_to()  # LyCORIS saves applied modules (FullModule's diff is only right after apply_to)
    params = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if isinstance(getattr(module, "scalar", None), torch.nn.Parameter):  # use_scalar: train as LyCORIS does
        own = dict(module.named_parameters())
        params = {k: (own[k] if k in own else v).detach().clone() for k, v in params.items()}
        params["scalar"] = module.scalar.detach().clone()
    if target.algo == "tlora":  # LyCORIS saves no base; storing it makes a reload exact and SVD-free
        params.update({k: getattr(module, k).detach().clone() for k in _TLORA_BASE})
    return params


def _check_target_dropouts(target: PlannedTarget) -> None:
    own = [k for k in _DROPOUTS if k in target.module_kwargs]
    if own:
        raise TrainerError(f"apply_preset ({target.owner_class}).{own[0]}: LyCORIS takes dropouts at the top level "
                           "of the config only (its module constructor fails on a per-target value)")


def _make_trainable(adapter: ModuleAdapter, device: torch.device, dtype: torch.dtype) -> None:
    """Replace the module's tensors by leaves on the training device: trainable ones require grad."""
    for key, tensor in list(adapter.params.items()):
        if key in _FIXED_KEYS or not tensor.is_floating_point():
            adapter.params[key] = tensor.detach().to(device=device, copy=True)
            continue
        leaf = tensor.detach().to(device=device, dtype=dtype, copy=True)
        adapter.params[key] = leaf.requires_grad_(key not in FROZEN_KEYS)
    adapter.to()


class TrainableAdapter:
    """Adapter modules for every target of a plan, trainable, bound to their ComfyUI routes."""

    def __init__(self, plan: Plan, modules: Mapping[str, ModuleAdapter], config: LycorisConfig,
                 architecture: str | None = None, warnings: list[str] | None = None):
        """`architecture`: copied onto snapshots (`LoadedAdapter.architecture`, what `api.apply` checks a model
        against); None skips that check. The caller that holds the model sets it (core owns the format)."""
        self.plan = plan
        self.config = config
        self.family = plan.family
        self.architecture = architecture
        self.warnings = list(warnings or [])
        self.modules = dict(modules)  # diffusers path -> ModuleAdapter (holding the leaves)
        self.bindings = {t.path: ModuleBinding(t.path, self.modules[t.path], t.route)
                         for t in plan.targets}
        self.tlora = (TLoraSchedule(config.tlora_min_rank, config.tlora_alpha, config.linear_dim)
                      if any(t.algo == "tlora" for t in plan.targets) else None)
        self.dropouts = self._dropout_settings()

    def _dropout_settings(self) -> dict[str, DropoutSettings]:
        """Per target path, the dropouts its LyCORIS module trains with (create_lycoris passes the config's
        top-level values to every module; rank_dropout_scale and bypass_mode come per target)."""
        out = {}
        for target in self.plan.targets:
            _check_target_dropouts(target)
            kwargs = target.module_kwargs
            try:
                settings = DropoutSettings(target.algo, *(float(self.config.keywords.get(k) or 0.0) for k in _DROPOUTS),
                                           rank_dropout_scale=bool(kwargs.get("rank_dropout_scale", False)),
                                           bypass=bool(kwargs.get("bypass_mode", False)))
            except DropoutError as err:
                raise TrainerError(f"{err} ({target.lora_name})") from None
            self.warnings += [n for n in settings.unapplied() if n not in self.warnings]
            if settings.active:
                out[target.path] = settings
        return out

    def draw_dropouts(self, generator: torch.Generator) -> dict[str, ModuleDraw]:
        """This model call's dropout draws, per target path in plan order, each module seeded from `generator`.

        Nothing is drawn without dropouts, so such a run's random stream is what it was without this feature."""
        draws = {}
        for target in self.plan.targets:
            settings = self.dropouts.get(target.path)
            if settings is None:
                continue
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            adapter = self.modules[target.path]
            draws[target.path] = ModuleDraw.draw(settings, seed, adapter.layer.out_features,
                                                 getattr(adapter, "dim", None))
        return draws

    @classmethod
    def from_plan(cls, plan: Plan, unet_config: dict, base_weight: BaseWeight, config: LycorisConfig, *,
                  seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  init_device: str | torch.device = "cpu", init_lokr_norm: float = 0.0) -> TrainableAdapter:
        """LyCORIS-initialised trainable modules for `plan` (`base_weight(target)`: the diffusers-layer weight).

        `init_device` is where LyCORIS's init runs (T-LoRA's SVD is slow on a CPU for big layers);
        `dtype`/`device` are the trainable (master) tensors'. Only algorithms whose effect is linear
        in the strength train here (the runtime's bypass path); others are an error naming the module.
        `init_lokr_norm` > 0: SimpleTuner's perturbed-normal LoKr init at that scale (0: LyCORIS's own).
        """
        skeleton = skeleton_for(unet_config)
        init_device, device = torch.device(init_device), torch.device(device)
        modules, warnings = {}, []
        for target in plan.targets:
            layer = skeleton.get_submodule(target.path)
            _check_target_dropouts(target)
            params = lycoris_initial_params(target, layer, base_weight(target), seed, init_device, init_lokr_norm)
            scalar = params.pop("scalar", None)
            adapter = parse_module(target.lora_name, params, LayerSpec.from_module(layer))
            if not adapter.linear_in_strength:
                raise TrainerError(f"{target.lora_name}: training {target.algo} with these settings (DoRA, "
                                   "rescaled or multi-block OFT) is not supported; it is not linear in the strength")
            if scalar is not None:
                if not adapter.SCALED_KEYS:
                    raise TrainerError(f"{target.lora_name}: use_scalar with {target.algo} is not supported here")
                adapter.params["scalar"] = scalar
            _make_trainable(adapter, device, dtype)
            warnings += adapter.warnings
            modules[target.path] = adapter
        return cls(plan, modules, config, architecture_key(unet_config), list(dict.fromkeys(warnings)))

    # -- training ---------------------------------------------------------------------------

    def named_parameters(self) -> dict[str, torch.Tensor]:
        """`lora_name.param` -> trainable leaf, in plan order (stable, so optimizer state maps on resume)."""
        return {f"{adapter.lora_name}.{key}": tensor for adapter in self.modules.values()
                for key, tensor in adapter.params.items() if tensor.requires_grad}

    def parameters(self) -> list[torch.Tensor]:
        return list(self.named_parameters().values())

    def application(self, strength: float | Sequence[float] = 1.0) -> Application:
        """A fresh runtime Application (one per model call: no weight cache outlives a graph).

        `strength`: one number, or one per sample (sample i uses strength[i % len]), as in A/B."""
        by_module: dict[str, list[ModuleBinding]] = {}
        for binding in self.bindings.values():
            by_module.setdefault(binding.route.comfy_module, []).append(binding)
        strengths = tuple(float(s) for s in strength) if isinstance(strength, Sequence) else (float(strength),)
        return Application("training", by_module, strengths, self.tlora)

    def comfy_modules(self) -> list[str]:
        """ComfyUI module paths that need the runtime hook (`core.runtime.install_hooks`)."""
        return list(dict.fromkeys(b.route.comfy_module for b in self.bindings.values()))

    # -- saving, resuming, applying -------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """LyCORIS file tensors (`lycoris_<path>.<param>`, alpha and T-LoRA base included), detached CPU copies.

        With use_scalar, as LyCORIS's `custom_state_dict` saves them: the scaled factor times the scalar,
        and no scalar."""
        return self.file_tensors(self.training_state())

    def file_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`training_state`-form tensors (e.g. an EMA of them) as the file holds them: each use_scalar
        factor times its module's scalar (LyCORIS's `custom_state_dict`), the scalars left out."""
        out = dict(tensors)
        for adapter in self.modules.values():
            scalar = out.pop(f"{adapter.lora_name}.scalar", None)
            if scalar is None:
                continue
            for key in adapter.SCALED_KEYS:
                name = f"{adapter.lora_name}.{key}"
                if name in out:
                    out[name] = (out[name] * scalar.to(out[name])).contiguous()
        return out

    def training_state(self) -> dict[str, torch.Tensor]:
        """Every trained tensor as it is (use_scalar: unscaled factors and `scalar`), for checkpoints."""
        return {f"{adapter.lora_name}.{key}": tensor.detach().to("cpu", copy=True).contiguous()
                for adapter in self.modules.values() for key, tensor in adapter.params.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy saved tensors (`training_state` or `state_dict` form) into the existing leaves (the optimizer
        keeps its references). A file without `scalar` sets it to 1, as LyCORIS's `load_weight_hook` does."""
        own = {f"{a.lora_name}.{k}": (a, k) for a in self.modules.values() for k in a.params}
        state = dict(state)
        for a in self.modules.values():
            if "scalar" in a.params:
                state.setdefault(f"{a.lora_name}.scalar", torch.ones_like(a.params["scalar"], device="cpu"))
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise TrainerError(f"adapter state does not fit this plan: missing {missing[:3]}"
                               f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                               f"{' ...' if len(unexpected) > 3 else ''}")
        for name, (adapter, key) in own.items():
            current, value = adapter.params[key], state[name]
            if tuple(value.shape) != tuple(current.shape):
                raise TrainerError(f"{name}: expected shape {tuple(current.shape)}, got {tuple(value.shape)}")
            if key in _FIXED_KEYS and not torch.equal(value.to(current), current):
                raise TrainerError(f"{name}: saved {value.tolist()} differs from this config's {current.tolist()}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise TrainerError(f"{name}: contains NaN or infinite values")
            with torch.no_grad():
                current.copy_(value)
        for adapter in self.modules.values():
            adapter.to()

    def to_loaded(self, name: str, config: LycorisConfig | None = None) -> LoadedAdapter:
        """A detached snapshot as a LYCORIS_ADAPTER value (Apply / Merge / save), unaffected by later steps."""
        config = config or self.config
        state = self.state_dict()
        bindings = {}
        for target in self.plan.targets:
            adapter = self.modules[target.path]
            prefix = f"{target.lora_name}."
            params = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            bindings[target.path] = ModuleBinding(target.path, parse_module(target.lora_name, params, adapter.layer),
                                                  target.route)
        report = f"trained here: {len(bindings)} modules"
        return LoadedAdapter(name, self.family, bindings, config, self.tlora, report, list(self.warnings),
                             {"lycoris_config": config.to_json()}, self.architecture)
