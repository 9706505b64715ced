// T-LoRA Mask Visualizer: a live plot of r(t) for the node's rank / min_rank / alpha / compare_alphas.
// The numbers come from GET /lycoris/tlora/mask (core.tlora, the pack's one copy of the schedule);
// this module only draws them.
import { api } from "../../../scripts/api.js";
import { C, chain, FrameCanvas, label, paragraph } from "./common.js";

export const MASK_NODE = "LycorisTLoraMaskVisualizer";
const MASK_ROUTE = "/lycoris/tlora/mask";
const MASK_WIDGETS = ["rank", "min_rank", "alpha", "compare_alphas"];
const FETCH_DELAY_MS = 150;
const MASK_STEP = 5; // timestep spacing of the plotted columns

function paintMask(ctx, w, h, view) {
  ctx.fillStyle = C.bg;
  ctx.fillRect(0, 0, w, h);
  ctx.font = "10px sans-serif";
  const { data } = view;
  const pad = { l: 30, r: 8, t: 18, b: 16 };
  const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
  if (data && pw > 10 && ph > 10) {
    const { rank, timesteps } = data;
    const curves = Object.entries(data.curves);
    const T = timesteps[timesteps.length - 1] || 1;
    const x = (t) => pad.l + (t / T) * pw;
    const y = (r) => pad.t + ph - (r / rank) * ph;
    const right = (i) => (i + 1 < timesteps.length ? x(timesteps[i + 1]) : pad.l + pw);
    ctx.fillStyle = C.unlit;
    ctx.fillRect(pad.l, pad.t, pw, ph);
    ctx.fillStyle = C.lit; // ranks [0, r(t)) of the first alpha, rank 0 at the bottom
    ctx.beginPath();
    ctx.moveTo(pad.l, pad.t + ph);
    curves[0][1].forEach((r, i) => { ctx.lineTo(x(timesteps[i]), y(r)); ctx.lineTo(right(i), y(r)); });
    ctx.lineTo(pad.l + pw, pad.t + ph);
    ctx.fill();
    ctx.lineWidth = 1.5;
    curves.forEach(([, values], k) => {
      ctx.strokeStyle = C.curves[k % C.curves.length];
      ctx.beginPath();
      values.forEach((r, i) => {
        const yr = Math.max(pad.t + 0.75, y(r) - 0.75); // just above the lit cells
        if (i === 0) ctx.moveTo(x(timesteps[i]), yr); else ctx.lineTo(x(timesteps[i]), yr);
        ctx.lineTo(right(i), yr);
      });
      ctx.stroke();
    });
    ctx.strokeStyle = C.frame;
    ctx.lineWidth = 1;
    ctx.strokeRect(pad.l - 0.5, pad.t - 0.5, pw + 1, ph + 1);
    label(ctx, String(rank), pad.l - 4, pad.t, C.text, "right", "top");
    if (y(data.min_rank) > pad.t + 12 && y(data.min_rank) < pad.t + ph - 12) {
      label(ctx, String(data.min_rank), pad.l - 4, y(data.min_rank), C.text, "right", "middle");
    }
    label(ctx, "0", pad.l - 4, pad.t + ph, C.text, "right", "bottom");
    for (const t of [0, T / 2, T]) {
      label(ctx, t === 0 ? "t 0" : String(t), x(t), h - 3, C.text, t === 0 ? "left" : t === T ? "right" : "center");
    }
    let lx = pad.l; // legend: one swatch per alpha, the first one lights the heatmap
    curves.forEach(([alpha], k) => {
      const text = `α ${Number(alpha)}${k === 0 ? " (lit)" : ""}`;
      ctx.fillStyle = C.curves[k % C.curves.length];
      ctx.fillRect(lx, 6, 10, 3);
      label(ctx, text, lx + 13, 11);
      lx += 22 + ctx.measureText(text).width;
    });
  } else if (!view.error) {
    label(ctx, "loading…", w / 2, h / 2, C.frame, "center", "middle");
  }
  if (view.note) label(ctx, view.note, w - pad.r - 4, pad.t + 12, C.text, "right"); // over the unlit corner
  if (view.error) {
    ctx.fillStyle = "rgba(30,31,36,0.85)";
    ctx.fillRect(0, 0, w, h);
    paragraph(ctx, view.error, 8, 20, w - 16, C.error);
  }
}

/** The plot on a T-LoRA Mask Visualizer node: asks the server for r(t) whenever an input changes. */
export function addMaskWidget(node) {
  const view = { data: null, error: null, note: "", timer: 0, request: null };
  const frame = new FrameCanvas((ctx, w, h) => paintMask(ctx, w, h, view), "lycoris-mask-canvas");
  const widgetValue = (name) => node.widgets?.find((w) => w.name === name)?.value;

  const query = () => {
    const params = new URLSearchParams({
      rank: String(Math.round(Number(widgetValue("rank")))),
      min_rank: String(Math.round(Number(widgetValue("min_rank")))),
      alpha: String(widgetValue("alpha")),
      alphas: String(widgetValue("compare_alphas") ?? ""),
      step: String(MASK_STEP),
    });
    return params.toString();
  };

  const load = async () => {
    const q = query();
    view.request?.abort();
    const request = (view.request = new AbortController());
    frame.canvas.dataset.state = "loading";
    let state;
    try {
      const res = await api.fetchApi(`${MASK_ROUTE}?${q}`, { signal: request.signal });
      const body = await res.json().catch(() => ({}));
      if (request.signal.aborted) return;
      if (res.ok) { view.data = body; view.error = null; state = "ready"; }
      else { view.error = body.error || `mask route answered HTTP ${res.status}`; state = "error"; }
    } catch (err) {
      if (request.signal.aborted) return;
      view.error = `mask route unreachable: ${err.message || err}`;
      state = "error";
    }
    frame.canvas.dataset.state = state; // state, query and draws are read by the browser test
    frame.canvas.dataset.query = q;
    frame.request();
  };
  const schedule = () => {
    clearTimeout(view.timer);
    view.timer = setTimeout(load, FETCH_DELAY_MS);
  };
  const noteConfig = () => {
    const linked = node.inputs?.find((i) => i.name === "config")?.link != null;
    const note = linked ? "config connected: its values apply when run" : "";
    if (note !== view.note) { view.note = note; frame.request(); }
  };

  for (const name of MASK_WIDGETS) {
    const widget = node.widgets?.find((w) => w.name === name);
    if (widget) chain(widget, "callback", schedule);
  }
  const widget = node.addDOMWidget("mask_plot", "lycoris-mask", frame.canvas, {
    serialize: false, // not an input: keeps it out of the prompt
    hideOnZoom: true,
    getMinHeight: () => 150,
    getHeight: () => 190,
    onDraw: () => frame.fit(),
  });
  widget.serialize = false; // and out of the workflow's widgets_values
  chain(node, "onConfigure", () => { schedule(); noteConfig(); }); // a loaded workflow sets values without callbacks
  chain(node, "onConnectionsChange", noteConfig);
  chain(node, "onRemoved", () => {
    clearTimeout(view.timer);
    view.request?.abort();
    frame.dispose();
  });
  node.setSize?.([Math.max(node.size[0], 320), node.computeSize()[1]]);
  schedule();
}
