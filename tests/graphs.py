"""API-format graphs shared by server, browser and workflow tests."""

TINY = {"family": "flux2", "width": 64, "heads": 2, "depth": 1, "single_depth": 1, "context_dim": 32,
        "seed": 5, "dtype": "float32"}


def train_prompt(steps: int, output_name: str, save_every: int = 5) -> dict:
    return {
        "model": {"class_type": "LycorisTinyModel", "inputs": TINY},
        "latents": {"class_type": "LycorisTinyLatents", "inputs": {"model": ["model", 0], "width": 64, "height": 64,
                                                                    "count": 2, "seed": 1}},
        "cond": {"class_type": "LycorisTinyTextEncode", "inputs": {"model": ["model", 0], "text": "a cat", "tokens": 4}},
        "data": {"class_type": "LycorisLatentDataset", "inputs": {"latents": ["latents", 0], "conditioning": ["cond", 0],
                                                                   "repeats": 1, "caption_dropout": 0.0}},
        "config": {"class_type": "LycorisConfig", "inputs": {"preset": "flux2_lokr", "config_json": ""}},
        "train": {"class_type": "LycorisTrain", "inputs": {
            "model": ["model", 0], "dataset": ["data", 0], "config": ["config", 0], "steps": steps, "batch_size": 2,
            "grad_accumulation": 1, "learning_rate": 3e-3, "lr_schedule": "constant", "warmup_steps": 0,
            "optimizer": "adamw", "seed": 0, "dtype": "float32", "gradient_checkpointing": True,
            "save_every": save_every, "keep_last": 2, "nan_policy": "stop", "output_name": output_name,
            "resume": False}},
    }


def adapter_chain(g: dict, model: list, latent: list, adapter_name: str | None, strength: float = 1.0, *,
                  ab: str | None = None, merge: bool = False) -> tuple[list, list]:
    """Add Load LyCORIS -> Apply (or A/B over `ab`, or Merge) to `g` between `model` and the sampler;
    returns the (model, latent) links the sampler takes. No adapter: `g` unchanged."""
    if not adapter_name:
        return model, latent
    g["load"] = {"class_type": "LycorisLoad", "inputs": {"model": model, "lora_name": adapter_name, "strict": True}}
    if ab:
        g["ab"] = {"class_type": "LycorisAB", "inputs": {"model": model, "adapter": ["load", 0], "strengths": ab,
                                                        "latent": latent}}
        return ["ab", 0], ["ab", 1]
    if merge:
        g["merge"] = {"class_type": "LycorisMerge", "inputs": {"model": model, "adapter": ["load", 0],
                                                              "strength": strength, "tlora_timestep": -1}}
        return ["merge", 0], latent
    g["apply"] = {"class_type": "LycorisApply", "inputs": {"model": model, "adapter": ["load", 0],
                                                          "strength": strength}}
    return ["apply", 0], latent
