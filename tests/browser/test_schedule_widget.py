"""The LyCORIS Strength Schedule's live plot (web/lib/schedule_widget.js) in headless Chromium.

The route's numbers against the window's hand-computed ramps and its errors naming the field; the plot
drawing on a new node and redrawing when a keyframe widget changes (pixels compared), the mode locking
the widgets it ignores, and after a run with a model the sampler's real steps marked (dashed once
steps change). Uses the page, fixtures and helpers of test_frontend.py.
"""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import test_frontend as frontend
from test_frontend import DPR, _add_node, _connect, _element, _fresh, _queue, _set_widget

browser, ui = frontend.browser, frontend.ui  # its fixtures, set up for this module too (module scope)

pytestmark = pytest.mark.integration

ROUTE = "/lycoris/strength/schedule"
CURVE = np.array([90, 200, 255])  # the curve's colour (schedule_widget.js CURVE_COLOUR)
_PLOTS: dict[int, str] = {}


def flat(frames: list[list[float]]) -> list[float]:
    return [x for frame in frames for x in frame]


def test_schedule_route_serves_the_curve_and_names_bad_fields(comfy_server):
    answer = comfy_server.get(f"/api{ROUTE}?mode=window&start=0.2&end=0.4&ramp=0.1&keyframes=&steps=4")
    assert flat(answer["keyframes"]) == pytest.approx([0.1, 0.0, 0.2, 1.0, 0.4, 1.0, 0.5, 0.0])
    at = dict(zip((round(p, 3) for p in answer["grid"]), answer["curve"]))
    # ramps by hand: 0 before 0.1, up to 1 at 0.2, 1 until 0.4, down to 0 at 0.5, 0 after
    assert [at[p] for p in (0.0, 0.15, 0.3, 0.45, 0.9)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    assert answer["marks"]["percents"] == [0.0, 0.25, 0.5, 0.75]
    assert answer["marks"]["values"] == pytest.approx([0.0, 1.0, 0.0, 0.0])
    given = comfy_server.get(f"{ROUTE}?mode=keyframes&keyframes=0%20%3D%202%0A1%20%3D%200&percents=0.25,0.5")
    assert given["marks"] == {"percents": [0.25, 0.5], "values": pytest.approx([1.5, 1.0])}
    for query, field in [("mode=window&start=0.5&end=0.2", "start/end"), ("mode=keyframes&keyframes=oops", "keyframes"),
                         ("mode=keyframes&keyframes=2%20%3D%201", "schedule"), ("mode=nope", "mode"),
                         ("mode=window&steps=0", "steps"), ("mode=window&percents=x", "percents"),
                         ("mode=window&start=x", "start")]:
        with pytest.raises(urllib.error.HTTPError) as refused:
            comfy_server.get(f"{ROUTE}?{query}")
        assert refused.value.code == 400
        assert json.loads(refused.value.read())["error"].startswith(f"{field}: "), query


def _wait_plot(ui, node_id: int, fragment: str, state: str = "ready", draws_after: int = 0) -> int:
    """Waits until the node's schedule canvas has drawn the answer for a query containing `fragment`."""
    if node_id not in _PLOTS:
        _PLOTS[node_id] = _element(ui, node_id, "schedule_plot")
    ui.page.wait_for_function(
        """(a) => { const c = document.querySelector(a.sel);
                    return c && c.dataset.state === a.state && (c.dataset.query || '').includes(a.fragment)
                           && Number(c.dataset.draws) > a.draws; }""",
        arg={"sel": _PLOTS[node_id], "fragment": fragment, "state": state, "draws": draws_after})
    ui.frames()
    return int(ui.page.locator(_PLOTS[node_id]).get_attribute("data-draws"))


def _curve_columns(image: np.ndarray) -> np.ndarray:
    """Per pixel column, the highest row where the curve is drawn (-1: none)."""
    on = np.abs(image - CURVE).sum(axis=2) < 40
    return np.where(on.any(axis=0), on.argmax(axis=0), -1)


def test_schedule_widget_draws_and_redraws_when_a_keyframe_changes(ui, comfy_server):
    _fresh(ui)
    _PLOTS.clear()
    node = _add_node(ui, "LycorisStrengthSchedule", 100, 80, steps=6)
    draws = _wait_plot(ui, node, "end=0.4")
    plot = ui.page.locator(_PLOTS[node])
    size = ui.js("const c = document.querySelector(arg); return [c.width, c.clientWidth];", _PLOTS[node])
    assert size[0] == size[1] * DPR, f"backing store not sized for DPR {DPR}: {size}"
    assert flat(json.loads(plot.get_attribute("data-keyframes"))) == pytest.approx([0.0, 1.0, 0.4, 1.0, 0.45, 0.0])
    assert (plot.get_attribute("data-steps"), plot.get_attribute("data-marks")) == ("even", "6")
    before = ui.shot(_PLOTS[node], "schedule_end_04.png")
    assert (_curve_columns(before) >= 0).sum() > 0.5 * before.shape[1], "the curve is drawn across the plot"

    requests = len([r for r in ui.requests if ROUTE in r])
    for value in (0.5, 0.6, 0.7, 0.8):  # dragged: one request after the debounce
        _set_widget(ui, node, "end", value)
    draws = _wait_plot(ui, node, "end=0.8", draws_after=draws)
    assert len([r for r in ui.requests if ROUTE in r]) == requests + 1
    assert flat(json.loads(plot.get_attribute("data-keyframes"))) == pytest.approx([0.0, 1.0, 0.8, 1.0, 0.85, 0.0])
    after = ui.shot(_PLOTS[node], "schedule_end_08.png")
    # the curve stays high twice as far: its high part (the top-most rows it reaches) is about twice as wide
    top_before, top_after = _curve_columns(before), _curve_columns(after)
    high = min(top_before[top_before >= 0].min(), top_after[top_after >= 0].min()) + 3
    ratio = ((top_after >= 0) & (top_after <= high)).sum() / ((top_before >= 0) & (top_before <= high)).sum()
    assert 1.6 < ratio < 2.4, f"high span ratio {ratio:.2f}, expected about 2"

    # keyframes mode: the window widgets are locked, the keyframes text draws
    _set_widget(ui, node, "mode", "keyframes")
    draws = _wait_plot(ui, node, "mode=keyframes", draws_after=draws)
    locked = ui.js("return app.graph.getNodeById(arg).widgets.filter((w) => w.disabled).map((w) => w.name);", node)
    assert set(locked) == {"start", "end", "ramp"}
    _set_widget(ui, node, "keyframes", "0 = 0\n1 = 2")
    draws = _wait_plot(ui, node, "keyframes=0+%3D+0", draws_after=draws)
    assert json.loads(plot.get_attribute("data-keyframes")) == [[0.0, 0.0], [1.0, 2.0]]
    _set_widget(ui, node, "keyframes", "oops")  # the server's message is shown
    draws = _wait_plot(ui, node, "keyframes=oops", state="error", draws_after=draws)
    ui.shot(_PLOTS[node], "schedule_error.png")
    _set_widget(ui, node, "keyframes", "0 = 1\n0.3 = 1\n0.31 = 0")

    # the plot is no input: the prompt runs as built; after a run with a model, its real steps are marked
    model = _add_node(ui, "LycorisTinyModel", 20, 420, width=64, heads=2, context_dim=32)
    shown = _add_node(ui, "PreviewImage", 520, 80)
    _connect(ui, model, 0, node, "model")
    _connect(ui, node, 1, shown, "images")
    draws = _wait_plot(ui, node, "0.31", draws_after=draws)
    assert plot.get_attribute("data-steps") == "even"
    prompt = ui.js("return app.graphToPrompt().then((p) => p.output);")
    assert "schedule_plot" not in prompt[str(node)]["inputs"]
    _queue(ui)
    ui.page.wait_for_function("(sel) => document.querySelector(sel).dataset.steps === 'run' && "
                              "document.querySelector(sel).dataset.state === 'ready'", arg=_PLOTS[node], timeout=60_000)
    assert plot.get_attribute("data-marks") == "6" and "percents=0" in plot.get_attribute("data-query")
    ui.shot(_PLOTS[node], "schedule_with_steps.png")
    _set_widget(ui, node, "steps", 8)
    ui.page.wait_for_function("(sel) => document.querySelector(sel).dataset.steps === 'stale'", arg=_PLOTS[node])
