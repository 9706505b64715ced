// Training jobs: one store fed by the websocket events, and the widget of the Train / Job nodes
// (loss chart, step, it/s, ETA, state, Cancel). The node learns its job id from onExecuted.
//   lycoris.job.progress {job_id, step, steps, loss, lr, its, eta_s, state}
//   lycoris.job.state    {job_id, state, message}
import { api } from "../../../scripts/api.js";
import { C, chain, FrameCanvas, label } from "./common.js";

export const JOB_NODES = new Set(["LycorisTrain", "LycorisJob"]);
export const JOBS_ROUTE = "/lycoris/jobs";
const EVENT_PROGRESS = "lycoris.job.progress";
const EVENT_STATE = "lycoris.job.state";
const LOSS_SMOOTHING = 0.9; // EMA factor of the smoothed loss line (bias-corrected)
const MAX_LOSS_POINTS = 4000; // older points are thinned to every other one past this
// The trainer's states: queued, running, waiting (for a prompt to finish), then done / stopped / failed / cancelled.
const FINISHED = new Set(["done", "stopped", "failed", "cancelled", "finished", "error", "canceled"]);
const STATE_COLOURS = { running: "#4aa3ff", queued: "#c8c8c8", waiting: "#e0b050", done: "#6fd36f",
  stopped: "#ff9e5e", failed: "#ff6e6e", cancelled: "#a0a0a0", finished: "#6fd36f", error: "#ff6e6e", canceled: "#a0a0a0" };

export const jobs = new Map(); // id -> {id, name, state, step, steps, loss, lr, its, eta_s, message, losses}
const jobListeners = new Set();

export function jobRecord(id) {
  const key = String(id);
  if (!jobs.has(key)) jobs.set(key, { id: key, name: "", state: "", losses: [] });
  return jobs.get(key);
}
function notifyJob(id) {
  for (const listener of jobListeners) listener(id);
}
export function onJobsChanged(listener) {
  jobListeners.add(listener);
  return () => jobListeners.delete(listener);
}

function onProgress(event) {
  const d = event.detail;
  if (d?.job_id == null) return;
  const job = jobRecord(d.job_id);
  for (const key of ["step", "steps", "loss", "lr", "its", "eta_s", "state"]) if (d[key] != null) job[key] = d[key];
  if (Number.isFinite(d.loss) && Number.isFinite(d.step)) {
    const last = job.losses[job.losses.length - 1];
    if (last && d.step <= last[0]) job.losses = job.losses.filter(([s]) => s < d.step); // restarted or resumed
    job.losses.push([d.step, d.loss]);
    if (job.losses.length > MAX_LOSS_POINTS) job.losses = job.losses.filter((_, i) => i % 2 === 0 || i === job.losses.length - 1);
  }
  notifyJob(job.id);
}

function onState(event) {
  const d = event.detail;
  if (d?.job_id == null) return;
  const job = jobRecord(d.job_id);
  if (d.state != null) job.state = d.state;
  job.message = d.message ?? "";
  if (FINISHED.has(job.state)) job.cancelling = false;
  notifyJob(job.id);
}

/** Fills a job from GET /lycoris/jobs/<id> (summary and loss history), e.g. for a node that learns its
 *  job after the page loaded; silent when the trainer is not installed or does not know the id. */
export async function loadJob(id) {
  try {
    const res = await api.fetchApi(`${JOBS_ROUTE}/${encodeURIComponent(id)}`, { cache: "no-store" });
    if (!res.ok) return;
    const { losses, spec: _spec, id: _id, ...summary } = await res.json();
    const job = jobRecord(id);
    for (const [key, value] of Object.entries(summary)) if (value != null) job[key] = value;
    if (Array.isArray(losses) && losses.length >= job.losses.length) {
      const stride = Math.ceil(losses.length / MAX_LOSS_POINTS);
      job.losses = losses.filter((_, i) => i % stride === 0 || i === losses.length - 1);
    }
    notifyJob(job.id);
  } catch {
    // unreachable: the websocket events still feed the widget
  }
}

/** POST the cancel; the job then shows "cancelling…" until its state event says it stopped. */
export async function cancelJob(id) {
  const job = jobRecord(id);
  job.cancelling = true;
  job.error = "";
  notifyJob(job.id);
  try {
    const res = await api.fetchApi(`${JOBS_ROUTE}/${encodeURIComponent(id)}/cancel`, { method: "POST" });
    if (!res.ok) throw new Error((await res.json().catch(() => ({}))).error || `HTTP ${res.status}`);
  } catch (err) {
    job.cancelling = false;
    job.error = `cancel failed: ${err.message || err}`;
  }
  notifyJob(job.id);
}

export const canCancel = (job) => !!job && !job.cancelling && !FINISHED.has(job.state);

function formatEta(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  const hms = [Math.floor(s / 3600), Math.floor((s % 3600) / 60), s % 60];
  return (hms[0] ? `${hms[0]}:` : "") + `${String(hms[1]).padStart(hms[0] ? 2 : 1, "0")}:${String(hms[2]).padStart(2, "0")}`;
}

function formatLoss(loss) {
  return Number.isFinite(loss) ? (Math.abs(loss) >= 0.01 ? loss.toFixed(4) : loss.toExponential(2)) : "–";
}

export function jobSummary(job) {
  if (!job) return "no job yet: run the node";
  if (job.error) return job.error;
  const parts = [job.cancelling && !FINISHED.has(job.state) ? "cancelling…" : job.state || "…"];
  if (job.steps) parts.push(`step ${job.step ?? 0}/${job.steps}`);
  if (Number.isFinite(job.its)) parts.push(`${job.its.toFixed(2)} it/s`);
  if (job.state === "running") parts.push(`ETA ${formatEta(job.eta_s)}`);
  if (job.loss != null) parts.push(`loss ${formatLoss(job.loss)}`);
  if (job.message) parts.push(job.message);
  return parts.join(" · ");
}

/** Bias-corrected exponential moving average, as TensorBoard smooths its scalars. */
function smoothed(values, beta) {
  let avg = 0;
  return values.map((v, i) => { avg = beta * avg + (1 - beta) * v; return avg / (1 - beta ** (i + 1)); });
}

function paintLoss(ctx, w, h, job) {
  ctx.fillStyle = C.bg;
  ctx.fillRect(0, 0, w, h);
  ctx.font = "10px sans-serif";
  const points = job?.losses ?? [];
  if (points.length < 2) {
    label(ctx, job ? "waiting for loss values…" : "no job", w / 2, h / 2, C.frame, "center", "middle");
    return;
  }
  const pad = { l: 44, r: 6, t: 6, b: 14 };
  const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
  const steps = points.map(([s]) => s), raw = points.map(([, l]) => l);
  const smooth = smoothed(raw, LOSS_SMOOTHING);
  let lo = Math.min(...raw), hi = Math.max(...raw);
  if (hi - lo < 1e-12) { lo -= 0.5; hi += 0.5; }
  const s0 = steps[0], s1 = Math.max(steps[steps.length - 1], s0 + 1);
  const x = (s) => pad.l + ((s - s0) / (s1 - s0)) * pw;
  const y = (l) => pad.t + ph - ((l - lo) / (hi - lo)) * ph;
  const line = (values, colour, width) => {
    ctx.strokeStyle = colour;
    ctx.lineWidth = width;
    ctx.beginPath();
    values.forEach((v, i) => (i ? ctx.lineTo(x(steps[i]), y(v)) : ctx.moveTo(x(steps[i]), y(v))));
    ctx.stroke();
  };
  ctx.strokeStyle = C.frame;
  ctx.lineWidth = 1;
  ctx.strokeRect(pad.l - 0.5, pad.t - 0.5, pw + 1, ph + 1);
  line(raw, C.raw, 1);
  line(smooth, C.smooth, 2);
  label(ctx, formatLoss(hi), pad.l - 4, pad.t, C.text, "right", "top");
  label(ctx, formatLoss(lo), pad.l - 4, pad.t + ph, C.text, "right", "bottom");
  label(ctx, `step ${s0}`, pad.l, h - 2, C.text, "left");
  label(ctx, String(steps[steps.length - 1]), pad.l + pw, h - 2, C.text, "right");
}

export function stateColour(job) {
  return job?.error ? C.error : STATE_COLOURS[job?.state] ?? "";
}

export function button(text, onClick) {
  const el = document.createElement("button");
  el.textContent = text;
  el.className = "lycoris-cancel";
  Object.assign(el.style, { padding: "2px 10px", cursor: "pointer", borderRadius: "4px",
    border: "1px solid var(--border-color, #555)", background: "var(--comfy-input-bg, #222)",
    color: "var(--input-text, #ddd)", font: "12px sans-serif" });
  el.addEventListener("click", onClick);
  return el;
}

/** Loss chart, status line and Cancel on a Train / Job node; the job id comes from onExecuted. */
export function addJobWidget(node) {
  const view = { jobId: node.properties?.lycoris_job_id ?? null };
  const frame = new FrameCanvas((ctx, w, h) => paintLoss(ctx, w, h, jobs.get(view.jobId)), "lycoris-loss-canvas");
  const root = document.createElement("div");
  root.className = "lycoris-job";
  Object.assign(root.style, { display: "flex", flexDirection: "column", gap: "4px", font: "12px sans-serif",
    color: "var(--fg-color, #ddd)" });
  const chart = document.createElement("div");
  Object.assign(chart.style, { flex: "1 1 auto", minHeight: "0" });
  chart.append(frame.canvas);
  const bar = document.createElement("div");
  Object.assign(bar.style, { display: "flex", alignItems: "center", gap: "6px", flex: "0 0 auto" });
  const status = document.createElement("span");
  status.className = "lycoris-job-status";
  Object.assign(status.style, { flex: "1", minWidth: "0", height: "30px", overflow: "hidden", lineHeight: "15px" });
  const cancel = button("Cancel", () => cancelJob(view.jobId));
  bar.append(status, cancel);
  root.append(chart, bar);

  function update() {
    const job = jobs.get(view.jobId);
    const text = view.jobId && !job ? `job ${view.jobId}: no events since the page loaded` : jobSummary(job);
    status.textContent = status.title = text;
    status.style.color = stateColour(job);
    cancel.disabled = !canCancel(job);
    frame.request();
  }
  const unsubscribe = onJobsChanged((id) => { if (id === view.jobId) update(); });
  const widget = node.addDOMWidget("lycoris_job", "lycoris-job", root, {
    serialize: false,
    getMinHeight: () => 170,
    getHeight: () => 200,
    onDraw: () => frame.fit(),
  });
  widget.serialize = false;
  chain(node, "onExecuted", (output) => {
    const id = output?.job_id?.[0];
    if (id == null) return;
    view.jobId = String(id);
    node.properties ??= {};
    node.properties.lycoris_job_id = view.jobId; // a saved workflow still knows its job
    jobRecord(view.jobId);
    update();
    loadJob(view.jobId);
  });
  chain(node, "onConfigure", () => {
    view.jobId = node.properties?.lycoris_job_id ?? view.jobId;
    update();
    if (view.jobId) loadJob(view.jobId);
  });
  chain(node, "onRemoved", () => { unsubscribe(); frame.dispose(); });
  node.setSize?.([Math.max(node.size[0], 340), node.computeSize()[1]]);
  update();
}

/** Registered once for the page: the events feed the store that nodes and the tab subscribe to
 *  (and registering the types tells the api these websocket messages are expected). */
export function listenForJobs() {
  api.addEventListener(EVENT_PROGRESS, onProgress);
  api.addEventListener(EVENT_STATE, onState);
}
