// comfyui-rerender frontend: shows on the nodes what the server reports (no polling).
//  - Every Rerender node: the text lines of its execution result (the picker's indices, the sampler's report,
//    notes such as a frame size the VAE cannot take), drawn under its widgets.
//  - Key Frame Sampler / FRESCO Key Frames: which key frame or batch is rendering, from "rerender.keyframe_progress"
//    websocket messages (a message's `text`, when it has one, is shown as it is).
//  - Texts are cleared when a run starts, and put back for the nodes the run takes from the server's cache (their
//    result is the one shown before); a run that fails or is interrupted clears the progress lines it left.
//  - Key Frame Picker: only the chosen mode's widgets are shown, and cut_threshold only with split_at_cuts on.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PICKER = "Rerender_KeyframePicker";
const LINE_HEIGHT = 16;
const MODE_WIDGETS = { uniform: ["interval", "include_last"], adaptive: ["s_min", "s_max"], list: ["index_list"] };

function packNodes() {
    return (app.graph?._nodes ?? []).filter((node) => node.type?.startsWith("Rerender_"));
}

function redraw(node) {
    node.setSize?.([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
    node.setDirtyCanvas?.(true, true);
    app.graph?.setDirtyCanvas(true, true);
}

function setStatus(node, lines, isProgress = false) {
    node.rerenderStatus = lines;
    node.rerenderRows = lines.length;
    node.rerenderProgress = isProgress;
    redraw(node);
}

function clearStatus(nodes) {
    for (const node of nodes) {
        if (node.rerenderStatus?.length) setStatus(node, []);
    }
}

/** The text lines of a node's execution result (ui outputs), in a fixed order. */
function resultLines(message) {
    const lines = [];
    for (const indices of message?.rerender_indices ?? []) lines.push(`key frames: ${indices}`);
    for (const text of message?.text ?? []) lines.push(...String(text).split("\n"));
    for (const key of ["rerender_report", "rerender_notes"]) {
        for (const text of message?.[key] ?? []) lines.push(...String(text).split("\n"));
    }
    return lines.filter((line) => line.trim() !== "");
}

function wrap(ctx, text, maxWidth) {
    const words = text.split(" ");
    const rows = [];
    let row = "";
    for (const word of words) {
        const candidate = row ? `${row} ${word}` : word;
        if (row && ctx.measureText(candidate).width > maxWidth) {
            rows.push(row);
            row = word;
        } else {
            row = candidate;
        }
    }
    if (row) rows.push(row);
    return rows;
}

function statusRows(node, ctx) {
    ctx.font = "12px sans-serif";
    return (node.rerenderStatus ?? []).flatMap((line) => wrap(ctx, line, node.size[0] - 16));
}

function drawStatus(node, ctx) {
    if (!node.rerenderStatus?.length || node.flags?.collapsed) return;
    ctx.save();
    const rows = statusRows(node, ctx);
    ctx.fillStyle = "#8fd18f";
    ctx.textBaseline = "bottom";
    rows.forEach((row, i) => ctx.fillText(row, 8, node.size[1] - 4 - (rows.length - 1 - i) * LINE_HEIGHT));
    ctx.restore();
    if (node.rerenderRows !== rows.length) {     // wrapping is known only now: make room for every row
        node.rerenderRows = rows.length;
        redraw(node);
    }
}

function showModeWidgets(node) {
    const mode = node.widgets?.find((w) => w.name === "mode")?.value;
    const shown = new Set(MODE_WIDGETS[mode] ?? []);
    const modeOnly = new Set(Object.values(MODE_WIDGETS).flat());
    const splitAtCuts = node.widgets?.find((w) => w.name === "split_at_cuts")?.value;
    for (const widget of node.widgets ?? []) {
        if (modeOnly.has(widget.name)) widget.hidden = !shown.has(widget.name);
        if (widget.name === "cut_threshold") widget.hidden = !splitAtCuts;
    }
    node.setSize?.([node.size[0], node.computeSize()[1]]);
    app.graph?.setDirtyCanvas(true, true);
}

app.registerExtension({
    name: "comfyui-rerender.status",

    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!nodeData.name?.startsWith("Rerender_")) return;

        const onDrawForeground = nodeType.prototype.onDrawForeground;
        nodeType.prototype.onDrawForeground = function (ctx) {
            onDrawForeground?.apply(this, arguments);
            drawStatus(this, ctx);
        };
        const computeSize = nodeType.prototype.computeSize;
        nodeType.prototype.computeSize = function () {
            const size = computeSize ? computeSize.apply(this, arguments) : [200, 60];
            const rows = Math.max(this.rerenderRows ?? 0, this.rerenderStatus?.length ?? 0);
            return [size[0], size[1] + rows * LINE_HEIGHT + 4];
        };
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            this.rerenderResult = resultLines(message);
            setStatus(this, this.rerenderResult);
        };

        if (nodeData.name === PICKER) {
            const onNodeCreated = nodeType.prototype.onNodeCreated;
            nodeType.prototype.onNodeCreated = function () {
                const result = onNodeCreated?.apply(this, arguments);
                for (const name of ["mode", "split_at_cuts"]) {
                    const widget = this.widgets?.find((w) => w.name === name);
                    if (!widget) continue;
                    const callback = widget.callback;
                    widget.callback = (...args) => {
                        const out = callback?.apply(widget, args);
                        showModeWidgets(this);
                        return out;
                    };
                }
                showModeWidgets(this);
                return result;
            };
            const onConfigure = nodeType.prototype.onConfigure;
            nodeType.prototype.onConfigure = function () {
                const result = onConfigure?.apply(this, arguments);
                showModeWidgets(this);
                return result;
            };
        }
    },

    async setup() {
        api.addEventListener("execution_start", () => clearStatus(packNodes()));
        api.addEventListener("execution_cached", ({ detail }) => {
            const cached = new Set((detail?.nodes ?? []).map(String));
            for (const node of packNodes()) {
                if (cached.has(String(node.id)) && node.rerenderResult) setStatus(node, node.rerenderResult);
            }
        });
        for (const event of ["execution_error", "execution_interrupted"]) {
            api.addEventListener(event, () => clearStatus(packNodes().filter((node) => node.rerenderProgress)));
        }
        api.addEventListener("rerender.keyframe_progress", ({ detail }) => {
            const node = app.graph?.getNodeById(Number(detail.node)) ?? app.graph?.getNodeById(detail.node);
            if (!node) return;
            const line = detail.text ?? `key frame ${detail.key_frame + 1}/${detail.total} (frame ${detail.frame_index})`;
            setStatus(node, [line], true);
        });
    },
});
