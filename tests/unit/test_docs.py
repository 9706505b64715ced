"""The README stays current: every node and every config field is documented there."""

import json
from pathlib import Path

from comfyui_lycoris.nodes import NODE_DISPLAY_NAME_MAPPINGS

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def test_every_node_is_in_the_node_table():
    missing = [name for name in NODE_DISPLAY_NAME_MAPPINGS.values() if f"| {name} |" not in README]
    assert not missing, f"README node table lacks {missing}"


def test_every_config_field_is_in_the_reference():
    schema = json.loads((REPO / "configs" / "schema.json").read_text())
    fields = [k for k in schema["properties"] if k != "apply_preset"]
    fields += [f"apply_preset.{k}" for k in schema["$defs"]["preset"]["properties"]]
    missing = [f for f in fields if f"| `{f}` |" not in README]
    assert not missing, f"README config reference lacks {missing}"


def test_readme_shows_the_two_commands():
    assert "make demo" in README and "make test" in README
