"""Bad LyCORIS configs and the message each must produce: shared by unit and server tests."""

BASE = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 16, "linear_alpha": 8}


def with_(**changes):
    data = dict(BASE)
    for key, value in changes.items():
        if value is DROP:
            data.pop(key)
        else:
            data[key] = value
    return data


DROP = object()

# (config, expected message fragment) — each line is one mistake a user makes.
BAD_CONFIGS = [
    (with_(multiplier=DROP), "multiplier: required field is missing"),
    (with_(linear_alpha=DROP), "linear_alpha: required field is missing"),
    (with_(linear_dim=DROP), "linear_dim: required field is missing (linear_dim may be left out only with full_matrix"),
    (with_(algo="lokra"), "algo: unknown algorithm 'lokra'; supported: lora, locon, loha, lokr"),
    (with_(algo=3), "algo: unknown algorithm 3"),
    (with_(linear_dim=-4), "linear_dim: must be at least 1, got -4"),
    (with_(linear_dim=0), "linear_dim: must be at least 1, got 0"),
    (with_(linear_dim=16.5), "linear_dim: must be a whole number, got 16.5"),
    (with_(linear_dim="16"), "linear_dim: must be a number, got str '16'"),
    (with_(linear_alpha=float("nan")), "linear_alpha: must be a finite number, got nan"),
    (with_(linear_alpha=float("inf")), "linear_alpha: must be a finite number, got inf"),
    (with_(linear_alpha=0), "linear_alpha: must be greater than 0, got 0"),
    (with_(linear_alpha=True), "linear_alpha: must be a number, got bool True"),
    (with_(factor=0), "factor: must be -1 (automatic) or a positive integer, got 0"),
    (with_(factor=-3), "factor: must be -1 (automatic) or a positive integer, got -3"),
    (with_(full_matrix="yes"), "full_matrix: must be true or false, got 'yes'"),
    (with_(dropout=1.5), "dropout: must be between 0 and 1, got 1.5"),
    (with_(linear_dims=16), "config: unknown key 'linear_dims'; did you mean 'linear_dim'?"),
    (with_(mutliplier=1), "config: unknown key 'mutliplier'; did you mean 'multiplier'?"),
    (with_(weight_decompose=True), "config: 'weight_decompose' is not a config key: use 'dora_wd'"),
    (with_(rank=16), "config: 'rank' is not a config key: use 'linear_dim'"),
    (with_(algo="tlora", linear_dim=4, tlora_min_rank=8), "tlora_min_rank: 8 is larger than linear_dim 4"),
    (with_(tlora_alpha=-1), "tlora_alpha: must be greater than 0, got -1"),
    (with_(apply_preset=["Attention"]), "apply_preset: must be an object, got ['Attention']"),
    (with_(apply_preset={"target_modules": ["Attention"]}), "apply_preset: unknown key 'target_modules'; did you mean 'target_module'?"),
    (with_(apply_preset={"target_module": "Attention"}), "apply_preset.target_module: must be a list of class names, got 'Attention'"),
    (with_(apply_preset={"target_name": ["blocks.(0"]}), "apply_preset.target_name[0]: invalid regular expression 'blocks.(0'"),
    (with_(apply_preset={"module_algo_map": {"Attention": {"factr": 4}}}),
     "apply_preset.module_algo_map.Attention: unknown key 'factr'; did you mean 'factor'?"),
    (with_(apply_preset={"module_algo_map": {"Attention": {"factor": 0}}}),
     "apply_preset.module_algo_map.Attention.factor: must be -1 (automatic) or a positive integer, got 0"),
    (with_(apply_preset={"name_algo_map": {"x": {"dim": -1}}}), "apply_preset.name_algo_map.x.dim: must be at least 1, got -1"),
    (with_(apply_preset={"module_algo_map": {"Attention": 4}}), "apply_preset.module_algo_map.Attention: must be an object"),
    (with_(apply_preset={"use_fnmatch": "maybe"}), "apply_preset.use_fnmatch: must be true or false, got 'maybe'"),
    (with_(families=["sd15"]), "families: must be a list drawn from flux2, flux1, sdxl"),
]
