"""The pack's web extension (web/lycoris.js) in the real frontend of the server under test, in headless Chromium.

Covers: the mask route's numbers and errors, node registration, the node library, the T-LoRA mask
widget redrawing when alpha changes (pixels compared), the strength slider, the job widget fed by
websocket events (a stub Job node where the trainer has not landed) and the jobs sidebar tab.

Chromium comes from Debian (`apt-get install chromium`) and playwright from PyPI (pinned in
requirements-lock.txt); `scripts/setup.sh` installs both, and the `browser` fixture installs what is
still missing. The browser tests are skipped, with the reason, only where no browser can be installed.
Screenshots land in test-artifacts/browser/.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyenv import REPO
from comfyserver import ARTIFACTS
from comfyui_lycoris.nodes import NODE_CLASS_MAPPINGS

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = ARTIFACTS / "browser"
DPR = 2  # a HiDPI page, so the widgets' devicePixelRatio sizing is exercised
LIT = np.array([238, 176, 60])  # colour of an active rank in the mask plot (core/mask_plot.py LIT[0])

APP = "window.comfyAPI.app.app"
API = "window.comfyAPI.api.api"


# ---------------------------------------------------------------- browser provisioning


def _tail(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _ensure_chromium() -> str | None:
    """None once /usr/bin/chromium exists (installed from Debian when missing), else why it cannot."""
    if CHROMIUM.exists():
        return None
    if shutil.which("apt-get") is None:
        return f"{CHROMIUM} is missing and there is no apt-get to install Debian's chromium"
    if os.geteuid() != 0:
        return f"{CHROMIUM} is missing; installing it needs root: apt-get install -y chromium"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    why = ""
    for cmd in (["apt-get", "install", "-y", "chromium"], ["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        why = f"{' '.join(cmd)}: {_tail(done.stderr or done.stdout)}"
        if CHROMIUM.exists():
            return None
    return f"{CHROMIUM} could not be installed ({why})"


def _lock_pin(name: str) -> str | None:
    lock = (REPO / "requirements-lock.txt").read_text()
    match = re.search(rf"^{re.escape(name)}==(\S+)", lock, re.MULTILINE | re.IGNORECASE)
    return match.group(1) if match else None


def _ensure_playwright() -> str | None:
    """None once playwright imports (installed from PyPI, at the lock's version, when missing)."""
    if importlib.util.find_spec("playwright") is not None:
        return None
    pin = _lock_pin("playwright")
    spec = f"playwright=={pin}" if pin else "playwright"
    done = subprocess.run([sys.executable, "-m", "pip", "install", spec], capture_output=True, text=True, timeout=600)
    importlib.invalidate_caches()
    if importlib.util.find_spec("playwright") is None:
        return f"pip install {spec} failed: {_tail(done.stderr or done.stdout)}"
    return None


@pytest.fixture(scope="module")  # module: a second sync playwright (other test files) cannot start while one runs
def browser():
    """Headless Debian Chromium driven by playwright; skips (printing why) where none can be installed."""
    why = _ensure_chromium() or _ensure_playwright()
    if why:
        print(f"browser tests skipped: {why}", file=sys.stderr)
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """The loaded ComfyUI page, plus the errors it logged and the requests it made."""

    def __init__(self, page):
        self.page = page
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("pageerror", lambda err: self.errors.append(f"{err.name}: {err.message}\n{err.stack}"))
        page.on("console", lambda msg: msg.type == "error" and self.errors.append(f"{msg.text} @ {msg.location}"))
        page.on("request", lambda req: self.requests.append(f"{req.method} {req.url}"))

    def js(self, body: str, arg=None):
        """Runs `body` as a function of `arg` with `app`, `api` and `LiteGraph` in scope."""
        return self.page.evaluate(f"(arg) => {{ const app = {APP}, api = {API}; {body} }}", arg)

    def shot(self, selector: str, name: str) -> np.ndarray:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / name
        self.page.locator(selector).first.screenshot(path=str(path))
        return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def ui(comfy_server, browser):
    tutorial_done = comfy_server.get("/settings").get("Comfy.TutorialCompleted", False)
    context = browser.new_context(viewport={"width": 1280, "height": 800}, device_scale_factor=DPR)
    page = context.new_page()
    page.set_default_timeout(15_000)
    ui = Page(page)
    page.goto(comfy_server.url)
    page.wait_for_function(f"() => {APP}?.graph && window.LiteGraph?.registered_node_types?.LycorisApply",
                           timeout=45_000)
    if not tutorial_done:  # a first visit opens the Templates dialog over the canvas
        dialog = page.locator(".p-dialog", has_text="Templates")
        dialog.wait_for(state="visible")
        dialog.locator("button:has(i.pi-times)").click()  # its close button (Escape does not close it)
        dialog.wait_for(state="hidden")
    ui.js("app.graph.clear(); app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 1;")
    yield ui
    context.close()


def _add_node(ui: Page, node_type: str, x: int, y: int) -> int:
    return ui.js("""const node = LiteGraph.createNode(arg.type); node.pos = [arg.x, arg.y];
                    app.graph.add(node); app.canvas.setDirty(true, true); return node.id;""",
                 {"type": node_type, "x": x, "y": y})


def _set_widget(ui: Page, node_id: int, name: str, value) -> None:
    """As the canvas does on an edit: set the value, then call the widget's callback."""
    ui.js("""const node = app.graph.getNodeById(arg.id); const w = node.widgets.find((w) => w.name === arg.name);
             w.value = arg.value; w.callback?.(w.value, app.canvas, node, [0, 0], undefined);""",
          {"id": node_id, "name": name, "value": value})


def _wait_mask(ui: Page, fragment: str, state: str = "ready", draws_after: int = 0) -> int:
    """Waits until the mask canvas has drawn the answer for a query containing `fragment`."""
    ui.page.wait_for_function(
        """(a) => { const c = document.querySelector('.lycoris-mask-canvas');
                    return c && c.dataset.state === a.state && (c.dataset.query || '').includes(a.fragment)
                           && Number(c.dataset.draws) > a.draws; }""",
        arg={"fragment": fragment, "state": state, "draws": draws_after})
    ui.page.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
    return int(ui.page.locator(".lycoris-mask-canvas").get_attribute("data-draws"))


def _lit_pixels(image: np.ndarray) -> int:
    return int((np.abs(image - LIT).sum(axis=2) < 30).sum())


# ---------------------------------------------------------------- the route (no browser)


def test_mask_route_serves_the_schedule_and_names_bad_fields(comfy_server):
    answer = comfy_server.get("/api/lycoris/tlora/mask?rank=64&min_rank=1&alpha=1.0&alphas=2&step=250")
    assert answer["timesteps"] == [0, 250, 500, 750, 1000]
    assert answer["curves"] == {"1.0": [64, 48, 32, 16, 1], "2.0": [64, 36, 16, 4, 1]}  # FACTS.md §4
    for query, field in [("rank=0&min_rank=0&alpha=1", "rank"), ("rank=8&min_rank=9&alpha=1", "min_rank"),
                         ("rank=8&min_rank=1&alpha=-1", "alpha"), ("rank=8&min_rank=1&alpha=1&alphas=x", "alphas"),
                         ("rank=8.5&min_rank=1&alpha=1", "rank"), ("min_rank=1&alpha=1", "rank")]:
        with pytest.raises(urllib.error.HTTPError) as refused:
            comfy_server.get(f"/lycoris/tlora/mask?{query}")
        assert refused.value.code == 400
        assert json.loads(refused.value.read())["error"].startswith(f"{field}: "), query


# ---------------------------------------------------------------- the frontend


def test_frontend_loads_the_extension_and_knows_every_node(ui, comfy_server):
    assert "/extensions/comfyui-lycoris/lycoris.js" in comfy_server.get("/extensions")
    assert "lycoris.nodes" in ui.js("return app.extensions.map((e) => e.name);")
    known = ui.js("return Object.keys(LiteGraph.registered_node_types);")
    assert {"LycorisTLoraMaskVisualizer", "LycorisApply", "LycorisConfig"} <= set(known)
    assert set(NODE_CLASS_MAPPINGS) <= set(known)


def test_node_library_lists_the_pack(ui):
    ui.page.click(".node-library-tab-button")
    ui.page.locator(".node-lib-search-box input").fill("LyCORIS")
    tree = ui.page.locator(".node-lib-tree-explorer")
    for name in ["Apply LyCORIS", "LyCORIS Config", "T-LoRA Mask Visualizer"]:
        tree.get_by_text(name, exact=True).wait_for()
    ui.page.screenshot(path=str(SHOTS / "node_library.png"))
    ui.page.click(".node-library-tab-button")  # closes the sidebar again
    tree.wait_for(state="detached")


def test_mask_widget_redraws_from_the_server_when_alpha_changes(ui, comfy_server):
    node = _add_node(ui, "LycorisTLoraMaskVisualizer", 100, 160)
    draws = _wait_mask(ui, "alpha=1&")
    size = ui.js("const c = document.querySelector('.lycoris-mask-canvas');"
                 "return [c.width, c.height, c.clientWidth, c.clientHeight];")
    assert size[0] == size[2] * DPR and size[1] == size[3] * DPR, f"backing store not sized for DPR {DPR}: {size}"
    before = ui.shot(".lycoris-mask-canvas", "mask_alpha_1.png")

    mask_requests = len([r for r in ui.requests if "/lycoris/tlora/mask" in r])
    for value in (1.5, 2.0, 2.5, 3.0):  # typed quickly: one request after the debounce
        _set_widget(ui, node, "alpha", value)
    draws = _wait_mask(ui, "alpha=3&", draws_after=draws)
    assert len([r for r in ui.requests if "/lycoris/tlora/mask" in r]) == mask_requests + 1
    after = ui.shot(".lycoris-mask-canvas", "mask_alpha_3.png")

    assert before.shape == after.shape
    changed = (np.abs(before - after).sum(axis=2) > 30).mean()
    assert changed > 0.05, f"only {changed:.1%} of the pixels changed"
    # Lit area ~ integral of ((T - t) / T) ** alpha: 1/2 at alpha 1, 1/4 at alpha 3.
    ratio = _lit_pixels(after) / _lit_pixels(before)
    assert 0.4 < ratio < 0.6, f"lit area ratio {ratio:.2f}, expected about 0.5"

    # The plot is no input: the prompt the frontend builds runs as before, with the new alpha.
    prompt = ui.js("return app.graphToPrompt().then((p) => p.output);")
    assert "mask_plot" not in prompt[str(node)]["inputs"] and prompt[str(node)]["inputs"]["alpha"] == 3
    assert comfy_server.run(prompt)[str(node)]["images"]

    _set_widget(ui, node, "min_rank", 100)  # a bad value: the server's message is shown
    draws = _wait_mask(ui, "min_rank=100", state="error", draws_after=draws)
    ui.shot(".lycoris-mask-canvas", "mask_error.png")
    _set_widget(ui, node, "min_rank", 4)
    _set_widget(ui, node, "compare_alphas", "0.5, 1")
    _wait_mask(ui, "alphas=0.5", draws_after=draws)
    ui.shot(".lycoris-mask-canvas", "mask_compare.png")


def test_apply_strength_is_a_number_widget(ui):
    """As core's LoRA loader: a number widget (a slider over -10..10 made 0..1.5 about 20 pixels)."""
    node = _add_node(ui, "LycorisApply", 480, 160)
    widget = ui.js("const w = app.graph.getNodeById(arg).widgets.find((w) => w.name === 'strength');"
                   "return {type: w.type, min: w.options.min, max: w.options.max};", node)
    assert widget == {"type": "number", "min": -10, "max": 10}
    ui.page.wait_for_timeout(100)
    ui.page.screenshot(path=str(SHOTS / "canvas.png"))


def _progress(ui: Page, job_id: str, steps: range, total: int) -> None:
    ui.js("""for (const step of arg.steps) {
               const loss = 0.5 * Math.exp(-step / 15) + 0.1 + 0.05 * Math.sin(step * 1.7);
               api.dispatchCustomEvent('lycoris.job.progress', {job_id: arg.id, step, steps: arg.total, loss,
                 lr: 1e-4, its: 2.5, eta_s: (arg.total - step) / 2.5, state: 'running'});
             }""", {"id": job_id, "steps": list(steps), "total": total})


def test_jobs_tab_and_job_widget_follow_the_events(ui):
    ui.page.click(".lycoris-jobs-tab-button")
    tab = ui.page.locator(".lycoris-jobs")
    tab.get_by_text("no jobs").wait_for()  # GET /lycoris/jobs is 404 until the trainer lands

    job_type = "LycorisJob"
    if not ui.js("return !!LiteGraph.registered_node_types[arg];", job_type):  # stub until the trainer lands
        ui.js("""return app.registerNodeDef(arg, {name: arg, display_name: 'LyCORIS Job (test stub)',
                   category: 'LyCORIS', description: '', python_module: 'test', input: {required: {}},
                   output: [], output_name: [], output_is_list: [], output_node: true});""", job_type)
    node = _add_node(ui, job_type, 480, 320)
    ui.js("app.graph.getNodeById(arg).onExecuted({job_id: ['job-1']});", node)
    _progress(ui, "job-1", range(1, 41), 100)
    status = ui.page.locator(".lycoris-job-status")
    status.get_by_text(re.compile(r"running · step 40/100 · 2\.50 it/s · ETA 0:24 · loss")).wait_for()
    ui.page.wait_for_function("() => Number(document.querySelector('.lycoris-loss-canvas').dataset.draws) > 0")
    row = tab.locator(".lycoris-job-row[data-job-id='job-1']")
    row.get_by_text("step 40/100", exact=False).wait_for()
    ui.shot(".lycoris-job", "job_widget.png")
    ui.page.screenshot(path=str(SHOTS / "jobs_tab.png"))

    cancels = []

    def answer(route):
        cancels.append(f"{route.request.method} {route.request.url}")
        route.fulfill(status=200, content_type="application/json", body="{}")

    ui.page.route("**/lycoris/jobs/*/cancel", answer)
    ui.page.locator(".lycoris-job .lycoris-cancel").click()
    status.get_by_text("cancelling…", exact=False).wait_for()
    assert ui.page.locator(".lycoris-job .lycoris-cancel").is_disabled()
    assert cancels and cancels[0].startswith("POST ") and cancels[0].endswith("/api/lycoris/jobs/job-1/cancel")
    ui.js("api.dispatchCustomEvent('lycoris.job.state', {job_id: 'job-1', state: 'cancelled', message: 'by user'});")
    status.get_by_text(re.compile(r"^cancelled · .* · by user$")).wait_for()
    assert row.locator("button").is_disabled()
    ui.page.click(".lycoris-jobs-tab-button")


def test_node_removal_and_no_errors_from_the_extension(ui):
    ui.js("for (const node of [...app.graph.nodes]) app.graph.remove(node);")
    _progress(ui, "job-1", range(41, 43), 100)  # events after removal reach no widget and raise nothing
    ui.page.wait_for_timeout(300)
    # HTTP errors the tests provoke (a bad min_rank, the jobs route before the trainer) are logged too
    ours = [e for e in ui.errors if "lycoris" in e.lower() and not e.startswith("Failed to load resource")]
    assert not ours, "\n\n".join(ours)


def test_a_real_training_job_feeds_the_loss_chart(ui, comfy_server):
    """A tiny job trained by the server: its websocket progress events reach the Job node's chart."""
    from graphs import train_prompt

    outputs = comfy_server.run(train_prompt(steps=40, output_name="browser/run", save_every=20))
    job_id = outputs["train"]["job_id"][0]
    node = _add_node(ui, "LycorisJob", 480, 320)
    ui.js("app.graph.getNodeById(arg.node).onExecuted({job_id: [arg.id]});", {"node": node, "id": job_id})
    ui.page.wait_for_function(
        """(id) => { const s = [...document.querySelectorAll('.lycoris-job-status')].map(e => e.textContent);
                     return s.some(t => /step ([3-9]|[1-4][0-9])\\/40/.test(t)); }""", arg=job_id, timeout=120_000)
    ui.page.wait_for_function("() => [...document.querySelectorAll('.lycoris-loss-canvas')]"
                              ".some(c => Number(c.dataset.draws) > 1)")
    points = ui.js("return app.graph.getNodeById(arg).widgets.length;", node)
    assert points >= 1
    ui.page.screenshot(path=str(SHOTS / "real_job.png"))
    comfy_server.post(f"/lycoris/jobs/{job_id}/cancel", {})
    ui.js("app.graph.remove(app.graph.getNodeById(arg));", node)
