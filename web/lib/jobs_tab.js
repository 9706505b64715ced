// The "LyCORIS jobs" sidebar tab: GET /lycoris/jobs merged with the jobs seen in events, each with the
// action that fits it (Cancel while it runs, Load once done, Resume once stopped early) and its validation
// previews under a toggle (open by itself when previews arrive). A 404 (no trainer installed) is not an
// error: the list just says "no jobs".
import { api } from "../../../scripts/api.js";
import { applyAction, button, jobAction, jobRecord, jobs, jobSummary, JOBS_ROUTE, onJobsChanged, stateColour } from "./jobs.js";
import { tabPreviews } from "./validation_strip.js";

/** One row per job, updated in place (a row rebuilt under the pointer would swallow a click). */
function jobRow(job) {
  const row = document.createElement("div");
  row.className = "lycoris-job-row";
  row.dataset.jobId = job.id;
  Object.assign(row.style, { display: "flex", alignItems: "center", gap: "8px", padding: "6px 0",
    borderBottom: "1px solid var(--border-color, #444)" });
  const text = document.createElement("div");
  Object.assign(text.style, { flex: "1", minWidth: "0" });
  const title = document.createElement("div");
  title.style.fontWeight = "600";
  const line = document.createElement("div");
  line.className = "lycoris-job-line";
  Object.assign(line.style, { whiteSpace: "normal", overflowWrap: "anywhere" }); // the whole message, wrapped
  const action = button("Cancel", () => action._lycorisRun?.());
  const previews = tabPreviews(job); // the validation strip (lib/validation_strip.js)
  text.append(title, line, previews.el);
  row.append(text, action);
  return {
    row,
    update() {
      title.textContent = job.name || job.id;
      line.textContent = line.title = jobSummary(job);
      line.style.color = stateColour(job);
      applyAction(action, jobAction(job, null, null));
      previews.update();
    },
    dispose: previews.dispose,
  };
}

export function jobsTab() {
  let root = null, list = null, empty = null, rows = new Map(), unsubscribe = null;
  let frame = 0, fetching = null, notice = "";
  const asked = new Set(); // job ids the list was fetched for, so events do not refetch it each step

  const refresh = () => {
    fetching ??= (async () => {
      try {
        const res = await api.fetchApi(JOBS_ROUTE, { cache: "no-store" });
        if (res.ok) {
          const body = await res.json();
          for (const job of body.jobs ?? []) if (job?.id != null) Object.assign(jobRecord(job.id), { ...job, id: String(job.id) });
          notice = "";
        } else notice = res.status === 404 ? "" : `jobs route answered HTTP ${res.status}`; // 404: no trainer
      } catch (err) {
        notice = `jobs route unreachable: ${err.message || err}`;
      } finally {
        fetching = null;
        paint();
      }
    })();
  };
  const paint = () => {
    if (!frame) frame = requestAnimationFrame(() => { frame = 0; if (root) render(); });
  };
  const render = () => {
    const ordered = [...jobs.values()].reverse().map((job) => {
      if (!rows.has(job.id)) rows.set(job.id, jobRow(job));
      const entry = rows.get(job.id);
      entry.update();
      return entry.row;
    });
    empty.textContent = notice || "no jobs";
    const children = [...ordered, ...(ordered.length && !notice ? [] : [empty])];
    if (children.some((child, i) => list.children[i] !== child) || list.children.length !== children.length) {
      list.replaceChildren(...children);
    }
  };

  return {
    id: "lycoris-jobs",
    icon: "pi pi-chart-line",
    title: "LyCORIS jobs",
    tooltip: "LyCORIS training jobs",
    type: "custom",
    render(el) {
      root = document.createElement("div");
      root.className = "lycoris-jobs";
      Object.assign(root.style, { padding: "12px", font: "12px sans-serif", color: "var(--fg-color, #ddd)" });
      const heading = document.createElement("h3");
      heading.textContent = "LyCORIS jobs";
      Object.assign(heading.style, { margin: "0 0 8px", fontSize: "14px" });
      list = document.createElement("div");
      empty = document.createElement("div");
      empty.className = "lycoris-jobs-empty";
      root.append(heading, list);
      el.append(root);
      rows = new Map();
      unsubscribe = onJobsChanged((id) => {
        if (!asked.has(id)) { asked.add(id); refresh(); } // a job the list has not shown yet: ask for its name
        paint();
      });
      render();
      refresh();
    },
    destroy() {
      unsubscribe?.();
      for (const entry of rows.values()) entry.dispose();
      cancelAnimationFrame(frame);
      frame = 0;
      root = list = empty = null;
    },
  };
}
