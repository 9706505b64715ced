// Shared by the pack's widgets: callback chaining, a DPR-sized canvas that repaints once per frame,
// the live-plot widget of the mask and schedule nodes, text helpers and the colours of core/mask_plot.py.
import { api } from "../../../scripts/api.js";
import { app } from "../../../scripts/app.js";

const LIVE_FETCH_DELAY_MS = 150; // live plots wait for typing to pause before they ask the server

// Colours of core/mask_plot.py, so the live widget and the executed image read alike.
export const C = {
  bg: "rgb(30,31,36)", text: "rgb(228,228,232)", frame: "rgb(130,132,140)", unlit: "rgb(52,56,66)",
  lit: "rgb(238,176,60)", curves: ["rgb(255,255,255)", "rgb(80,200,255)", "rgb(230,110,255)",
    "rgb(120,225,110)", "rgb(175,175,255)"],
  raw: "rgba(80,200,255,0.35)", smooth: "rgb(80,200,255)", error: "rgb(255,110,110)",
};

/** Wraps obj[name] so that the existing handler (if any) runs first, then fn. */
export function chain(obj, name, fn) {
  const original = obj[name];
  obj[name] = function (...args) {
    const result = original?.apply(this, args);
    fn.apply(this, args);
    return result;
  };
}

/** A <canvas> whose backing store follows its CSS size x devicePixelRatio x canvas zoom; paints
 *  at most once per animation frame however many times `request()` is called. */
export class FrameCanvas {
  constructor(paint, className) {
    this.paint = paint;
    this.frame = 0;
    this.canvas = document.createElement("canvas");
    this.canvas.className = className;
    this.canvas.dataset.draws = "0";
    Object.assign(this.canvas.style, { width: "100%", height: "100%", display: "block", minHeight: "0" });
    this.observer = new ResizeObserver(() => this.request());
    this.observer.observe(this.canvas);
  }
  scale() {
    const zoom = app.canvas?.ds?.scale ?? 1;
    return (window.devicePixelRatio || 1) * Math.min(Math.max(zoom, 1), 4);
  }
  /** Called on every graph draw: repaints only when zooming changed the wanted backing size. */
  fit() {
    const s = this.scale();
    if (this.canvas.width !== Math.round(this.canvas.clientWidth * s)) this.request();
  }
  request() {
    if (!this.frame) this.frame = requestAnimationFrame(() => { this.frame = 0; this.draw(); });
  }
  draw() {
    const { canvas } = this;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (!w || !h) return;
    const s = this.scale();
    const pw = Math.round(w * s), ph = Math.round(h * s);
    if (canvas.width !== pw || canvas.height !== ph) { canvas.width = pw; canvas.height = ph; }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(s, 0, 0, s, 0, 0);
    this.paint(ctx, w, h);
    canvas.dataset.draws = String(Number(canvas.dataset.draws) + 1);
  }
  dispose() {
    cancelAnimationFrame(this.frame);
    this.frame = 0;
    this.observer.disconnect();
  }
}

export function label(ctx, text, x, y, colour = C.text, align = "left", baseline = "alphabetic") {
  ctx.fillStyle = colour;
  ctx.textAlign = align;
  ctx.textBaseline = baseline;
  ctx.fillText(text, x, y);
}

/** Wraps text to the width, one line per 13 px from y. */
export function paragraph(ctx, text, x, y, width, colour) {
  let line = "";
  for (const word of String(text).split(/\s+/)) {
    const next = line ? `${line} ${word}` : word;
    if (line && ctx.measureText(next).width > width) { label(ctx, line, x, y, colour); y += 13; line = word; }
    else line = next;
  }
  if (line) label(ctx, line, x, y, colour);
}

/** Adds a <style> element once per id (the pack's widgets style their controls with classes). */
export function installStyles(id, css) {
  if (document.getElementById(id)) return;
  const style = document.createElement("style");
  style.id = id;
  style.textContent = css;
  document.head.append(style);
}

/** A live plot under `node`'s widgets (T-LoRA mask, strength schedule): `paint(ctx, w, h)` draws `view`.
 *  It refetches `route?query` (debounced) when one of `widgets` calls back, a link changes, a workflow loads,
 *  the node runs (`view.ran` = `output[outputKey][0]`) or `watchKey()` changes (checked on every draw and
 *  every 400 ms: Nodes 2.0 draws no canvas node). `prepare()` gives the fetch's `{query, ...}`; `done(ask,
 *  dataset)` sees it again after `view.data` / `view.error` are set, for notes and the tests' dataset. */
export function addLivePlot(node, view, { name, className, route, what, paint, widgets, outputKey, minHeight, height,
                                          prepare, done, watchKey }) {
  const frame = new FrameCanvas(paint, `${className}-canvas`);
  const load = async () => {
    const ask = prepare();
    view.request?.abort();
    const request = (view.request = new AbortController());
    frame.canvas.dataset.state = "loading";
    let state;
    try {
      const res = await api.fetchApi(`${route}?${ask.query}`, { signal: request.signal });
      const body = await res.json().catch(() => ({}));
      if (request.signal.aborted) return;
      if (res.ok) { view.data = body; view.error = null; state = "ready"; }
      else { view.error = body.error || `${what} route answered HTTP ${res.status}`; state = "error"; }
    } catch (err) {
      if (request.signal.aborted) return;
      view.error = `${what} route unreachable: ${err.message || err}`;
      state = "error";
    }
    done(ask, frame.canvas.dataset);
    frame.canvas.dataset.query = ask.query; // read by the browser tests
    frame.canvas.dataset.state = state;
    frame.request();
  };
  const schedule = () => {
    clearTimeout(view.timer);
    view.timer = setTimeout(load, LIVE_FETCH_DELAY_MS);
  };
  const watch = () => {
    const key = watchKey();
    if (key !== view.key) { view.key = key; schedule(); }
  };
  for (const widgetName of widgets) {
    const widget = node.widgets?.find((w) => w.name === widgetName);
    if (widget) chain(widget, "callback", schedule);
  }
  const widget = node.addDOMWidget(name, className, frame.canvas, {
    serialize: false, // not an input: keeps it out of the prompt
    hideOnZoom: true,
    getMinHeight: () => minHeight,
    getHeight: () => height,
    onDraw: () => { frame.fit(); watch(); },
  });
  widget.serialize = false; // and out of the workflow's widgets_values
  chain(node, "onConfigure", schedule); // a loaded workflow sets values without callbacks
  chain(node, "onConnectionsChange", schedule);
  chain(node, "onExecuted", (output) => {
    const ran = output?.[outputKey]?.[0];
    if (ran) { view.ran = ran; schedule(); }
  });
  const poll = setInterval(watch, 400);
  chain(node, "onRemoved", () => {
    clearTimeout(view.timer);
    clearInterval(poll);
    view.request?.abort();
    frame.dispose();
  });
  node.setSize?.([Math.max(node.size[0], 320), node.computeSize()[1]]);
  schedule();
}
