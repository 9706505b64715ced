"""LyCORIS configs and what the pack says about each: shared by unit and server tests.

BAD_CONFIGS are refused (SimpleTuner refuses them too, or they could only fail or do nothing there);
WARNED_CONFIGS are read as SimpleTuner 4.10.1 + LyCORIS 4.1.3 read them, with a warning that says how.
"""

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
    (with_(algo=DROP), "algo: required field is missing"),
    (with_(linear_dim=DROP), "linear_dim: required field is missing (linear_dim may be left out only with full_matrix"),
    (with_(linear_dim=DROP, full_matrix="true"), "SimpleTuner does not count the text \"true\""),
    (with_(algo="lokra"), "algo: unknown algorithm 'lokra'; supported: lora, locon, loha, lokr"),
    (with_(algo=3), "algo: unknown algorithm 3"),
    (with_(linear_dim=-4), "linear_dim: must be at least 1, got -4"),
    (with_(linear_dim=0), "linear_dim: must be at least 1, got 0"),
    (with_(linear_dim=0.5), "linear_dim: must be at least 1, got 0 (0.5 becomes 0 in SimpleTuner)"),
    (with_(linear_dim="16.5"), "linear_dim: must be a number; SimpleTuner's int() cannot read '16.5'"),
    (with_(linear_dim=None), "linear_dim: must be a number, got NoneType None"),
    (with_(linear_alpha=float("nan")), "linear_alpha: must be a finite number, got nan"),
    (with_(linear_alpha=float("inf")), "linear_alpha: must be a finite number, got inf"),
    (with_(linear_alpha=-1), "linear_alpha: must be at least 0 (0 means alpha = dim), got -1"),
    (with_(multiplier=0.5), "multiplier: 0.5 becomes 0 in SimpleTuner's int(), which switches the adapter off"),
    (with_(multiplier=0), "multiplier: 0 switches the adapter off in training"),
    (with_(factor=0), "factor: must be -1 (automatic) or a positive integer, got 0"),
    (with_(factor=-3), "factor: must be -1 (automatic) or a positive integer, got -3"),
    (with_(dropout=1.5), "dropout: must be between 0 and 1, got 1.5"),
    (with_(tlora_alpha=-1), "tlora_alpha: must be at least 0, got -1.0"),
    (with_(tlora_min_rank="two"), "tlora_min_rank: must be a number; SimpleTuner's int() cannot read 'two'"),
    (with_(preset="no_such_preset.toml"), "preset: 'no_such_preset.toml' is neither a LyCORIS built-in preset"),
    (with_(apply_preset=["Attention"]), "apply_preset: must be an object, got ['Attention']"),
    (with_(apply_preset={"target_modules": ["Attention"]}),
     "apply_preset: unknown key 'target_modules' (LyCORIS's apply_preset refuses it); did you mean 'target_module'?"),
    (with_(apply_preset={"target_module": "Attention"}), "apply_preset.target_module: must be a list of class names, got 'Attention'"),
    (with_(apply_preset={"target_name": ["blocks.(0"]}), "apply_preset.target_name[0]: invalid regular expression 'blocks.(0'"),
    (with_(apply_preset={"module_algo_map": {"Attention": {"factor": 0}}}),
     "apply_preset.module_algo_map.Attention.factor: must be -1 (automatic) or a positive integer, got 0"),
    (with_(apply_preset={"module_algo_map": {"Attention": {"algo": "LoKr"}}}),
     "apply_preset.module_algo_map.Attention.algo: 'LoKr' must be written in lower case"),
    (with_(apply_preset={"name_algo_map": {"x": {"dim": -1}}}), "apply_preset.name_algo_map.x.dim: must be at least 1, got -1"),
    (with_(apply_preset={"module_algo_map": {"Attention": 4}}), "apply_preset.module_algo_map.Attention: must be an object"),
    (with_(families=["sd15"]), "families: must be a list drawn from flux2, flux1, sdxl"),
]

# (config, expected warning fragment, field -> value it is read as)
WARNED_CONFIGS = [
    (with_(linear_dim="16"), "linear_dim: the text '16' is read by SimpleTuner's int() as 16", {"linear_dim": 16}),
    (with_(linear_dim=16.7), "linear_dim: 16.7 becomes 16 in SimpleTuner's int()", {"linear_dim": 16}),
    (with_(linear_alpha=0.5), "linear_alpha: 0.5 becomes 0 in SimpleTuner: LyCORIS then uses alpha = dim",
     {"linear_alpha": 0}),
    (with_(linear_alpha=True), "linear_alpha: true is read by SimpleTuner's int() as 1", {"linear_alpha": 1}),
    (with_(multiplier=1.5), "multiplier: 1.5 becomes 1 in SimpleTuner's int()", {"multiplier": 1.0}),
    (with_(algo="tlora", tlora_alpha="2"), "tlora_alpha: the text '2' is read by SimpleTuner's float() as 2.0",
     {"tlora_alpha": 2.0}),
    (with_(full_matrix="yes"), "full_matrix: \"yes\" is not true/false; LyCORIS's str_bool reads it as true",
     {"full_matrix": True}),
    (with_(full_matrix="0"), "full_matrix: \"0\" is not true/false; LyCORIS's str_bool reads it as true",
     {"full_matrix": True}),
    (with_(linear_dims=16), "config: unknown key 'linear_dims' (create_lycoris ignores it); did you mean 'linear_dim'?", {}),
    (with_(mutliplier=1), "config: unknown key 'mutliplier' (create_lycoris ignores it); did you mean 'multiplier'?", {}),
    (with_(weight_decompose=True), "config: 'weight_decompose' is not a config key (create_lycoris ignores it): use 'dora_wd'", {}),
    (with_(rank=16), "config: 'rank' is not a config key (create_lycoris ignores it): use 'linear_dim'", {}),
    (with_(algo="tlora", linear_dim=4, tlora_min_rank=8), "tlora_min_rank: 8 is larger than linear_dim 4: every rank "
     "is active", {"tlora_min_rank": 8}),
    (with_(apply_preset={"module_algo_map": {"Attention": {"factr": 4}}}),
     "apply_preset.module_algo_map.Attention: unknown key 'factr' (the LyCORIS module ignores it); did you mean 'factor'?", {}),
    (with_(apply_preset={"use_fnmatch": "maybe", "target_module": []}),
     "apply_preset.use_fnmatch: \"maybe\" is not true/false; LyCORIS tests it as Python does: true", {}),
    (with_(apply_preset={"target_module": ["Attention"], "unet_target_module": ["X"]}),
     "apply_preset.unet_target_module: accepted by LyCORIS's apply_preset but never applied", {}),
    (with_(train_llm_adapter=True, warn_on_unmatched=False, sig_type="last"),
     "sig_type: create_lycoris does not pass it on from the top level", {}),
]
