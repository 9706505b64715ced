"""Workflows in the frontend's UI format (what Save writes, what drag-and-drop loads) <-> API prompts.

`ui_to_api(workflow, object_info)` does what the frontend's `graphToPrompt` does when you press
Queue, so a shared workflow can run headless (tests, `make demo`) exactly as it runs in the browser:

- A node's `widgets_values` are the values of its widget inputs, in the order `/object_info` lists
  the inputs (`input_order`: required, then optional). Widget inputs are INT, FLOAT, STRING, BOOLEAN
  and COMBO (an option list), unless `forceInput`; everything else (MODEL, LATENT, ...) is a socket.
- The frontend stores one extra value after an INT input with `control_after_generate` (and after
  any INT input named `seed` or `noise_seed`, unless the option is false), after a COMBO with
  `control_after_generate`, and after a combo with an `*_upload` option: "fixed", "randomize", ...
  or the upload button's value. They are skipped (the "fixed" value is what the prompt gets).
- A widget input connected by a link (a converted widget) takes the link; from a PrimitiveNode
  it takes the node's own widget value, which the primitive keeps in sync.
- Note, MarkdownNote, Reroute and PrimitiveNode are frontend-only: no prompt entry. Links are
  followed through Reroutes and through bypassed nodes (mode 4: an output passes the first input
  of its type); muted nodes (mode 2) and their links are dropped, as the frontend drops them.

`api_to_ui(prompt, object_info, ...)` goes the other way for authoring: it lays an API prompt out
as a UI workflow (columns by depth, notes, groups), which is how `example_workflows/` is written
(`scripts/example_workflows.py`).

CLI: `python scripts/workflow_api.py WORKFLOW.json --url http://127.0.0.1:8188` prints the prompt
(`--object-info FILE` reads a saved `/object_info` instead of asking a server).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

FRONTEND_ONLY = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = ("seed", "noise_seed")
UPLOAD_OPTIONS = ("image_upload", "animated_image_upload", "video_upload", "audio_upload")
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4


class WorkflowError(ValueError):
    """The workflow cannot become a prompt on this server; the message names the node."""


# -- the node definitions (/object_info) ---------------------------------------------------------

def ordered_inputs(spec: Mapping) -> list[tuple[str, list, bool]]:
    """(name, [type, options], optional) of a node's inputs, in the order the frontend builds them."""
    inputs = spec.get("input", {})
    order = spec.get("input_order") or {section: list(inputs.get(section, {})) for section in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            config = inputs.get(section, {}).get(name)
            if config is not None:
                out.append((name, list(config), section == "optional"))
    return out


def _options(config: list) -> dict:
    return config[1] if len(config) > 1 and isinstance(config[1], dict) else {}


def is_widget(config: list) -> bool:
    """True when the frontend shows this input as a widget (with a value in widgets_values)."""
    kind, options = config[0], _options(config)
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def stored_values(name: str, config: list) -> int:
    """How many widgets_values entries the frontend keeps for this widget input (1 or 2)."""
    kind, options = config[0], _options(config)
    combo = isinstance(kind, list) or kind == "COMBO"
    control = options.get("control_after_generate")
    if kind == "INT" and control is None:
        control = name in SEED_NAMES
    if control and (kind == "INT" or combo):
        return 2
    if combo and any(options.get(flag) for flag in UPLOAD_OPTIONS):
        return 2
    return 1


def widget_layout(spec: Mapping) -> list[tuple[str, int]]:
    """(widget input name, values stored) in widgets_values order."""
    return [(name, stored_values(name, config)) for name, config, _ in ordered_inputs(spec) if is_widget(config)]


# -- UI -> API --------------------------------------------------------------------------------------

def _links(workflow: Mapping) -> dict[int, dict]:
    out = {}
    for link in workflow.get("links", []) or []:
        if isinstance(link, Mapping):
            entry = {k: link[k] for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")}
        else:
            keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
            entry = dict(zip(keys, link, strict=False))
        out[int(entry["id"])] = entry
    return out


def _label(node: Mapping) -> str:
    return f"node {node.get('id')} ({node.get('type')})"


class _Graph:
    def __init__(self, workflow: Mapping, object_info: Mapping):
        if workflow.get("definitions", {}).get("subgraphs"):
            raise WorkflowError("workflow: subgraphs are not supported; convert them back to nodes first")
        if "nodes" not in workflow:
            raise WorkflowError("workflow: no 'nodes': this is not a UI-format workflow (an API prompt already?)")
        self.nodes = {int(n["id"]): n for n in workflow["nodes"]}
        self.links = _links(workflow)
        self.info = object_info

    def source(self, link_id: int | None, seen: frozenset = frozenset()) -> tuple | str | None:
        """[node id, slot] feeding a link, "primitive" for a PrimitiveNode, None when nothing does."""
        if link_id is None or link_id not in self.links:
            return None
        if link_id in seen:
            raise WorkflowError(f"link {link_id}: a cycle through reroutes or bypassed nodes")
        seen = seen | {link_id}
        link = self.links[link_id]
        node = self.nodes.get(int(link["origin_id"]))
        if node is None:
            return None
        if node.get("type") == "PrimitiveNode":
            return "primitive"
        if node.get("type") == "Reroute":
            inputs = node.get("inputs") or [{}]
            return self.source(inputs[0].get("link"), seen)
        mode = node.get("mode", MODE_ALWAYS)
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            return self.source(self._bypass_input(node, int(link["origin_slot"]), link.get("type")), seen)
        if node.get("type") in FRONTEND_ONLY:
            return None
        return (str(node["id"]), int(link["origin_slot"]))

    @staticmethod
    def _bypass_input(node: Mapping, slot: int, kind: str | None) -> int | None:
        """The link of the input a bypassed node passes to output `slot` (same slot, else same type)."""
        inputs = node.get("inputs") or []
        if slot < len(inputs) and inputs[slot].get("type") in (kind, "*"):
            return inputs[slot].get("link")
        for entry in inputs:
            if entry.get("type") == kind:
                return entry.get("link")
        return None

    def convert(self, node: Mapping) -> dict:
        kind = node.get("type")
        spec = self.info.get(kind)
        if spec is None:
            raise WorkflowError(f"{_label(node)}: no such node on this server (a missing custom node?)")
        linked = {entry["name"]: entry.get("link") for entry in node.get("inputs") or [] if entry.get("name")}
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        layout = widget_layout(spec)
        if isinstance(values, Mapping):  # some extensions save widgets by name
            widget_values = {name: values.get(name) for name, _ in layout if name in values}
        else:
            values = list(values or [])
            expected = sum(count for _, count in layout)
            if len(values) != expected:
                names = ", ".join(f"{name}{' (+control)' if count == 2 else ''}" for name, count in layout)
                raise WorkflowError(f"{_label(node)}: {len(values)} widget values for {expected} widget slots "
                                    f"[{names}]; saved by another version of the node?")
            widget_values, i = {}, 0
            for name, count in layout:
                widget_values[name] = values[i]
                i += count
        for name, config, _optional in ordered_inputs(spec):
            link = linked.get(name)
            source = self.source(link) if link is not None else None
            if isinstance(source, tuple):
                inputs[name] = list(source)
            elif is_widget(config) and name in widget_values:
                value = widget_values[name]
                inputs[name] = {"__value__": value} if isinstance(value, list) else value
        return {"inputs": inputs, "class_type": kind, "_meta": {"title": node.get("title") or spec.get("display_name") or kind}}


def ui_to_api(workflow: Mapping, object_info: Mapping) -> dict[str, dict]:
    """The API prompt of a UI-format workflow, as the frontend would queue it."""
    graph = _Graph(workflow, object_info)
    prompt = {}
    for node_id in sorted(graph.nodes):
        node = graph.nodes[node_id]
        if node.get("type") in FRONTEND_ONLY or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        prompt[str(node_id)] = graph.convert(node)
    for entry in prompt.values():  # as the frontend: links to nodes that are not in the prompt are dropped
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


# -- API -> UI (authoring) ------------------------------------------------------------------------

NODE_WIDTH = 320
COLUMN_GAP = 80
ROW_GAP = 40
TITLE_H = 30  # a node's title bar, drawn above its pos
GROUP_TOP = 80  # room for a group's title above its first nodes
BAND_GAP = 40
SLOT_H = 22
WIDGET_H = 26
MULTILINE_H = 90
NOTE_COLORS = {"color": "#432", "bgcolor": "#653"}


def _outputs(spec: Mapping) -> list[tuple[str, str]]:
    names = spec.get("output_name") or spec.get("output") or []
    return list(zip(names, spec.get("output", []), strict=False))


def node_size(spec: Mapping) -> list[int]:
    """About the size the frontend gives a node of this definition (it grows a node that is too small)."""
    widgets = [config for _, config, _ in ordered_inputs(spec) if is_widget(config)]
    sockets = len(ordered_inputs(spec)) - len(widgets)
    height = 30 + SLOT_H * max(sockets, len(_outputs(spec)), 1)
    for name, config, _ in ordered_inputs(spec):
        if is_widget(config):
            height += MULTILINE_H if _options(config).get("multiline") else WIDGET_H * stored_values(name, config)
    if spec.get("output_node") and "Image" in str(spec.get("name", "")):
        height += 200
    return [NODE_WIDTH, height]


def _depths(prompt: Mapping[str, Mapping]) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str, trail: tuple = ()) -> int:
        if node_id in depth:
            return depth[node_id]
        if node_id in trail:
            raise WorkflowError(f"prompt: a cycle through node {node_id}")
        parents = [v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list) and len(v) == 2]
        depth[node_id] = 1 + max((visit(p, (*trail, node_id)) for p in parents), default=-1)
        return depth[node_id]

    for node_id in prompt:
        visit(node_id)
    return depth


def _widget_value(value: Any) -> Any:
    return value["__value__"] if isinstance(value, Mapping) and "__value__" in value else value


def _layout(order: list[str], column_of: Mapping[str, int], size_of: Mapping[str, list[int]],
            groups: list[list[str]]) -> dict[str, list[int]]:
    """Positions: nodes stack down their column; each group is a band whose columns start below
    everything placed earlier in those columns, so groups never overlap. Ungrouped nodes go first."""
    first = min(column_of.values(), default=0)
    col_x = {col: (col - first) * (NODE_WIDTH + COLUMN_GAP) for col in set(column_of.values())}
    grouped = {nid for members in groups for nid in members}
    bands = [([nid for nid in order if nid not in grouped], 0), *((members, GROUP_TOP) for members in groups)]
    bottom: dict[int, int] = {}
    pos: dict[str, list[int]] = {}
    for members, title_space in bands:
        members = [nid for nid in order if nid in set(members)]
        if not members:
            continue
        cols = {column_of[nid] for nid in members}
        top = max((bottom[c] + BAND_GAP for c in cols if c in bottom), default=0) + title_space
        y = dict.fromkeys(cols, top)
        for nid in members:
            col = column_of[nid]
            pos[nid] = [col_x[col], y[col]]
            y[col] += size_of[nid][1] + ROW_GAP + TITLE_H
        for col in cols:
            bottom[col] = max(y.values())
    return pos


def api_to_ui(prompt: Mapping[str, Mapping], object_info: Mapping, *, notes: Iterable[Mapping] = (),
              groups: Iterable[Mapping] = (), columns: Mapping[str, int] | None = None,
              sizes: Mapping[str, list] | None = None) -> dict:
    """A UI-format workflow (frontend schema version 0.4) of an API prompt whose node ids are integers.

    Nodes are placed in columns by depth (`columns` overrides a node's column) and stacked in id
    order; each group is a band below what its columns already hold (see `_layout`).
    `notes`: {"id", "text", "column", optional "title", "size"} become Note nodes.
    `groups`: {"title", "nodes": [ids], optional "color"} become groups around those nodes.
    `sizes`: node id -> [width, height], for nodes whose extensions add widgets.
    Seed widgets get "fixed", so a shared workflow gives the same result each time it is queued.
    """
    columns = dict(columns or {})
    sizes = {str(k): list(v) for k, v in (sizes or {}).items()}
    group_list_in = list(groups)
    depth = _depths(prompt)
    nodes, links = [], []
    link_id = 0
    out_links: dict[tuple[str, int], list[int]] = {}
    note_list = list(notes)
    note_by_id = {str(n["id"]): n for n in note_list}
    for nid, entry in prompt.items():
        if entry["class_type"] not in object_info:
            raise WorkflowError(f"node {nid} ({entry['class_type']}): no such node on this server")

    column_of = {nid: columns.get(nid, depth[nid]) for nid in prompt}
    size_of = {nid: sizes.get(nid) or node_size(object_info[prompt[nid]["class_type"]]) for nid in prompt}
    for nid, note in note_by_id.items():
        column_of[nid] = note.get("column", -1)
        size_of[nid] = list(note.get("size", [NODE_WIDTH, 180]))
    order = sorted([*prompt, *note_by_id], key=int)
    positions = _layout(order, column_of, size_of, [[str(n) for n in g["nodes"]] for g in group_list_in])
    placed = {nid: (positions[nid], size_of[nid]) for nid in order}

    for nid in order:
        if nid in note_by_id:
            note = note_by_id[nid]
            nodes.append({"id": int(nid), "type": "Note", "pos": positions[nid], "size": size_of[nid], "flags": {},
                          "order": 0, "mode": MODE_ALWAYS, "inputs": [], "outputs": [],
                          "title": note.get("title", "Note"), "properties": {}, "widgets_values": [note["text"]],
                          **NOTE_COLORS})
            continue
        entry = prompt[nid]
        kind = entry["class_type"]
        spec = object_info[kind]
        pos, size = placed[nid]
        inputs, widgets_values = [], []
        for name, config, _ in ordered_inputs(spec):
            value = entry["inputs"].get(name)
            linked = isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            if is_widget(config):
                if linked or value is None:
                    default = _options(config).get("default")
                    if default is None and isinstance(config[0], list):
                        default = config[0][0] if config[0] else None
                    widgets_values.append(default)
                else:
                    widgets_values.append(_widget_value(value))
                if stored_values(name, config) == 2:
                    widgets_values.append("fixed" if config[0] == "INT" or _options(config).get("control_after_generate")
                                          else "image")
            if linked:
                link_id += 1
                source_id, slot = value[0], int(value[1])
                source_kind = _outputs(object_info[prompt[source_id]["class_type"]])[slot][1]
                links.append([link_id, int(source_id), slot, int(nid), None, source_kind])
                out_links.setdefault((source_id, slot), []).append(link_id)
                slot_entry = {"name": name, "type": config[0] if not isinstance(config[0], list) else "COMBO",
                              "link": link_id}
                if is_widget(config):
                    slot_entry["widget"] = {"name": name}
                inputs.append(slot_entry)
            elif not is_widget(config):
                inputs.append({"name": name, "type": config[0], "link": None})
        for index, slot_entry in enumerate(inputs):
            if slot_entry["link"] is not None:
                links[slot_entry["link"] - 1][4] = index
        title = entry.get("_meta", {}).get("title")
        node = {"id": int(nid), "type": kind, "pos": pos, "size": size, "flags": {}, "order": 0,
                "mode": MODE_ALWAYS, "inputs": inputs, "outputs": [],
                "properties": {"Node name for S&R": kind}, "widgets_values": widgets_values}
        if title and title != spec.get("display_name"):
            node["title"] = title
        nodes.append(node)
    for node in nodes:
        if node["type"] == "Note":
            continue
        spec = object_info[node["type"]]
        node["outputs"] = [{"name": name, "type": kind, "slot_index": slot,
                            "links": out_links.get((str(node["id"]), slot), [])}
                           for slot, (name, kind) in enumerate(_outputs(spec))]
    for index, node in enumerate(sorted(nodes, key=lambda n: (depth.get(str(n["id"]), 0), n["id"]))):
        node["order"] = index
    group_list = []
    for index, group in enumerate(group_list_in, start=1):
        boxes = [placed[str(n)] for n in group["nodes"]]
        x0 = min(p[0] for p, _ in boxes) - 20
        y0 = min(p[1] for p, _ in boxes) - 80
        x1 = max(p[0] + s[0] for p, s in boxes) + 20
        y1 = max(p[1] + s[1] for p, s in boxes) + 20
        group_list.append({"id": index, "title": group["title"], "bounding": [x0, y0, x1 - x0, y1 - y0],
                           "color": group.get("color", "#3f789e"), "font_size": 24, "flags": {}})
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(prompt, sort_keys=True))), "revision": 0,
            "last_node_id": max((n["id"] for n in nodes), default=0), "last_link_id": link_id,
            "nodes": sorted(nodes, key=lambda n: n["id"]), "links": links, "groups": group_list, "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [80, 120]}}, "version": 0.4}


# -- CLI --------------------------------------------------------------------------------------------

def fetch_object_info(url: str) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as resp:
        return json.loads(resp.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a UI-format ComfyUI workflow to an API prompt.")
    parser.add_argument("workflow", type=Path)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="a running ComfyUI, e.g. http://127.0.0.1:8188 (its /object_info is read)")
    source.add_argument("--object-info", type=Path, help="a saved /object_info JSON")
    args = parser.parse_args(argv)
    info = json.loads(args.object_info.read_text()) if args.object_info else fetch_object_info(args.url)
    try:
        prompt = ui_to_api(json.loads(args.workflow.read_text()), info)
    except WorkflowError as err:
        print(f"{args.workflow}: {err}", file=sys.stderr)
        return 1
    json.dump(prompt, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
