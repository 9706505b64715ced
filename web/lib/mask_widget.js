// T-LoRA Mask Visualizer: a live plot of r(t) for the node's rank / min_rank / alpha / compare_alphas.
// The numbers come from GET /lycoris/tlora/mask (core.tlora, the pack's one copy of the schedule);
// this module only draws them. With a config connected the plot shows that config's values (asked of
// the same route with the LyCORIS Config node's preset and JSON, or taken from the last run) and the
// node's own rank / min_rank / alpha are disabled, as the run ignores them. The sampler's steps of the
// last run with a model are marked, as on the executed image.
import { addLivePlot, C, label, paragraph } from "./common.js";

export const MASK_NODE = "LycorisTLoraMaskVisualizer";
const MASK_ROUTE = "/lycoris/tlora/mask";
const MASK_WIDGETS = ["rank", "min_rank", "alpha", "compare_alphas"];
const CONFIG_WIDGETS = ["rank", "min_rank", "alpha"]; // replaced by a connected config's values
const SCHEDULE_WIDGETS = ["scheduler", "steps", "denoise"];
const STEP_COLOUR = "rgb(240,60,60)"; // core/mask_plot.py STEP
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
    const marks = view.marks?.timesteps ?? [];
    if (marks.length) { // the sampler's steps, index on top (every few when crowded), as the executed image
      ctx.strokeStyle = STEP_COLOUR;
      ctx.lineWidth = 1;
      ctx.setLineDash(view.marks.stale ? [3, 3] : []);
      const every = Math.max(1, Math.ceil(marks.length / Math.max(1, pw / 18)));
      marks.forEach((t, i) => {
        const xt = Math.round(x(Math.min(Math.max(t, 0), T))) + 0.5;
        ctx.beginPath();
        ctx.moveTo(xt, pad.t);
        ctx.lineTo(xt, pad.t + ph);
        ctx.stroke();
        if (i % every === 0) label(ctx, String(i), xt, pad.t - 1, STEP_COLOUR, "center", "bottom");
      });
      ctx.setLineDash([]);
    }
    label(ctx, "t 0 (clean)", x(0), h - 3, C.text, "left");
    label(ctx, String(T / 2), x(T / 2), h - 3, C.text, "center");
    label(ctx, `${T} (noise)`, x(T), h - 3, C.text, "right");
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
  if (view.note) { // over the unlit corner
    const lines = view.note.split("\n");
    lines.forEach((line, i) => label(ctx, line, w - pad.r - 4, pad.t + 12 + 12 * i, C.text, "right"));
  }
  if (view.error) {
    ctx.fillStyle = "rgba(30,31,36,0.85)";
    ctx.fillRect(0, 0, w, h);
    paragraph(ctx, view.error, 8, 20, w - 16, C.error);
  }
}

/** The LyCORIS Config node feeding `node`'s config input (through reroutes), the input's link state. */
function configSource(node) {
  const slot = node.findInputSlot?.("config") ?? node.inputs?.findIndex((i) => i.name === "config");
  const linked = slot != null && slot >= 0 && node.inputs?.[slot]?.link != null;
  let source = linked ? node.getInputNode?.(slot) : null;
  for (let hops = 0; source && source.type === "Reroute" && hops < 32; hops++) source = source.getInputNode?.(0);
  return { linked, config: source?.type === "LycorisConfig" ? source : null };
}

/** The plot on a T-LoRA Mask Visualizer node: asks the server for r(t) whenever an input changes. */
export function addMaskWidget(node) {
  const view = { data: null, error: null, note: "", timer: 0, request: null, key: "", ran: null, marks: null };
  const widgetOf = (name) => node.widgets?.find((w) => w.name === name);
  const widgetValue = (name) => widgetOf(name)?.value;
  const modelLinked = () => node.inputs?.find((i) => i.name === "model")?.link != null;

  /** Where rank / min_rank / alpha come from now: {kind: "widgets" | "config" | "ran" | "unknown", params}. */
  const source = () => {
    const { linked, config } = configSource(node);
    if (!linked) {
      return { kind: "widgets", params: { rank: String(Math.round(Number(widgetValue("rank")))),
        min_rank: String(Math.round(Number(widgetValue("min_rank")))), alpha: String(widgetValue("alpha")) } };
    }
    if (config) {
      const w = (name) => config.widgets?.find((x) => x.name === name)?.value;
      return { kind: "config", params: { preset: String(w("preset") ?? ""), config_json: String(w("config_json") ?? "") } };
    }
    if (view.ran?.from_config) { // not a Config node (a subgraph input, …): what the last run used
      const r = view.ran;
      return { kind: "ran", params: { rank: String(r.rank), min_rank: String(r.min_rank), alpha: String(r.alpha) } };
    }
    return { kind: "unknown", params: { rank: String(Math.round(Number(widgetValue("rank")))),
      min_rank: String(Math.round(Number(widgetValue("min_rank")))), alpha: String(widgetValue("alpha")) } };
  };

  const query = (src) => new URLSearchParams({ ...src.params, alphas: String(widgetValue("compare_alphas") ?? ""),
    step: String(MASK_STEP) }).toString();

  /** The sampler steps to mark: the last run's, dashed once scheduler / steps / denoise changed since. */
  const updateMarks = () => {
    const r = view.ran;
    if (!r?.timesteps?.length || !modelLinked()) { view.marks = null; return; }
    const stale = SCHEDULE_WIDGETS.some((name) => String(widgetValue(name)) !== String(r[name]));
    view.marks = { timesteps: r.timesteps, stale };
  };

  const describe = (src) => {
    const lines = [];
    if (src.kind === "config" && view.data) {
      lines.push(`from config: rank ${view.data.rank}, min ${view.data.min_rank}, α ${Number(view.data.alphas[0])}`);
    } else if (src.kind === "ran") lines.push("from the config of the last run");
    else if (src.kind === "unknown") lines.push("config connected: its values apply when run");
    if (modelLinked()) {
      if (!view.marks) lines.push("run to mark the sampler's steps");
      else if (view.marks.stale) lines.push("steps of the last run: run to update");
    }
    return lines.join("\n");
  };

  const syncWidgets = (src) => { // the values a run ignores cannot be edited
    const locked = src.kind !== "widgets";
    for (const name of CONFIG_WIDGETS) {
      const widget = widgetOf(name);
      if (widget && Boolean(widget.disabled) !== locked) {
        widget.disabled = locked;
        node.setDirtyCanvas?.(true, false);
      }
    }
  };

  addLivePlot(node, view, {
    name: "mask_plot", className: "lycoris-mask", route: MASK_ROUTE, what: "mask",
    paint: (ctx, w, h) => paintMask(ctx, w, h, view), widgets: MASK_WIDGETS, outputKey: "lycoris_mask",
    minHeight: 150, height: 190,
    prepare: () => {
      const src = source();
      syncWidgets(src);
      return { query: query(src), src };
    },
    done: ({ src }, c) => {
      updateMarks();
      view.note = describe(src);
      c.source = src.kind;
      c.rank = view.data ? String(view.data.rank) : "";
      c.minRank = view.data ? String(view.data.min_rank) : "";
      c.alpha = view.data ? String(Number(view.data.alphas[0])) : "";
      c.marks = String(view.marks?.timesteps.length ?? 0);
    },
    // a change upstream (the config node's preset or JSON, a link) refetches
    watchKey: () => {
      const src = source();
      return `${src.kind}|${query(src)}|${modelLinked()}|${SCHEDULE_WIDGETS.map(widgetValue).join(",")}`;
    },
  });
}
