"""Config parsing: every shipped preset is valid, bad configs fail with a message naming the field."""

import json
from pathlib import Path

import jsonschema
import pytest

from comfyui_lycoris.core import config as cfgmod
from comfyui_lycoris.core.config import ConfigError, parse_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(p for p in CONFIGS.glob("*.json") if p.name != "schema.json")
SCHEMA = json.loads((CONFIGS / "schema.json").read_text())
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


@pytest.mark.parametrize("bad, message", BAD_CONFIGS, ids=[m[:40] for _, m in BAD_CONFIGS])
def test_bad_config_names_the_field(bad, message):
    with pytest.raises(ConfigError) as err:
        parse_config(json.dumps(bad, allow_nan=True))
    assert message in str(err.value)


# JSON Schema cannot say "finite", "a valid regex" or compare two fields; the parser does.
SCHEMA_EXPRESSIBLE = [(b, m) for b, m in BAD_CONFIGS
                      if not any(s in m for s in ("finite", "regular expression", "larger than linear_dim"))]


@pytest.mark.parametrize("bad, message", SCHEMA_EXPRESSIBLE, ids=[m[:40] for _, m in SCHEMA_EXPRESSIBLE])
def test_schema_rejects_what_the_parser_rejects(bad, message):
    """configs/schema.json describes the same rules, so editors can validate configs too."""
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(json.dumps(bad, allow_nan=True)), SCHEMA)


def test_malformed_json_reports_line_and_column():
    text = '{\n  "algo": "lokr",\n  "multiplier": 1.0,\n  "linear_dim": 16\n  "linear_alpha": 8\n}'
    with pytest.raises(ConfigError, match=r"malformed JSON at line 5, column 3"):
        parse_config(text)


def test_not_an_object():
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        parse_config("[1, 2]")


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_shipped_presets_are_valid(path):
    data = json.loads(path.read_text())
    jsonschema.validate(data, SCHEMA)
    config = parse_config(path.read_text())
    assert config.description and config.families
    assert config.warnings == ()


def test_schema_lists_exactly_the_parser_keys():
    assert set(SCHEMA["properties"]) == {*cfgmod.TOP_LEVEL, *cfgmod.DOC_KEYS, "apply_preset"}
    assert set(SCHEMA["$defs"]["override"]["properties"]) == set(cfgmod.OVERRIDE_KEYS)
    assert set(SCHEMA["$defs"]["preset"]["properties"]) == set(cfgmod.PRESET_KEYS)
    assert SCHEMA["$defs"]["algo"]["enum"] == list(cfgmod.ALGOS)


def test_warnings_for_settings_that_do_nothing():
    config = parse_config(with_(algo="lora", tlora_alpha=2.0, factor=4, linear_alpha=0.5))
    text = " | ".join(config.warnings)
    assert "tlora_alpha: only used by algo 'tlora'" in text
    assert "factor: only used by algo 'lokr'" in text
    assert "linear_alpha: SimpleTuner reads this field with int(); 0.5 trains as 0 there" in text


def test_overrides_and_defaults():
    config = parse_config(with_(linear_dim=DROP, full_matrix=True), overrides={"factor": 8})
    assert config.linear_dim == 10000 and config.factor == 8 and config.full_matrix
    assert config.tlora_min_rank == 1 and config.tlora_alpha == 1.0
    assert config.lycoris_kwargs() == {"algo": "lokr", "full_matrix": True, "factor": 8}
    assert json.loads(config.to_json())["factor"] == 8


def test_deprecated_keys_are_read_as_their_new_names():
    config = parse_config(with_(constrain=0.5, use_cp=True))
    assert config.keywords["constraint"] == 0.5 and config.keywords["use_tucker"] is True
    assert any("constrain: deprecated" in w for w in config.warnings)


def test_string_booleans_are_normalised():
    assert parse_config(with_(full_matrix="true")).full_matrix is True
