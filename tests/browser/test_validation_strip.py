"""Validation previews as a strip (web/lib/validation_strip.js), in headless Chromium against a real job.

A real training graph with a LyCORIS Validation node (every EVERY of STEPS steps, strengths 0 and 1) is
queued from the page: the strip on the LyCORIS Job node shows some images while the job still runs and
more later, each image loaded from ComfyUI's /view, the step under each image and the strength at the row
start; at the end the Job and Train nodes and the jobs tab show exactly the previews GET /lycoris/jobs/<id>
lists. A new page that loads the saved workflow fills the strip from that route (no events), in the
classic node style and in Nodes 2.0. Uses the page, fixtures and helpers of test_frontend.py.
"""

from __future__ import annotations

import os
import time

import pytest
import test_frontend as frontend
from test_frontend import (
    JOBS_TAB_BUTTON,
    SHOTS,
    _add_node,
    _connect,
    _fresh,
    _queue,
    _set_vue_nodes,
    _training_graph,
    open_comfy,
)

browser, ui = frontend.browser, frontend.ui  # its fixtures, set up for this module too (module scope)

pytestmark = pytest.mark.integration

STEPS, EVERY = 240, 40  # previews at steps 0, 40, ..., 240 (~5 s apart on a busy 2-core machine)
STRENGTHS = (0.0, 1.0)
ALL = {(step, strength) for step in range(0, STEPS + 1, EVERY) for strength in STRENGTHS}
ACTIVE = ("queued", "running", "waiting")

# The strip under `arg.root` (a node's widget element or a jobs-tab row): per cell its image's step and
# strength, whether the image loaded, the step label under it, and where both are drawn; per row its label.
STRIP = """(arg) => {
  const root = arg.node != null
    ? (window.comfyAPI?.app?.app ?? window.app).graph.getNodeById(arg.node).widgets
        .find((w) => w.name === 'lycoris_validation').element
    : document.querySelector(arg.selector);
  if (!root) return null;
  const box = (el) => { const r = el.getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width, h: r.height}; };
  const cells = [...root.querySelectorAll('.lycoris-val-cell')].map((cell) => {
    const img = cell.querySelector('img'), label = cell.querySelector('.lycoris-val-step');
    return {step: Number(img.dataset.step), strength: Number(img.dataset.strength), label: label.textContent,
            loaded: img.complete && img.naturalWidth > 0, src: img.getAttribute('src'), img: box(img), under: box(label)};
  });
  const rows = [...root.querySelectorAll('.lycoris-val-strength')].map((el) => ({text: el.textContent,
    strength: Number(el.dataset.strength), box: box(el)}));
  const strip = root.querySelector('.lycoris-val') ?? root;
  return {cells, rows, shown: box(strip), scrolled: strip.scrollLeft};
}"""


def _strip(ui, **where) -> dict | None:
    return ui.page.evaluate(STRIP, {"node": None, "selector": None, **where})


def _loaded(strip: dict | None) -> set[tuple[int, float]]:
    return {(c["step"], c["strength"]) for c in (strip or {"cells": []})["cells"] if c["loaded"]}


def _wait_loaded(ui, more_than: int, timeout_s: float = 240, **where) -> dict:
    """Polls until more than `more_than` of the strip's images have loaded; the strip then."""
    deadline = time.monotonic() + timeout_s
    while len(_loaded(strip := _strip(ui, **where))) <= more_than:
        assert time.monotonic() < deadline, f"the strip stayed at {len(_loaded(strip))} loaded images: {strip}"
        ui.page.wait_for_timeout(100)
    return strip


def _check_layout(strip: dict) -> None:
    """A grid: one column per step (in order), one row per strength (labelled at its start), the step
    under each image."""
    cells = strip["cells"]
    for cell in cells:
        assert cell["label"] == f"step {cell['step']}", cell
        assert "/view?" in cell["src"] and "filename=" in cell["src"], cell["src"]
        img, under = cell["img"], cell["under"]
        assert img["w"] >= 40 and img["h"] >= 40, f"thumbnail too small to see: {img}"
        assert under["y"] >= img["y"] + img["h"] - 1, f"the step is not under its image: {cell}"
        assert abs((under["x"] + under["w"] / 2) - (img["x"] + img["w"] / 2)) < 2, cell
    xs = {c["step"]: round(c["img"]["x"]) for c in cells}
    ys = {c["strength"]: round(c["img"]["y"]) for c in cells}
    for cell in cells:
        assert round(cell["img"]["x"]) == xs[cell["step"]] and round(cell["img"]["y"]) == ys[cell["strength"]], cell
    steps, strengths = sorted(xs), sorted(ys)
    assert [xs[s] for s in steps] == sorted(xs.values()), "columns are not in step order"
    assert [ys[s] for s in strengths] == sorted(ys.values()), "rows are not in strength order"
    assert sorted(r["strength"] for r in strip["rows"]) == strengths
    for row in strip["rows"]:
        assert row["text"] == f"×{row['strength']:.1f}"
        box, y = row["box"], ys[row["strength"]]
        assert abs(box["x"] - strip["shown"]["x"]) <= 2, f"the strength is not at the row start: {row}"
        if not strip["scrolled"]:  # (scrolled to the newest steps, the label stays at the start, over the old ones)
            assert box["x"] + box["w"] <= min(xs.values()) + 1, f"the strength covers the first step: {row}"
        assert y <= box["y"] + box["h"] / 2 <= y + 64, f"the strength label is not on its row: {row}"


def _server_previews(job: dict) -> set[tuple[int, float]]:
    return {(v["step"], v["strength"]) for v in job["validation"]}


def _validation_graph(ui, name: str) -> dict:
    ids = _training_graph(ui, STEPS, name)
    ids["empty"] = _add_node(ui, "EmptyFlux2LatentImage", 340, 520, width=64, height=64, batch_size=1)
    ids["validation"] = _add_node(ui, "LycorisValidation", 340, 700, steps=1, seed=7, every=EVERY,
                                  strengths=", ".join(f"{s:g}" for s in STRENGTHS))
    _connect(ui, ids["text"], 0, ids["validation"], "positive")
    _connect(ui, ids["empty"], 0, ids["validation"], "latent")
    _connect(ui, ids["validation"], 0, ids["train"], "validation")
    return ids


def test_the_strip_grows_on_the_node_while_the_job_trains(ui, browser, comfy_server):
    _fresh(ui)
    ui.page.locator(JOBS_TAB_BUTTON).first.click()
    ui.page.locator(".lycoris-jobs").wait_for()
    ids = _validation_graph(ui, f"browser/strip_{os.getpid()}")
    assert _strip(ui, node=ids["job"])["cells"] == [], "an idle node shows no previews"
    _queue(ui)

    first = _wait_loaded(ui, 0, node=ids["job"])
    job_id = ui.js("return app.graph.getNodeById(arg).properties.lycoris_job_id;", ids["job"])
    job = comfy_server.get(f"/lycoris/jobs/{job_id}")
    seen = _loaded(first)
    assert job["state"] in ACTIVE, f"the first previews were seen only after the job ended: {job['state']}"
    assert seen <= _server_previews(job) and len(seen) < len(ALL), (seen, job["validation"])
    later = _wait_loaded(ui, len(seen), node=ids["job"])
    job = comfy_server.get(f"/lycoris/jobs/{job_id}")
    assert _loaded(later) > seen and _loaded(later) <= _server_previews(job)
    assert job["state"] in ACTIVE and job["step"] < STEPS, "the strip grew only after the job ended"
    _check_layout(first)
    _check_layout(later)
    SHOTS.mkdir(parents=True, exist_ok=True)
    ui.page.screenshot(path=str(SHOTS / "validation_strip_growing.png"))

    final = _wait_loaded(ui, len(ALL) - 1, node=ids["job"])
    deadline = time.monotonic() + 120
    while (job := comfy_server.get(f"/lycoris/jobs/{job_id}"))["state"] in ACTIVE:
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["state"] == "done", job["message"]
    assert _server_previews(job) == ALL and _loaded(final) == ALL and len(final["cells"]) == len(ALL)
    _check_layout(final)
    train = _wait_loaded(ui, len(ALL) - 1, node=ids["train"])  # the Train node follows the same job
    assert _loaded(train) == ALL and len(train["cells"]) == len(ALL)
    ui.page.screenshot(path=str(SHOTS / "validation_strip_done.png"))

    # The jobs tab: the job's row opened its strip when the previews came
    row = f".lycoris-job-row[data-job-id='{job_id}']"
    in_tab = _wait_loaded(ui, len(ALL) - 1, selector=row)
    assert _loaded(in_tab) == ALL and len(in_tab["cells"]) == len(ALL)
    _check_layout(in_tab)
    ui.page.locator(row).screenshot(path=str(SHOTS / "validation_strip_tab.png"))
    toggle = ui.page.locator(f"{row} .lycoris-val-toggle")
    assert toggle.text_content() == f"▾ previews ({len(ALL)})"
    toggle.click()
    assert _strip(ui, selector=row)["cells"] == [] and toggle.text_content().startswith("▸")
    toggle.click()
    assert _loaded(_wait_loaded(ui, len(ALL) - 1, selector=row)) == ALL
    ui.page.locator(JOBS_TAB_BUTTON).first.click()  # closes the sidebar

    # A new page with the saved workflow: the strip fills from GET /lycoris/jobs/<id>, in both node styles
    workflow = ui.js("return JSON.stringify(app.graph.serialize());")
    context, fresh = open_comfy(browser, comfy_server.url)
    try:
        fresh.js("await app.loadGraphData(JSON.parse(arg), true, true, null);", workflow)
        reloaded = _wait_loaded(fresh, len(ALL) - 1, node=ids["job"])
        assert _loaded(reloaded) == ALL and len(reloaded["cells"]) == len(ALL)
        _check_layout(reloaded)
        assert any(f"/lycoris/jobs/{job_id}" in r and r.startswith("GET") for r in fresh.requests)
        _set_vue_nodes(fresh, True)
        try:
            fresh.js("const n = app.graph.getNodeById(arg); app.canvas.ds.offset = [120 - n.pos[0], 60 - n.pos[1]];"
                     "app.canvas.ds.scale = 1; app.canvas.setDirty(true, true);", ids["job"])
            fresh.page.wait_for_timeout(1500)
            vue = _wait_loaded(fresh, len(ALL) - 1, node=ids["job"])
            assert vue["shown"]["w"] > 100 and vue["shown"]["h"] >= 2 * 64, f"not drawn in Nodes 2.0: {vue['shown']}"
            _check_layout(vue)
            fresh.page.screenshot(path=str(SHOTS / "validation_strip_nodes2.png"))
        finally:
            _set_vue_nodes(fresh, False)
        # (registry look-ups of a loaded workflow's nodes fail offline: test_frontend covers those)
        ours = [e for e in ui.errors + fresh.errors if "lycoris" in e.lower() and not e.startswith("Failed to load resource")]
        assert not ours, "\n\n".join(ours)
    finally:
        context.close()
