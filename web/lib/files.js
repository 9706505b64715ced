// File lists that change while the page is open: when a job writes an adapter into models/loras, every
// Load LyCORIS node (and every one created later) lists it at once, without ComfyUI's "Refresh".
import { api } from "../../../scripts/api.js";
import { app } from "../../../scripts/app.js";

export const LOAD_NODE = "LycorisLoad";
const FILE_INPUT = "lora_name";
let latest = null; // the newest list, for nodes created after a refresh

/** The adapter file (relative to models/loras) a finished job wrote: from its message ("adapter saved to
 *  …/loras/<name>.safetensors"), else its output_name. */
export function adapterFile(job) {
  const saved = /adapter saved to (.+?\.safetensors)/.exec(job?.message ?? "")?.[1];
  if (saved) {
    const parts = saved.split(/[\\/]loras[\\/]/);
    if (parts.length > 1) return parts[parts.length - 1].replaceAll("\\", "/");
  }
  return job?.output_name ? `${job.output_name}.safetensors` : null;
}

function comboOptions(spec) {
  if (Array.isArray(spec?.[0])) return spec[0]; // V1: [[options], {…}]
  return spec?.[1]?.options ?? null; // V3: ["COMBO", {options}]
}

function loadNodes() {
  const root = app.rootGraph ?? app.graph;
  const graphs = root ? [root, ...(root.subgraphs?.values?.() ?? [])] : [];
  if (app.canvas?.graph && !graphs.includes(app.canvas.graph)) graphs.push(app.canvas.graph);
  return graphs.flatMap((g) => g.nodes ?? []).filter((n) => n.type === LOAD_NODE);
}

/** Sets the file list of a Load LyCORIS node's combo (the value is kept). */
export function applyFileList(node, values = latest) {
  const widget = node.widgets?.find((w) => w.name === FILE_INPUT);
  if (!widget || !values) return;
  widget.options ??= {};
  widget.options.values = [...values];
  node.setDirtyCanvas?.(true, false);
}

/** Asks the server for the current file list and gives it to every Load LyCORIS node; the list. */
export async function refreshAdapterLists() {
  try {
    const res = await api.fetchApi(`/object_info/${LOAD_NODE}`, { cache: "no-store" });
    if (!res.ok) return latest;
    const def = (await res.json())[LOAD_NODE];
    const values = comboOptions(def?.input?.required?.[FILE_INPUT]);
    if (!Array.isArray(values)) return latest;
    latest = values;
    const known = window.LiteGraph?.registered_node_types?.[LOAD_NODE]?.nodeData?.input?.required?.[FILE_INPUT];
    if (Array.isArray(known?.[0])) known[0] = [...values];
    else if (known?.[1]) known[1].options = [...values];
    for (const node of loadNodes()) applyFileList(node, values);
    app.canvas?.setDirty?.(true, true);
    return values;
  } catch {
    return latest; // unreachable server: the lists stay as they are
  }
}
