// Text results on the node, read-only, as core's Preview Any shows its text. The pack's nodes return
// `ui: {"text": [...]}` (Plan, Config's description, Load's match report, Dataset summaries, Train's
// submission, Job's final message, Merge, Save, Export); the frontend shows such text only on core's
// own nodes, so this adds the same widget to ours.
//   - Frontends with core's text preview widgets (window.comfyAPI.textPreviewWidgets): those, which
//     draw in the classic canvas and in Nodes 2.0 alike.
//   - Older frontends (1.32): a read-only multiline text widget (ComfyWidgets.STRING, a <textarea>
//     in the classic canvas, the textarea component in Nodes 2.0), text kept exactly as sent.
import { app } from "../../../scripts/app.js";
import { chain } from "./common.js";

export const TEXT_NODES = new Set([
  "LycorisConfig", "LycorisPlan", "LycorisLoad", "LycorisMerge", "LycorisSave", "LycorisLatentDataset",
  "LycorisImageDataset", "LycorisFolderDataset", "LycorisTrain", "LycorisJob", "LycorisExportJob",
]);
export const TEXT_WIDGET = "lycoris_text"; // the fallback widget's name
const PLACEHOLDER = "the result shows here after a run";

const corePreview = () => window.comfyAPI?.textPreviewWidgets;

/** The text of an executed message as core joins it: list items separated by a blank line. */
export function outputText(output) {
  const text = output?.text;
  if (text == null) return null;
  return Array.isArray(text) ? text.filter((t) => t != null).join("\n\n") : String(text);
}

/** The widget that shows the node's text (core's preview widget or the fallback), if any. */
export function textWidget(node) {
  return node.widgets?.find((w) => w.name === TEXT_WIDGET || w.name === "preview_text");
}

function addFallback(node) {
  const widgets = window.comfyAPI?.widgets?.ComfyWidgets;
  if (!widgets?.STRING) {
    console.warn("lycoris: this frontend has neither text preview nor text widgets; node results are not shown");
    return;
  }
  const { widget } = widgets.STRING(node, TEXT_WIDGET, ["STRING", { multiline: true, placeholder: PLACEHOLDER }], app);
  widget.serialize = false; // not saved with the workflow ...
  widget.options ??= {};
  widget.options.serialize = false; // ... nor sent with the prompt
  widget.options.read_only = true; // Nodes 2.0 draws it read-only
  widget.value = "";
  widget.label = "result"; // what Nodes 2.0 shows over the empty field
  const el = widget.element;
  if (el) {
    el.readOnly = true;
    el.classList.add("lycoris-text");
    el.placeholder = PLACEHOLDER;
    Object.assign(el.style, { fontFamily: "ui-monospace, Menlo, Consolas, monospace", fontSize: "11px",
      whiteSpace: "pre-wrap", cursor: "text" });
  }
}

/** Adds the read-only text widget to a node and fills it from every run's `ui.text`. */
export function addTextOutput(node) {
  const core = corePreview();
  if (core?.addTextPreviewWidgets) core.addTextPreviewWidgets(node);
  else addFallback(node);
  chain(node, "onExecuted", (output) => showText(node, output));
}

const CHAR_PX = 6.6; // monospace 11px
const MAX_WIDTH = 560;
const MAX_LINES = 16;
const TEXT_MIN_HEIGHT = 60;

/** Grows (never shrinks) a node so its text reads without scrolling, up to MAX_LINES lines and MAX_WIDTH; only
 *  a node at its minimum size (just added): one that was given room (a laid-out workflow, a user's resize)
 *  keeps its size, so it never grows over its neighbours, and its text scrolls. */
function fitText(node, text) {
  if (!node.size || !node.setSize) return;
  const minimum = node.computeSize?.();
  if (minimum && node.size[1] > minimum[1] + 8) return;
  const lines = text.split("\n");
  const longest = Math.max(...lines.map((line) => line.length));
  const width = Math.max(node.size[0], Math.min(MAX_WIDTH, 40 + longest * CHAR_PX));
  const perLine = Math.max(10, Math.floor((width - 40) / CHAR_PX));
  const wrapped = lines.reduce((n, line) => n + Math.max(1, Math.ceil(line.length / perLine)), 0);
  const wanted = Math.min(MAX_LINES, wrapped) * 14 + 16;
  const height = Math.max(node.size[1], (minimum?.[1] ?? node.size[1]) + Math.max(0, wanted - TEXT_MIN_HEIGHT));
  if (width !== node.size[0] || height !== node.size[1]) node.setSize([width, height]);
}

export function showText(node, output) {
  const text = outputText(output);
  if (text == null) return;
  const core = corePreview();
  if (core?.updateTextPreviewWidgets && textWidget(node)?.name === "preview_text") {
    core.updateTextPreviewWidgets(node, output);
  } else {
    const widget = textWidget(node);
    if (widget) widget.value = text;
  }
  fitText(node, text);
  node.setDirtyCanvas?.(true, true);
}
