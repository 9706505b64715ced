// LyCORIS for ComfyUI: frontend extension (plain ES modules, no build step).
//
// ComfyUI serves the pack's WEB_DIRECTORY at /extensions/<pack folder>/ and the frontend imports
// every .js file there (lib/ only exports, so importing it twice is harmless), so the app and api
// modules are two folders up from here.
//   - T-LoRA Mask Visualizer: a live plot of r(t) from GET /lycoris/tlora/mask (lib/mask_widget.js).
//   - Train / Job nodes: loss chart, step, it/s, ETA, state and Cancel from websocket events (lib/jobs.js).
//   - "LyCORIS jobs" sidebar tab: GET /lycoris/jobs plus the jobs seen in events (lib/jobs_tab.js).
// Apply LyCORIS's strength slider needs nothing here: the server declares display "slider".
import { app } from "../../scripts/app.js";
import { chain } from "./lib/common.js";
import { addJobWidget, JOB_NODES, listenForJobs } from "./lib/jobs.js";
import { jobsTab } from "./lib/jobs_tab.js";
import { addMaskWidget, MASK_NODE } from "./lib/mask_widget.js";

app.registerExtension({
  name: "lycoris.nodes",
  setup() {
    listenForJobs();
    if (app.extensionManager?.registerSidebarTab) app.extensionManager.registerSidebarTab(jobsTab());
    else console.warn("lycoris: this frontend has no sidebar tabs; the jobs list is not shown");
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const add = nodeData.name === MASK_NODE ? addMaskWidget : JOB_NODES.has(nodeData.name) ? addJobWidget : null;
    if (add) chain(nodeType.prototype, "onNodeCreated", function () { add(this); });
  },
});
