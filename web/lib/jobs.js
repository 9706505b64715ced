// Training jobs: one store fed by the websocket events, and the widget of the Train / Job nodes
// (loss chart, step, it/s, ETA, state, and one action: Cancel while the job runs, Load once it wrote
// its adapter, Resume once it stopped early).
//   lycoris.job.progress {job_id, step, steps, loss, lr, its, eta_s, state}
//   lycoris.job.state    {job_id, state, message}
// Which job a node shows: a Train node learns it from its own run's `ui.job_id`, and hands it at once to
// the LyCORIS Job nodes wired to it, so they follow the job from the moment the prompt submits it (not
// when the job ends). When the Train node starts executing again, both reset ("submitting…").
import { api } from "../../../scripts/api.js";
import { app } from "../../../scripts/app.js";
import { C, chain, FrameCanvas, installStyles, label } from "./common.js";
import { adapterFile, refreshAdapterLists } from "./files.js";

export const JOB_NODES = new Set(["LycorisTrain", "LycorisJob"]);
export const JOBS_ROUTE = "/lycoris/jobs";
const EVENT_PROGRESS = "lycoris.job.progress";
const EVENT_STATE = "lycoris.job.state";
const LOSS_SMOOTHING = 0.9; // EMA factor of the smoothed loss line (bias-corrected)
const MAX_LOSS_POINTS = 4000; // older points are thinned to every other one past this
// The trainer's states: queued, running, waiting (for a prompt to finish), then done / stopped / failed /
// cancelled (interrupted: found on disk after a restart that stopped it).
const FINISHED = new Set(["done", "stopped", "failed", "cancelled", "interrupted", "finished", "error", "canceled"]);
const SUCCEEDED = new Set(["done", "finished"]);
const STATE_COLOURS = { running: "#4aa3ff", queued: "#c8c8c8", waiting: "#e0b050", done: "#6fd36f",
  stopped: "#ff9e5e", failed: "#ff6e6e", cancelled: "#a0a0a0", interrupted: "#ff9e5e", finished: "#6fd36f",
  error: "#ff6e6e", canceled: "#a0a0a0" };
export const CONTINUES = "training continues: cancel it here or in LyCORIS jobs";

export const jobs = new Map(); // id -> {id, name, state, step, steps, loss, lr, its, eta_s, message, losses}
const jobListeners = new Set();
const views = new Set(); // the job widgets on nodes

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
  const was = job.state;
  if (d.state != null) job.state = d.state;
  job.message = d.message ?? "";
  if (FINISHED.has(job.state)) job.cancelling = false;
  notifyJob(job.id);
  // A job that ends has written its adapter (done) or its last checkpoint: the file lists learn it now.
  if (FINISHED.has(job.state) && !FINISHED.has(was)) {
    refreshAdapterLists().then(() => notifyJob(job.id));
    if (!job.output_name) loadJob(job.id);
  }
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

export const isFinished = (job) => !!job && FINISHED.has(job.state);
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

function paintLoss(ctx, w, h, job, waiting) {
  ctx.fillStyle = C.bg;
  ctx.fillRect(0, 0, w, h);
  ctx.font = "10px sans-serif";
  const points = job?.losses ?? [];
  if (points.length < 2) {
    label(ctx, job ? "waiting for loss values…" : waiting || "no job", w / 2, h / 2, C.frame, "center", "middle");
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

const STYLES = `
.lycoris-action { padding: 2px 10px; border-radius: 4px; font: 12px sans-serif; white-space: nowrap;
  border: 1px solid var(--border-color, #555); background: var(--comfy-input-bg, #222);
  color: var(--input-text, #ddd); cursor: pointer; flex: 0 0 auto; }
.lycoris-action:hover:not(:disabled) { border-color: var(--fg-color, #bbb); }
.lycoris-action:disabled { opacity: 0.4; cursor: not-allowed; border-style: dashed; }
.lycoris-job-status { white-space: normal; overflow-wrap: anywhere; word-break: break-word; line-height: 15px;
  max-height: 60px; overflow-y: auto; flex: 1; min-width: 0; }
`;

export function button(text, onClick) {
  installStyles("lycoris-job-styles", STYLES);
  const el = document.createElement("button");
  el.type = "button";
  el.textContent = text;
  el.className = "lycoris-action";
  el.addEventListener("click", (event) => { event.stopPropagation(); if (!el.disabled) onClick(event); });
  return el;
}

// ---------------------------------------------------------------- what a finished job offers

/** The graphs to search for nodes: the root graph and its subgraphs (frontends that have them). */
export function allGraphs() {
  const root = app.rootGraph ?? app.graph;
  const graphs = root ? [root] : [];
  for (const sub of root?.subgraphs?.values?.() ?? []) graphs.push(sub);
  if (app.canvas?.graph && !graphs.includes(app.canvas.graph)) graphs.push(app.canvas.graph);
  return graphs;
}

function widgetOf(node, name) {
  return node?.widgets?.find((w) => w.name === name);
}

function setWidget(node, name, value) {
  const widget = widgetOf(node, name);
  if (!widget) return false;
  widget.value = value;
  widget.callback?.(value, app.canvas, node, [0, 0], undefined);
  node.setDirtyCanvas?.(true, true);
  return true;
}

/** The Train LyCORIS nodes that continue `job` when resumed: the one wired to `node`, or those of its name. */
function trainNodesFor(job, node) {
  if (node?.type === "LycorisTrain") return [node];
  if (node?.type === "LycorisJob") {
    const upstream = node.getInputNode?.(node.findInputSlot?.("job") ?? 0);
    if (upstream?.type === "LycorisTrain") return [upstream];
  }
  const name = job.output_name || job.name;
  return allGraphs().flatMap((g) => g.nodes ?? [])
    .filter((n) => n.type === "LycorisTrain" && widgetOf(n, "output_name")?.value === name);
}

async function openInLoadNode(file, near) {
  const { LiteGraph } = window;
  const graph = near?.graph ?? app.canvas?.graph ?? app.graph;
  const load = LiteGraph?.createNode("LycorisLoad");
  if (!load || !graph) return;
  const [x, y] = near ? [near.pos[0] + near.size[0] + 40, near.pos[1]]
    : app.canvas?.ds ? [-app.canvas.ds.offset[0] + 80, -app.canvas.ds.offset[1] + 80] : [80, 80];
  load.pos = [x, y];
  graph.add(load);
  await refreshAdapterLists();
  setWidget(load, "lora_name", file);
  app.canvas?.selectNode?.(load);
  graph.setDirtyCanvas?.(true, true);
}

/** The one action a job offers now: {label, title, enabled, run}. */
export function jobAction(job, node, view) {
  if (!job) return { label: "Cancel", title: "no job yet: run the node", enabled: false };
  if (!FINISHED.has(job.state)) {
    return { label: job.cancelling ? "Cancelling…" : "Cancel", enabled: canCancel(job),
      title: job.cancelling ? "the job saves a checkpoint, then stops" : "stop the job (it keeps a checkpoint)",
      run: () => cancelJob(job.id) };
  }
  if (SUCCEEDED.has(job.state)) {
    const file = adapterFile(job);
    return { label: "Load", enabled: !!file, title: file ? `add a Load LyCORIS node with ${file}` : "no adapter file known",
      run: () => openInLoadNode(file, node) };
  }
  const trains = trainNodesFor(job, node);
  const name = job.output_name || job.name;
  return { label: "Resume", enabled: trains.length > 0,
    title: trains.length ? `turn resume on in Train LyCORIS ('${name}'), then queue: it continues from the latest checkpoint`
      : `queue Train LyCORIS with output_name '${name}' and resume on to continue from the latest checkpoint`,
    run: () => {
      for (const train of trains) {
        setWidget(train, "output_name", name);
        setWidget(train, "resume", true);
      }
      if (view) view.note = `resume on: queue the prompt to continue '${name}' from its latest checkpoint`;
      notifyJob(job.id);
    } };
}

export function applyAction(el, action) {
  el.textContent = action.label;
  el.title = action.title ?? "";
  el.disabled = !action.enabled;
  el.dataset.action = action.label.toLowerCase().replace(/…$/, "");
  el.onclick = null;
  el._lycorisRun = action.run;
}

// ---------------------------------------------------------------- the widget on Train / Job nodes

/** Loss chart, status line and the job's action on a Train / Job node. */
export function addJobWidget(node) {
  const view = { node, jobId: node.properties?.lycoris_job_id ?? null, pending: "", note: "" };
  const frame = new FrameCanvas((ctx, w, h) => paintLoss(ctx, w, h, jobs.get(view.jobId), view.pending),
    "lycoris-loss-canvas");
  const root = document.createElement("div");
  root.className = "lycoris-job";
  Object.assign(root.style, { display: "flex", flexDirection: "column", gap: "4px", font: "12px sans-serif",
    color: "var(--fg-color, #ddd)", height: "100%" });
  const chart = document.createElement("div");
  Object.assign(chart.style, { flex: "1 1 auto", minHeight: "40px" });
  chart.append(frame.canvas);
  const bar = document.createElement("div");
  Object.assign(bar.style, { display: "flex", alignItems: "flex-start", gap: "6px", flex: "0 0 auto" });
  const status = document.createElement("span");
  status.className = "lycoris-job-status";
  const action = button("Cancel", () => action._lycorisRun?.());
  bar.append(status, action);
  root.append(chart, bar);

  view.update = () => {
    const job = view.jobId ? jobs.get(view.jobId) : null;
    let text = view.pending && !view.jobId ? view.pending
      : view.jobId && !job ? `job ${view.jobId}: no events since the page loaded` : jobSummary(job);
    if (view.note && !(view.note === CONTINUES && isFinished(job))) text = `${view.note} · ${text}`;
    status.textContent = status.title = text; // the title: the whole text on hover
    status.style.color = view.note === CONTINUES && !isFinished(job) ? "#e0b050" : stateColour(job);
    applyAction(action, jobAction(job, node, view));
    frame.request();
  };
  view.follow = (id) => {
    view.jobId = id == null ? null : String(id);
    view.pending = "";
    view.note = "";
    node.properties ??= {};
    node.properties.lycoris_job_id = view.jobId; // a saved workflow still knows its job
    if (view.jobId) {
      jobRecord(view.jobId);
      loadJob(view.jobId);
    }
    view.update();
  };
  view.reset = (pending) => {
    view.jobId = null;
    view.pending = pending;
    view.note = "";
    view.update();
  };
  node.lycorisJobView = view;
  views.add(view);

  const unsubscribe = onJobsChanged((id) => { if (id === view.jobId) view.update(); });
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
    view.follow(id);
    if (node.type === "LycorisTrain") for (const target of downstreamJobNodes(node)) target.lycorisJobView.follow(id);
  });
  chain(node, "onConfigure", () => {
    view.jobId = node.properties?.lycoris_job_id ?? view.jobId;
    view.update();
    if (view.jobId) loadJob(view.jobId);
  });
  chain(node, "onRemoved", () => { unsubscribe(); views.delete(view); frame.dispose(); });
  node.setSize?.([Math.max(node.size[0], 340), node.computeSize()[1]]);
  view.update();
}

/** The LyCORIS Job nodes wired to a Train node's job output. */
function downstreamJobNodes(node) {
  const graph = node.graph;
  const found = [];
  for (const linkId of node.outputs?.[0]?.links ?? []) {
    const link = graph?.links?.get?.(linkId) ?? graph?.links?.[linkId];
    const target = link ? graph.getNodeById(link.target_id) : null;
    if (target?.lycorisJobView) found.push(target);
  }
  return found;
}

/** The view of the node with this execution id (the root graph's node id; "a:b" ids are subgraph nodes). */
function viewsOf(nodeId) {
  const id = String(nodeId ?? "");
  return [...views].filter((v) => String(v.node.id) === id || id.endsWith(`:${v.node.id}`));
}

function executingId(detail) {
  return detail && typeof detail === "object" ? detail.display_node ?? detail.node : detail;
}

/** A Train node starts executing: it and its Job nodes drop the previous job and say what comes. */
function onExecuting(event) {
  for (const view of viewsOf(executingId(event.detail))) {
    if (view.node.type !== "LycorisTrain") continue;
    view.reset("submitting the job…");
    for (const target of downstreamJobNodes(view.node)) target.lycorisJobView.reset("waiting for Train LyCORIS to submit its job…");
  }
}

/** ComfyUI's own Cancel stops a Job node's wait, not the job: say so on the node. */
function onInterrupted(event) {
  for (const view of viewsOf(event.detail?.node_id)) {
    const job = jobs.get(view.jobId);
    if (view.node.type === "LycorisJob" && job && !isFinished(job)) {
      view.note = CONTINUES;
      view.update();
    }
  }
}

function onExecutionStart() {
  for (const view of views) if (view.note) { view.note = ""; view.update(); }
}

/** Registered once for the page: the events feed the store that nodes and the tab subscribe to
 *  (and registering the types tells the api these websocket messages are expected). */
export function listenForJobs() {
  api.addEventListener(EVENT_PROGRESS, onProgress);
  api.addEventListener(EVENT_STATE, onState);
  api.addEventListener("executing", onExecuting);
  api.addEventListener("execution_interrupted", onInterrupted);
  api.addEventListener("execution_start", onExecutionStart);
}
