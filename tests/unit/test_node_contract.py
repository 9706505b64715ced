"""Contract over every node of the pack: ids, descriptions, tooltips, execute signature."""

import inspect

import pytest

from comfyui_lycoris.nodes import NODE_CLASS_MAPPINGS, NODE_CLASSES, NODE_DISPLAY_NAME_MAPPINGS


@pytest.mark.parametrize("cls", NODE_CLASSES, ids=lambda c: c.__name__)
def test_schema_contract(cls):
    schema = cls.define_schema()
    schema.validate()
    assert schema.node_id.startswith("Lycoris"), "node ids carry the pack prefix"
    assert schema.category.startswith("LyCORIS")
    assert schema.description and len(schema.description) > 20, "every node has a description"
    assert schema.display_name
    for inp in schema.inputs or []:
        assert inp.tooltip and len(inp.tooltip) > 5, f"{schema.node_id}.{inp.id} has no tooltip"
    params = inspect.signature(cls.execute).parameters
    named = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    input_ids = [inp.id for inp in schema.inputs or []]
    if len(named) == len(params):
        assert named == input_ids, "execute() takes exactly the schema inputs, in order"
    else:  # the training nodes pass their JobSpec settings on as **training: those and nothing else
        from dataclasses import fields

        from comfyui_lycoris.trainer.spec import JobSpec

        assert set(named) <= set(input_ids), "execute() takes only schema inputs"
        rest = set(input_ids) - set(named)
        assert rest and rest <= {f.name for f in fields(JobSpec)}, f"**kwargs carries non-spec inputs {rest}"


def test_mappings_cover_every_node_once():
    ids = [cls.define_schema().node_id for cls in NODE_CLASSES]
    assert len(ids) == len(set(ids))
    assert set(NODE_CLASS_MAPPINGS) == set(ids) == set(NODE_DISPLAY_NAME_MAPPINGS)
