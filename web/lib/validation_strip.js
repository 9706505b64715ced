// Validation previews as a strip: one column per validation step, one row per strength, small thumbnails
// with the step under each image and the strength at the row start. On the Train / Job nodes (the job
// their job widget follows) and in the LyCORIS jobs tab (a row's "previews" toggle). It grows live:
//   lycoris.job.validation {job_id, render_s, previews: [{step, strength, filename, subfolder, type}]}
// and fills from GET /lycoris/jobs/<id> (`validation`, the same entries), which jobs.js's loadJob copies
// onto the job record when a node starts following a job, after a page (re)load and when a job ends.
import { api } from "../../../scripts/api.js";
import { chain, installStyles } from "./common.js";
import { jobs, loadJob } from "./jobs.js";

const EVENT_VALIDATION = "lycoris.job.validation";
export const STRIP_WIDGET = "lycoris_validation";
const THUMB = 64; // CSS px of a thumbnail's box (readable at zoom 1, small on the node)
const CELL_H = THUMB + 14; // thumbnail and its step label
const GAP = 3;
const SCROLLBAR = 12; // room for the horizontal scrollbar once the steps outgrow the node
const MAX_ROWS = 4; // more strengths scroll vertically

const store = new Map(); // job id -> Map("step|strength" -> {step, strength, filename, subfolder, type})
const merged = new WeakSet(); // job.validation arrays already merged (loadJob replaces the array)
const listeners = new Set();

function notify(id) {
  for (const listener of listeners) listener(id);
}

function onPreviews(listener) {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

/** Adds previews to a job's set (a preview seen twice, from the event and from the route, counts once);
 *  true when something was new. */
function merge(id, previews) {
  if (!Array.isArray(previews)) return false;
  const key = String(id);
  if (!store.has(key)) store.set(key, new Map());
  const known = store.get(key);
  let added = false;
  for (const p of previews) {
    if (!p?.filename || !Number.isFinite(p.step) || !Number.isFinite(p.strength)) continue;
    const k = `${p.step}|${p.strength}`;
    const old = known.get(k);
    if (old && old.filename === p.filename && old.subfolder === p.subfolder && old.type === p.type) continue;
    known.set(k, { step: p.step, strength: p.strength, filename: p.filename, subfolder: p.subfolder ?? "",
      type: p.type ?? "output" });
    added = true;
  }
  return added;
}

/** A job's previews: the events' merged with those GET /lycoris/jobs/<id> listed (jobs.js's record). */
export function previewsOf(id) {
  if (id == null) return [];
  const key = String(id);
  const listed = jobs.get(key)?.validation;
  if (Array.isArray(listed) && !merged.has(listed)) {
    merged.add(listed);
    merge(key, listed);
  }
  return [...(store.get(key)?.values() ?? [])];
}

function onValidation(event) {
  const d = event.detail;
  if (d?.job_id == null) return;
  if (merge(d.job_id, d.previews)) notify(String(d.job_id));
}

/** Registered once for the page (with the job events). */
export function listenForValidation() {
  api.addEventListener(EVENT_VALIDATION, onValidation);
}

export function viewUrl(p) {
  const query = new URLSearchParams({ filename: p.filename, subfolder: p.subfolder, type: p.type });
  return api.apiURL(`/view?${query}`);
}

const formatStrength = (s) => (Number.isInteger(s) ? s.toFixed(1) : String(s));

const STYLES = `
.lycoris-val { font: 10px sans-serif; color: var(--fg-color, #ddd); overflow: auto; max-width: 100%;
  box-sizing: border-box; }
.lycoris-val-grid { display: grid; gap: ${GAP}px 4px; width: max-content; }
.lycoris-val-strength { align-self: center; justify-self: stretch; text-align: right; white-space: nowrap;
  margin-top: -14px; padding: 1px 3px; border-radius: 3px; position: sticky; left: 0; z-index: 1;
  background: rgba(20, 20, 24, 0.8); } /* stays at the row start when the steps scroll */
.lycoris-val-cell { display: flex; flex-direction: column; align-items: center; width: ${THUMB}px; height: ${CELL_H}px;
  color: inherit; text-decoration: none; }
.lycoris-val-cell img { width: ${THUMB}px; height: ${THUMB}px; object-fit: contain; display: block; border-radius: 2px;
  background: rgba(0, 0, 0, 0.35); }
.lycoris-val-cell.broken img { visibility: hidden; }
.lycoris-val-cell.broken { outline: 1px dashed var(--border-color, #555); }
.lycoris-val-step { line-height: 14px; white-space: nowrap; }
.lycoris-val-toggle { background: none; border: none; padding: 2px 0; color: var(--fg-color, #ddd); opacity: 0.8;
  font: 11px sans-serif; cursor: pointer; }
.lycoris-val-toggle:hover { opacity: 1; text-decoration: underline; }
.lycoris-val-none { opacity: 0.7; padding: 2px 0; }
`;

/** The strip's DOM: a grid whose cells (one <a><img><span>step</span></a> each) are kept across updates,
 *  so an image loads once however often the strip grows. */
export class Strip {
  constructor() {
    installStyles("lycoris-validation-styles", STYLES);
    this.el = document.createElement("div");
    this.el.className = "lycoris-val";
    this.grid = document.createElement("div");
    this.grid.className = "lycoris-val-grid";
    this.el.append(this.grid);
    this.cells = new Map(); // "step|strength|filename" -> element
    this.labels = new Map(); // strength -> element
    this.rows = 0;
    this.columns = 0;
    this.stick = true; // follows the newest step until the user scrolls back
    this.el.addEventListener("scroll", () => {
      this.stick = this.el.scrollLeft + this.el.clientWidth >= this.el.scrollWidth - 4;
    });
  }

  /** Shows these previews; true when the grid's size (rows / columns) changed. */
  show(previews) {
    const steps = [...new Set(previews.map((p) => p.step))].sort((a, b) => a - b);
    const strengths = [...new Set(previews.map((p) => p.strength))].sort((a, b) => a - b);
    const wanted = new Set();
    for (const p of previews) {
      const key = `${p.step}|${p.strength}|${p.subfolder}/${p.filename}`;
      wanted.add(key);
      let cell = this.cells.get(key);
      if (!cell) {
        cell = this.cell(p);
        this.cells.set(key, cell);
        this.grid.append(cell);
      }
      cell.style.gridColumn = String(2 + steps.indexOf(p.step));
      cell.style.gridRow = String(1 + strengths.indexOf(p.strength));
    }
    for (const [key, cell] of this.cells) if (!wanted.has(key)) { cell.remove(); this.cells.delete(key); }
    for (const [strength, el] of this.labels) if (!strengths.includes(strength)) { el.remove(); this.labels.delete(strength); }
    strengths.forEach((strength, i) => {
      if (!this.labels.has(strength)) {
        const el = document.createElement("div");
        el.className = "lycoris-val-strength";
        el.textContent = `×${formatStrength(strength)}`;
        el.title = `adapter strength ${formatStrength(strength)}`;
        el.dataset.strength = String(strength);
        this.labels.set(strength, el);
        this.grid.append(el);
      }
      Object.assign(this.labels.get(strength).style, { gridColumn: "1", gridRow: String(i + 1) });
    });
    this.grid.style.gridTemplateColumns = steps.length ? `auto repeat(${steps.length}, ${THUMB}px)` : "";
    this.el.style.display = previews.length ? "" : "none";
    this.el.dataset.count = String(previews.length);
    const resized = steps.length !== this.columns || strengths.length !== this.rows;
    this.columns = steps.length;
    this.rows = strengths.length;
    if (resized && this.stick) requestAnimationFrame(() => { this.el.scrollLeft = this.el.scrollWidth; });
    return resized;
  }

  cell(p) {
    const cell = document.createElement("a");
    cell.className = "lycoris-val-cell";
    cell.href = viewUrl(p);
    cell.target = "_blank";
    cell.rel = "noopener";
    cell.title = `step ${p.step} · strength ${formatStrength(p.strength)} (click: full size)`;
    const img = document.createElement("img");
    img.alt = `step ${p.step}, strength ${formatStrength(p.strength)}`;
    img.dataset.step = String(p.step);
    img.dataset.strength = String(p.strength);
    img.decoding = "async";
    img.draggable = false;
    img.addEventListener("error", () => { cell.classList.add("broken"); cell.title = `${img.alt}: not found`; });
    img.src = viewUrl(p);
    const step = document.createElement("span");
    step.className = "lycoris-val-step";
    step.textContent = `step ${p.step}`;
    step.dataset.step = String(p.step);
    cell.append(img, step);
    return cell;
  }

  /** The CSS height the strip needs (0 when empty). */
  height() {
    if (!this.rows) return 0;
    const rows = Math.min(this.rows, MAX_ROWS);
    return rows * CELL_H + (rows - 1) * GAP + SCROLLBAR;
  }
}

// ---------------------------------------------------------------- on the Train / Job nodes

/** A strip under the job widget of a Train / Job node (jobs.js's addJobWidget runs first): it shows the
 *  previews of the job the node follows, and grows the node when a row or a step is added. */
export function addValidationStrip(node) {
  const view = node.lycorisJobView;
  if (!view) return;
  const strip = new Strip();
  strip.el.classList.add("lycoris-val-node");
  // The classic canvas gives the element its widget height less a margin above and below it.
  const height = () => (strip.height() ? strip.height() + 2 * (widget?.margin ?? 10) : 0);
  const widget = node.addDOMWidget(STRIP_WIDGET, "lycoris-validation", strip.el, {
    serialize: false,
    getMinHeight: height,
    getMaxHeight: height,
    getHeight: height,
  });
  widget.serialize = false;
  const sync = () => {
    try {
      const before = strip.height();
      strip.show(previewsOf(view.jobId));
      if (strip.height() !== before) fit(node);
    } catch (err) {
      console.error("lycoris: validation strip", err); // logged; the job widget it follows keeps working
    }
  };
  chain(view, "update", sync); // follow, reset, every change of the job
  const unsubscribe = onPreviews((id) => { if (id === view.jobId) sync(); });
  chain(node, "onRemoved", unsubscribe);
  sync();
}

/** Grows the node to its new minimum height (it never shrinks one the user made taller). */
function fit(node) {
  const minimum = node.computeSize?.();
  if (minimum && node.size && node.setSize && node.size[1] < minimum[1]) node.setSize([node.size[0], minimum[1]]);
  node.setDirtyCanvas?.(true, true);
}

// ---------------------------------------------------------------- in the jobs tab

/** A row's "previews" toggle and strip. Expanding asks GET /lycoris/jobs/<id> for the job's previews;
 *  a row opens by itself when previews arrive while it shows (unless the user closed it). */
export function tabPreviews(job) {
  installStyles("lycoris-validation-styles", STYLES);
  const el = document.createElement("div");
  el.className = "lycoris-val-tab";
  const toggle = document.createElement("button");
  toggle.type = "button";
  toggle.className = "lycoris-val-toggle";
  const none = document.createElement("div");
  none.className = "lycoris-val-none";
  none.textContent = "no validation previews";
  const strip = new Strip();
  el.append(toggle, strip.el, none);
  let open = false, chosen = false, asked = false;

  const update = () => {
    const previews = previewsOf(job.id);
    if (previews.length && !chosen) open = true;
    toggle.textContent = `${open ? "▾" : "▸"} previews${previews.length ? ` (${previews.length})` : ""}`;
    toggle.title = open ? "hide the validation previews" : "show the validation previews (steps × strengths)";
    strip.show(open ? previews : []);
    none.style.display = open && asked && !previews.length ? "" : "none";
  };
  toggle.addEventListener("click", async (event) => {
    event.stopPropagation();
    open = !open;
    chosen = true;
    update();
    if (open) {
      await loadJob(job.id); // the job's whole list, also for jobs that ran before the page loaded
      asked = true;
      update();
    }
  });
  const dispose = onPreviews((id) => { if (id === job.id) update(); }); // the tab's row updates on job changes
  update();
  return { el, update, dispose };
}
