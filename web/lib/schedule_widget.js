// LyCORIS Strength Schedule: a live plot of the strength multiplier over the sampling percent (0 = start,
// the noisiest step; 1 = end), with the sampler's steps marked. The numbers come from
// GET /lycoris/strength/schedule (core.strength_shape, the pack's one copy of the schedule); this module
// only draws them. Steps: the last run's with a model connected (the model's real sigma schedule; dashed
// once steps / scheduler changed since), else evenly spaced, as the node plots without a model.
import { addLivePlot, C, label, paragraph } from "./common.js";

export const SCHEDULE_NODE = "LycorisStrengthSchedule";
const SCHEDULE_ROUTE = "/lycoris/strength/schedule";
const CURVE_WIDGETS = ["mode", "start", "end", "ramp", "keyframes", "steps"];
const STEP_WIDGETS = ["steps", "scheduler"]; // a run's marks are stale once these change
const WINDOW_WIDGETS = ["start", "end", "ramp"]; // used in window mode; keyframes in keyframes mode
const CURVE_COLOUR = "rgb(90,200,255)"; // nodes/schedule_nodes.py plot
const STEP_COLOUR = "rgb(255,190,60)";

function paintSchedule(ctx, w, h, view) {
  ctx.fillStyle = C.bg;
  ctx.fillRect(0, 0, w, h);
  ctx.font = "10px sans-serif";
  const { data } = view;
  const pad = { l: 30, r: 10, t: 16, b: 16 };
  const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
  if (data && pw > 10 && ph > 10) {
    const lo = Math.min(0, ...data.curve), hi = Math.max(1, ...data.curve);
    const x = (p) => pad.l + p * pw;
    const y = (v) => pad.t + ph - ((v - lo) / (hi - lo || 1)) * ph;
    ctx.fillStyle = C.unlit;
    ctx.fillRect(pad.l, pad.t, pw, ph);
    ctx.strokeStyle = C.frame; // the 0 and 1 lines
    ctx.lineWidth = 1;
    ctx.setLineDash([2, 3]);
    for (const v of [0, 1]) {
      ctx.beginPath();
      ctx.moveTo(pad.l, Math.round(y(v)) + 0.5);
      ctx.lineTo(pad.l + pw, Math.round(y(v)) + 0.5);
      ctx.stroke();
    }
    ctx.setLineDash([]);
    ctx.fillStyle = "rgba(90,200,255,0.18)"; // area between the curve and 0
    ctx.beginPath();
    ctx.moveTo(x(0), y(0));
    data.grid.forEach((p, i) => ctx.lineTo(x(p), y(data.curve[i])));
    ctx.lineTo(x(1), y(0));
    ctx.fill();
    const marks = view.marks;
    if (marks) { // the sampler's steps: a line each, a dot where the curve is, the index on top
      const every = Math.max(1, Math.ceil(marks.percents.length / Math.max(1, pw / 18)));
      ctx.strokeStyle = STEP_COLOUR;
      ctx.globalAlpha = 0.45;
      ctx.setLineDash(marks.stale ? [3, 3] : []);
      marks.percents.forEach((p) => {
        const xp = Math.round(x(p)) + 0.5;
        ctx.beginPath();
        ctx.moveTo(xp, pad.t);
        ctx.lineTo(xp, pad.t + ph);
        ctx.stroke();
      });
      ctx.setLineDash([]);
      ctx.globalAlpha = 1;
      marks.percents.forEach((p, i) => {
        if (i % every === 0) label(ctx, String(i), x(p), pad.t - 1, STEP_COLOUR, "center", "bottom");
      });
    }
    ctx.strokeStyle = CURVE_COLOUR;
    ctx.lineWidth = 2;
    ctx.beginPath();
    data.grid.forEach((p, i) => (i ? ctx.lineTo(x(p), y(data.curve[i])) : ctx.moveTo(x(p), y(data.curve[i]))));
    ctx.stroke();
    if (marks) {
      ctx.fillStyle = STEP_COLOUR;
      marks.percents.forEach((p, i) => {
        ctx.beginPath();
        ctx.arc(x(p), y(marks.values[i]), 3, 0, 2 * Math.PI);
        ctx.fill();
      });
    }
    ctx.strokeStyle = C.frame;
    ctx.lineWidth = 1;
    ctx.strokeRect(pad.l - 0.5, pad.t - 0.5, pw + 1, ph + 1);
    const ticks = [...new Set([lo, 0, 1, hi])];
    for (const v of ticks) label(ctx, String(Number(v.toFixed(2))), pad.l - 4, y(v), C.text, "right", "middle");
    label(ctx, "start (noise)", x(0), h - 3, C.text, "left");
    label(ctx, "end (clean)", x(1), h - 3, C.text, "right");
  } else if (!view.error) {
    label(ctx, "loading…", w / 2, h / 2, C.frame, "center", "middle");
  }
  if (view.note) {
    view.note.split("\n").forEach((line, i) => label(ctx, line, w - pad.r - 4, pad.t + 12 + 12 * i, C.text, "right"));
  }
  if (view.error) {
    ctx.fillStyle = "rgba(30,31,36,0.85)";
    ctx.fillRect(0, 0, w, h);
    paragraph(ctx, view.error, 8, 20, w - 16, C.error);
  }
}

/** The plot on a LyCORIS Strength Schedule node: asks the server for the curve whenever a widget changes. */
export function addScheduleWidget(node) {
  const view = { data: null, error: null, note: "", timer: 0, request: null, key: "", ran: null, marks: null };
  const widgetOf = (name) => node.widgets?.find((w) => w.name === name);
  const widgetValue = (name) => widgetOf(name)?.value;
  const modelLinked = () => node.inputs?.find((i) => i.name === "model")?.link != null;

  /** Where the marked steps come from: "run" (the last run with a model), "stale" (that run, but steps or
   *  scheduler changed since), "even" (evenly spaced: no model, or not run yet). */
  const stepSource = () => {
    const r = view.ran;
    if (!modelLinked() || !r?.model || !r.percents?.length) return "even";
    return STEP_WIDGETS.some((name) => String(widgetValue(name)) !== String(r[name])) ? "stale" : "run";
  };

  const query = (steps) => {
    const params = Object.fromEntries(CURVE_WIDGETS.map((name) => [name, String(widgetValue(name) ?? "")]));
    if (steps !== "even") params.percents = view.ran.percents.map(String).join(",");
    return new URLSearchParams(params).toString();
  };

  const syncWidgets = () => { // the inputs the mode ignores cannot be edited
    const windowed = widgetValue("mode") !== "keyframes";
    for (const name of [...WINDOW_WIDGETS, "keyframes"]) {
      const widget = widgetOf(name);
      const locked = WINDOW_WIDGETS.includes(name) ? !windowed : windowed;
      if (widget && Boolean(widget.disabled) !== locked) {
        widget.disabled = locked;
        node.setDirtyCanvas?.(true, false);
      }
    }
  };

  addLivePlot(node, view, {
    name: "schedule_plot", className: "lycoris-schedule", route: SCHEDULE_ROUTE, what: "schedule",
    paint: (ctx, w, h) => paintSchedule(ctx, w, h, view), widgets: [...CURVE_WIDGETS, "scheduler"],
    outputKey: "lycoris_schedule", minHeight: 140, height: 170,
    prepare: () => {
      const steps = stepSource();
      syncWidgets();
      return { query: query(steps), steps };
    },
    done: ({ steps }, c) => {
      view.marks = view.data ? { ...view.data.marks, stale: steps === "stale" } : null;
      view.note = !modelLinked() ? "steps evenly spaced (no model)"
        : steps === "even" ? "run to mark the model's steps"
          : steps === "stale" ? "last run's steps: run to update" : "";
      c.steps = steps;
      c.marks = String(view.marks?.percents.length ?? 0);
      c.keyframes = view.data ? JSON.stringify(view.data.keyframes) : "";
    },
    // a link, a value set without a callback, a run
    watchKey: () => `${query("even")}|${widgetValue("scheduler")}|${modelLinked()}|${stepSource()}`,
  });
}
