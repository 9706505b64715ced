"""An adapter file resolved against a model family: the value of a `LYCORIS_ADAPTER` socket."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .adapter_file import AdapterFile, TLoraSettings, match_modules, read_adapter
from .adapters import LayerSpec, parse_module
from .config import LycorisConfig
from .families import profile_for
from .runtime import Application, ModuleBinding, TLoraSchedule
from .targets import skeleton_for


class AdapterMismatchError(ValueError):
    """The adapter does not fit the model (unmatched keys with strict, or another family)."""


@dataclass(eq=False)
class LoadedAdapter:
    """Adapter modules bound to diffusers paths and ComfyUI routes; shared, never copied.

    Using it never changes it: the runtime reads per-(device, dtype) placed copies of the module
    tensors (`ModuleAdapter.placed`), so after sampling any model (bf16, fp8, another device) its
    tensors are still the file's, bit for bit, and Save / Merge see exactly those.
    """

    name: str
    family: str
    bindings: dict[str, ModuleBinding]  # diffusers path -> binding
    config: LycorisConfig | None = None
    tlora: TLoraSchedule | None = None
    report: str = ""
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    architecture: str | None = None  # architecture_key() of the model it was bound against
    tlora_settings: TLoraSettings | None = None  # T-LoRA: what the file (or the user) says, and where from

    def __deepcopy__(self, memo) -> LoadedAdapter:
        return self

    @property
    def algos(self) -> list[str]:
        return sorted({b.adapter.algo for b in self.bindings.values()})

    def by_comfy_module(self) -> dict[str, list[ModuleBinding]]:
        out: dict[str, list[ModuleBinding]] = {}
        for binding in self.bindings.values():
            out.setdefault(binding.route.comfy_module, []).append(binding)
        return out

    def application(self, strengths: tuple[float, ...], blocks: dict[str, float] | None = None,
                    schedule: object = None) -> Application:
        """Built whole (an Application is immutable once made): `blocks` resolved per ComfyUI module
        path (core.strength_shape.resolve_blocks), `schedule` a BoundSchedule."""
        return Application(self.name, self.by_comfy_module(), strengths, self.tlora, blocks=blocks, schedule=schedule)


def architecture_key(unet_config: dict) -> str:
    """What decides layer names and shapes (the diffusers config), not dtypes or device settings."""
    return json.dumps(profile_for(unet_config).diffusers_config(unet_config), sort_keys=True, default=str)


def bind(adapter_file: AdapterFile, unet_config: dict, strict: bool = False, tlora_min_rank: int | None = None,
         tlora_alpha: float | None = None) -> LoadedAdapter:
    """Resolve a read adapter file against a model's `unet_config`.

    `tlora_min_rank` / `tlora_alpha` (None: from the file) replace the file's T-LoRA schedule. When
    neither the file nor the caller gives it, SimpleTuner's defaults (1, 1.0) are used and a warning
    says the schedule is unknown."""
    profile = profile_for(unet_config)
    routes = profile.routes(unet_config)
    match = match_modules(adapter_file, routes)
    if match.unmatched and strict:
        raise AdapterMismatchError(f"{match.describe()} (strict is on)")
    skeleton = skeleton_for(unet_config)
    bindings, warnings = {}, list(adapter_file.warnings)
    for lora_name, path in match.matched.items():
        spec = LayerSpec.from_module(skeleton.get_submodule(path))
        adapter = parse_module(lora_name, adapter_file.modules[lora_name], spec)
        warnings += getattr(adapter, "warnings", [])
        bindings[path] = ModuleBinding(path, adapter, routes[path])
    if not bindings:
        raise AdapterMismatchError(f"{match.describe()}: nothing in this file fits a {profile.display_name} model")
    config = adapter_file.config
    tlora = settings = None
    if any(b.adapter.algo == "tlora" for b in bindings.values()):
        settings = adapter_file.tlora_settings.given(tlora_min_rank, tlora_alpha)
        if not settings.known:
            warnings.append(tlora_unknown_message(settings))
        ranks = sorted({b.adapter.rank for b in bindings.values() if b.adapter.algo == "tlora"})
        if settings.linear_dim is None and len(ranks) > 1:
            warnings.append(f"T-LoRA mask width unknown (the file does not say its linear_dim): modules of rank "
                            f"{', '.join(map(str, ranks))} each follow their own rank; SimpleTuner cuts or pads one "
                            "mask of width linear_dim. Put its lycoris_config.json beside the file")
        tlora = TLoraSchedule(1 if settings.min_rank is None else settings.min_rank,
                              1.0 if settings.alpha is None else settings.alpha, settings.linear_dim)
    name = Path(adapter_file.path).stem if adapter_file.path else "adapter"
    return LoadedAdapter(name, profile.name, bindings, config, tlora, match.describe(),
                         list(dict.fromkeys(warnings)), dict(adapter_file.metadata), architecture_key(unet_config),
                         settings)


def tlora_unknown_message(settings: TLoraSettings) -> str:
    missing = [k for k, v in (("tlora_min_rank", settings.min_rank), ("tlora_alpha", settings.alpha)) if v is None]
    return (f"T-LoRA schedule unknown: the file does not say its {' / '.join(missing)} (SimpleTuner's final file "
            "leaves them out; its lycoris_config.json beside the file has them). Sampling with SimpleTuner's "
            "defaults (min rank 1, alpha 1); put that lycoris_config.json beside the file or give "
            "tlora_min_rank / tlora_alpha on Load LyCORIS")


def load(path: str | Path, unet_config: dict, strict: bool = False, tlora_min_rank: int | None = None,
         tlora_alpha: float | None = None) -> LoadedAdapter:
    return bind(read_adapter(path), unet_config, strict, tlora_min_rank, tlora_alpha)
