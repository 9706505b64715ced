"""ModelSpec metadata for saved adapters, with the keys and values SimpleTuner 4.10.1 writes.

SimpleTuner's `helpers/training/save_hooks.py` (`_build_modelspec_metadata`, MODEL_SPEC_VERSION
"1.0.1") puts these into every LyCORIS checkpoint it saves, EMA copy included:
- `modelspec.sai_model_spec` "1.0.1", `global_step` (optimizer steps so far), `modelspec.implementation`
  "diffusers";
- `modelspec.architecture`: `<model_family>[-<model_flavour>]/lora`, lower case. The family names are
  SimpleTuner's (`ModelRegistry.register`): flux (Flux 1), flux2, sdxl. The flavour (dev, klein-4b,
  ...) is a SimpleTuner setting a ComfyUI model does not carry, so it is left out: what SimpleTuner
  writes when it is given a model path and no flavour;
- `modelspec.title`: its run name (here the output name's last part);
- `modelspec.description`: the model class's MODEL_DESCRIPTION;
- `trained_words`: the trigger words, ", "-joined (SimpleTuner joins each dataset's instance_prompt;
  ComfyUI trigger-word extensions read it).
`modelspec.resolution` (SimpleTuner's `resolution` setting) and `ss_tag_frequency` (counted from
caption text) are not written: a job holds encoded latents and conditioning, not those.
"""

from __future__ import annotations

MODEL_SPEC_VERSION = "1.0.1"
# this pack's family -> (SimpleTuner's model_family, its model class's MODEL_DESCRIPTION)
SIMPLETUNER_FAMILIES = {
    "flux1": ("flux", "High-quality image generation, 12B parameters"),
    "flux2": ("flux2", "FLUX.2 with Mistral-3 or Qwen3 text encoder"),
    "sdxl": ("sdxl", "SDXL 1.0 - high quality 1024px images"),
}


def split_trigger_words(text: str) -> list[str]:
    """Trigger words from a comma- or line-separated text: stripped, empty ones and repeats dropped."""
    words = [w.strip() for w in str(text).replace("\n", ",").split(",")]
    return list(dict.fromkeys(w for w in words if w))


def architecture(family: str) -> str:
    """SimpleTuner's `modelspec.architecture` for a LyCORIS adapter of this pack's `family`."""
    if family not in SIMPLETUNER_FAMILIES:
        raise ValueError(f"family: {family!r} has no SimpleTuner model family (known: {', '.join(SIMPLETUNER_FAMILIES)})")
    return f"{SIMPLETUNER_FAMILIES[family][0]}/lora"


def modelspec_metadata(family: str, title: str, step: int, trigger_words: str = "") -> dict[str, str]:
    """The ModelSpec keys SimpleTuner writes into a LyCORIS file, for an adapter trained `step` steps."""
    meta = {
        "modelspec.sai_model_spec": MODEL_SPEC_VERSION,
        "global_step": str(int(step)),
        "modelspec.architecture": architecture(family),
        "modelspec.implementation": "diffusers",
    }
    if title.strip():
        meta["modelspec.title"] = title.strip()
    meta["modelspec.description"] = SIMPLETUNER_FAMILIES[family][1]
    words = split_trigger_words(trigger_words)
    if words:
        meta["trained_words"] = ", ".join(words)
    return meta


def title_for(output_name: str) -> str:
    """The title of a job's files: the last part of its output name (`lycoris/my_style` -> `my_style`)."""
    return str(output_name).rstrip("/").split("/")[-1]
