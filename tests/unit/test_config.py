"""Config parsing: every shipped preset is valid, bad configs fail with a message naming the field."""

import json
from pathlib import Path

import jsonschema
import pytest
from config_cases import BAD_CONFIGS, DROP, with_

from comfyui_lycoris.core import config as cfgmod
from comfyui_lycoris.core.config import ConfigError, parse_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(p for p in CONFIGS.glob("*.json") if p.name != "schema.json")
SCHEMA = json.loads((CONFIGS / "schema.json").read_text())
@pytest.mark.parametrize("bad, message", BAD_CONFIGS, ids=[m[:40] for _, m in BAD_CONFIGS])
def test_bad_config_names_the_field(bad, message):
    with pytest.raises(ConfigError) as err:
        parse_config(json.dumps(bad, allow_nan=True))
    assert message in str(err.value)


# JSON Schema cannot say "finite", "a valid regex" or compare two fields; the parser does.
SCHEMA_EXPRESSIBLE = [(b, m) for b, m in BAD_CONFIGS
                      if not any(s in m for s in ("finite", "regular expression", "cannot read", "switches the adapter",
                                                  "becomes 0", "lower case", "neither a LyCORIS built-in"))]


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
    assert set(SCHEMA["$defs"]["preset"]["properties"]) == {*cfgmod.PRESET_KEYS, *cfgmod.UNAPPLIED_PRESET_KEYS}
    assert SCHEMA["$defs"]["algo"]["enum"] == list(cfgmod.ALGOS)


def test_warnings_for_settings_that_do_nothing():
    config = parse_config(with_(algo="lora", tlora_alpha=2.0, factor=4, linear_alpha=0.5))
    text = " | ".join(config.warnings)
    assert "tlora_alpha: only used by algo 'tlora'" in text
    assert "factor: only used by algo 'lokr'" in text
    assert "linear_alpha: 0.5 becomes 0 in SimpleTuner: LyCORIS then uses alpha = dim (scale 1)" in text
    assert config.linear_alpha == 0


def test_overrides_and_defaults():
    config = parse_config(with_(linear_dim=DROP, full_matrix=True), overrides={"factor": 8})
    assert config.linear_dim == 4 and config.factor == 8 and config.full_matrix  # SimpleTuner's default
    assert config.tlora_min_rank == 1 and config.tlora_alpha == 1.0
    assert config.lycoris_kwargs() == {"algo": "lokr", "full_matrix": True, "factor": 8}
    assert json.loads(config.to_json())["factor"] == 8 and "linear_dim" not in json.loads(config.to_json())


def test_deprecated_keys_are_read_as_their_new_names():
    config = parse_config(with_(constrain=0.5, use_cp=True))
    assert config.keywords["constraint"] == 0.5 and config.keywords["use_tucker"] is True
    assert any("constrain: deprecated" in w for w in config.warnings)


def test_string_booleans_are_read_as_lycoris_reads_them():
    assert parse_config(with_(full_matrix="true")).full_matrix is True
    assert parse_config(with_(full_matrix="False")).full_matrix is False  # str_bool: only "false" is false
    assert parse_config(with_(full_matrix="0")).full_matrix is True
