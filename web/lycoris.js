// LyCORIS for ComfyUI: frontend extension (plain ES modules, no build step).
//
// ComfyUI serves the pack's WEB_DIRECTORY at /extensions/<pack folder>/ and the frontend imports
// every .js file there (lib/ only exports, so importing it twice is harmless), so the app and api
// modules are two folders up from here.
//   - Text results (Plan, Config, Load, Dataset, Train, Job, Merge, Save, Export): a read-only text
//     widget filled from each run's ui.text, as core's Preview Any shows its text (lib/text_output.js).
//   - T-LoRA Mask Visualizer: a live plot of r(t) from GET /lycoris/tlora/mask, the connected config's
//     values and the sampler's steps (lib/mask_widget.js).
//   - LyCORIS Strength Schedule: a live plot of the multiplier over the sampling steps from
//     GET /lycoris/strength/schedule, the last run's steps marked (lib/schedule_widget.js).
//   - Train / Job nodes: loss chart, step, it/s, ETA, state and Cancel / Load / Resume from websocket
//     events; Job nodes follow their Train node's job from submission (lib/jobs.js).
//   - Train / Job nodes and the jobs tab: the job's validation previews as a strip, steps by strengths,
//     growing with lycoris.job.validation events (lib/validation_strip.js).
//   - Load LyCORIS: its file list refreshes when a job ends (lib/files.js).
//   - "LyCORIS jobs" sidebar tab: GET /lycoris/jobs plus the jobs seen in events (lib/jobs_tab.js).
//   - Template browser: the pack's example workflows in their numbered order (the server lists a
//     folder's files in directory order; their names are the titles, their .jpg the thumbnails).
import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";
import { chain } from "./lib/common.js";
import { applyFileList, LOAD_NODE } from "./lib/files.js";
import { addJobWidget, JOB_NODES, listenForJobs } from "./lib/jobs.js";
import { jobsTab } from "./lib/jobs_tab.js";
import { addMaskWidget, MASK_NODE } from "./lib/mask_widget.js";
import { addScheduleWidget, SCHEDULE_NODE } from "./lib/schedule_widget.js";
import { addTextOutput, TEXT_NODES } from "./lib/text_output.js";
import { addValidationStrip, listenForValidation } from "./lib/validation_strip.js";

const PACK_FOLDER = decodeURIComponent(new URL(import.meta.url).pathname.split("/").slice(-2, -1)[0] ?? "");
const listTemplates = api.getWorkflowTemplates?.bind(api);
if (listTemplates) {
  api.getWorkflowTemplates = async (...args) => {
    const all = await listTemplates(...args);
    const ours = all?.[PACK_FOLDER];
    if (Array.isArray(ours)) ours.sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
    return all;
  };
}

app.registerExtension({
  name: "lycoris.nodes",
  setup() {
    listenForJobs();
    listenForValidation();
    if (app.extensionManager?.registerSidebarTab) app.extensionManager.registerSidebarTab(jobsTab());
    else console.warn("lycoris: this frontend has no sidebar tabs; the jobs list is not shown");
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData.name;
    const adds = [];
    if (name === MASK_NODE) adds.push(addMaskWidget);
    if (name === SCHEDULE_NODE) adds.push(addScheduleWidget);
    if (JOB_NODES.has(name)) adds.push(addJobWidget, addValidationStrip); // the strip follows the job widget's job
    if (TEXT_NODES.has(name)) adds.push(addTextOutput);
    if (name === LOAD_NODE) adds.push((node) => applyFileList(node)); // a list refreshed since the page loaded
    if (adds.length) chain(nodeType.prototype, "onNodeCreated", function () { for (const add of adds) add(this); });
  },
});
