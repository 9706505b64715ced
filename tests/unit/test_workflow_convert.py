"""The UI -> API converter (scripts/workflow_api.py) on hand-made node definitions, no server.

The rules mirror the frontend's graphToPrompt; tests/integration/test_example_workflows.py
checks the result against the real frontend for every shipped workflow.
"""

import json
from pathlib import Path

import pytest
from workflow_api import WorkflowError, api_to_ui, stored_values, ui_to_api, widget_layout

REPO = Path(__file__).resolve().parents[2]

INFO = {
    "Loader": {"input": {"required": {"name": [["a.safetensors", "b.safetensors"], {}]}},
               "input_order": {"required": ["name"]}, "output": ["MODEL"], "output_name": ["MODEL"]},
    "Sampler": {  # KSampler's shape: sockets between widgets, a seed with its control widget
        "input": {"required": {
            "model": ["MODEL", {}], "seed": ["INT", {"default": 0, "control_after_generate": True}],
            "steps": ["INT", {"default": 20}], "cfg": ["FLOAT", {"default": 8.0}],
            "sampler_name": [["euler", "heun"], {}], "latent": ["LATENT", {}], "denoise": ["FLOAT", {"default": 1.0}]},
            "optional": {"extra": ["LATENT", {}], "label": ["STRING", {"default": ""}]}},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "latent", "denoise"],
                        "optional": ["extra", "label"]},
        "output": ["LATENT"], "output_name": ["LATENT"]},
    "V3Seed": {  # a V3 node: COMBO type name, a seed without the option (the frontend adds the control anyway)
        "input": {"required": {"family": ["COMBO", {"options": ["x", "y"]}], "seed": ["INT", {"default": 0}],
                               "count": ["INT", {"default": 1, "forceInput": True}]}},
        "input_order": {"required": ["family", "seed", "count"]},
        "output": ["LATENT", "STRING"], "output_name": ["latent", "text"]},
    "Show": {"input": {"required": {"latent": ["LATENT", {}], "text": ["STRING", {"multiline": True}]}},
             "input_order": {"required": ["latent", "text"]}, "output": [], "output_name": [], "output_node": True},
}


def _node(node_id, kind, widgets=(), inputs=(), mode=0, outputs=()):
    return {"id": node_id, "type": kind, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": node_id,
            "mode": mode, "inputs": list(inputs), "outputs": list(outputs), "properties": {},
            "widgets_values": list(widgets)}


def _graph(nodes, links):
    return {"last_node_id": 99, "last_link_id": 99, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


def test_widget_layout_counts_control_values():
    assert widget_layout(INFO["Sampler"]) == [("seed", 2), ("steps", 1), ("cfg", 1), ("sampler_name", 1),
                                              ("denoise", 1), ("label", 1)]
    assert widget_layout(INFO["V3Seed"]) == [("family", 1), ("seed", 2)], "forceInput is a socket; seed gets a control"
    assert stored_values("seed", ["INT", {"control_after_generate": False}]) == 1
    assert stored_values("image", [["a.png"], {"image_upload": True}]) == 2
    assert stored_values("mode", ["COMBO", {"options": ["a"], "control_after_generate": True}]) == 2


def test_widgets_links_and_frontend_only_nodes():
    nodes = [
        _node(1, "Loader", ["b.safetensors"]),
        _node(2, "V3Seed", ["y", 42, "fixed"], inputs=[{"name": "count", "type": "INT", "link": None}]),
        _node(3, "Reroute", inputs=[{"name": "", "type": "*", "link": 2}]),
        _node(4, "Sampler", [7, "randomize", 12, 2.5, "heun", 0.5, "hello"],
              inputs=[{"name": "model", "type": "MODEL", "link": 1}, {"name": "latent", "type": "LATENT", "link": 3},
                      {"name": "extra", "type": "LATENT", "link": None}]),
        _node(5, "Note", ["just text"]),
        _node(6, "Show", [""], inputs=[{"name": "latent", "type": "LATENT", "link": 4},
                                       {"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": 5}]),
    ]
    links = [[1, 1, 0, 4, 0, "MODEL"], [2, 2, 0, 3, 0, "LATENT"], [3, 3, 0, 4, 1, "LATENT"],
             [4, 4, 0, 6, 0, "LATENT"], [5, 2, 1, 6, 1, "STRING"]]
    prompt = ui_to_api(_graph(nodes, links), INFO)
    assert set(prompt) == {"1", "2", "4", "6"}, "Note and Reroute are frontend-only"
    assert prompt["1"]["inputs"] == {"name": "b.safetensors"}
    assert prompt["2"]["inputs"] == {"family": "y", "seed": 42}, "an unlinked forceInput socket is left out"
    assert prompt["4"]["inputs"] == {"model": ["1", 0], "seed": 7, "steps": 12, "cfg": 2.5, "sampler_name": "heun",
                                     "latent": ["2", 0], "denoise": 0.5, "label": "hello"}
    assert prompt["6"]["inputs"] == {"latent": ["4", 0], "text": ["2", 1]}, "a converted widget takes its link"
    assert prompt["4"]["class_type"] == "Sampler" and prompt["4"]["_meta"]["title"] == "Sampler"


def test_primitive_bypass_and_mute():
    nodes = [
        _node(1, "Loader", ["a.safetensors"]),
        _node(2, "V3Seed", ["x", 1, "fixed"]),
        _node(3, "Sampler", [1, "fixed", 20, 8.0, "euler", 1.0, ""], mode=4,  # bypassed: LATENT passes through
              inputs=[{"name": "model", "type": "MODEL", "link": 1}, {"name": "latent", "type": "LATENT", "link": 2}]),
        _node(4, "PrimitiveNode", [9], outputs=[{"name": "STRING", "type": "STRING", "links": [4]}]),
        _node(5, "Show", ["from the primitive"],
              inputs=[{"name": "latent", "type": "LATENT", "link": 3},
                      {"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": 4}]),
        _node(6, "Show", ["muted"], mode=2, inputs=[{"name": "latent", "type": "LATENT", "link": 5}]),
        _node(7, "Show", ["fed by a muted node"], inputs=[{"name": "latent", "type": "LATENT", "link": 6}]),
        _node(8, "V3Seed", ["x", 2, "fixed"], mode=2),
    ]
    links = [[1, 1, 0, 3, 0, "MODEL"], [2, 2, 0, 3, 1, "LATENT"], [3, 3, 0, 5, 0, "LATENT"],
             [4, 4, 0, 5, 1, "STRING"], [5, 2, 0, 6, 0, "LATENT"], [6, 8, 0, 7, 0, "LATENT"]]
    prompt = ui_to_api(_graph(nodes, links), INFO)
    assert set(prompt) == {"1", "2", "5", "7"}
    assert prompt["5"]["inputs"] == {"latent": ["2", 0], "text": "from the primitive"}
    assert prompt["7"]["inputs"] == {"text": "fed by a muted node"}


def test_errors_name_the_node():
    with pytest.raises(WorkflowError, match=r"node 1 \(Missing\): no such node"):
        ui_to_api(_graph([_node(1, "Missing", [])], []), INFO)
    with pytest.raises(WorkflowError, match=r"node 1 \(Sampler\): 2 widget values for 7"):
        ui_to_api(_graph([_node(1, "Sampler", [1, 2])], []), INFO)
    with pytest.raises(WorkflowError, match="not a UI-format workflow"):
        ui_to_api({"1": {"class_type": "Loader", "inputs": {}}}, INFO)


def test_api_to_ui_round_trips():
    prompt = {
        "1": {"class_type": "Loader", "inputs": {"name": "b.safetensors"}},
        "2": {"class_type": "V3Seed", "inputs": {"family": "y", "seed": 3}, "_meta": {"title": "Data"}},
        "3": {"class_type": "Sampler", "inputs": {"model": ["1", 0], "seed": 5, "steps": 4, "cfg": 1.0,
                                                  "sampler_name": "euler", "latent": ["2", 0], "denoise": 1.0,
                                                  "label": ["2", 1]}},
        "4": {"class_type": "Show", "inputs": {"latent": ["3", 0], "text": "done"}},
    }
    workflow = api_to_ui(prompt, INFO, notes=[{"id": 9, "text": "hello", "column": -1}],
                         groups=[{"title": "all", "nodes": ["1", "2", "3", "4"]}])
    json.dumps(workflow)  # plain JSON
    assert workflow["version"] == 0.4 and workflow["last_node_id"] == 9
    by_id = {n["id"]: n for n in workflow["nodes"]}
    assert by_id[9]["type"] == "Note" and by_id[9]["widgets_values"] == ["hello"]
    assert by_id[3]["widgets_values"] == [5, "fixed", 4, 1.0, "euler", 1.0, ""], "seeds are fixed, linked widgets keep a default"
    assert by_id[2]["title"] == "Data"
    back = ui_to_api(workflow, INFO)
    for entry in back.values():
        entry.pop("_meta")
    for entry in prompt.values():
        entry.pop("_meta", None)
    assert back == prompt
    for link in workflow["links"]:  # every link is listed on both ends
        link_id, origin, slot, target, target_slot, _ = link
        assert link_id in by_id[origin]["outputs"][slot]["links"]
        assert by_id[target]["inputs"][target_slot]["link"] == link_id
    (group,) = workflow["groups"]
    x, y, w, h = group["bounding"]
    for n in by_id.values():
        if n["id"] != 9:
            assert x <= n["pos"][0] and n["pos"][0] + n["size"][0] <= x + w and y <= n["pos"][1] <= y + h


def test_shipped_workflows_are_ui_format_with_notes():
    files = sorted((REPO / "example_workflows").glob("*.json"))
    assert len(files) >= 6
    for path in files:
        workflow = json.loads(path.read_text())
        assert workflow["version"] == 0.4 and isinstance(workflow["links"], list), path.name
        types = [n["type"] for n in workflow["nodes"]]
        notes = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "Note"]
        assert notes and any("swap" in text.lower() for text in notes), f"{path.name}: a note says what to swap in"
        assert any(t == "LycorisTinyModel" for t in types), f"{path.name}: runs on the tiny model"
        for n in workflow["nodes"]:
            assert {"id", "type", "pos", "size", "mode", "inputs", "outputs", "widgets_values"} <= set(n), path.name
