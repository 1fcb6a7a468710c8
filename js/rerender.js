// comfyui-rerender frontend: shows on the nodes what the server reports (no polling).
//  - Key Frame Picker: the picked indices, from the node's execution result (ui.rerender_indices).
//  - Key Frame Sampler: which key frame is rendering, from "rerender.keyframe_progress" websocket messages.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PICKER = "Rerender_KeyframePicker";
const STATUS_HEIGHT = 20;

function setStatus(node, text) {
    node.rerenderStatus = text;
    node.setDirtyCanvas?.(true, true);
    app.graph?.setDirtyCanvas(true, true);
}

function drawStatus(node, ctx) {
    if (!node.rerenderStatus || node.flags?.collapsed) return;
    ctx.save();
    ctx.font = "12px sans-serif";
    ctx.fillStyle = "#8fd18f";
    ctx.textBaseline = "bottom";
    const maxWidth = node.size[0] - 16;
    let text = node.rerenderStatus;
    while (text.length > 4 && ctx.measureText(text).width > maxWidth) text = text.slice(0, -4) + "…";
    ctx.fillText(text, 8, node.size[1] - 4);
    ctx.restore();
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
            return [size[0], size[1] + STATUS_HEIGHT];
        };

        if (nodeData.name === PICKER) {
            const onExecuted = nodeType.prototype.onExecuted;
            nodeType.prototype.onExecuted = function (message) {
                onExecuted?.apply(this, arguments);
                const indices = message?.rerender_indices?.[0];
                if (indices !== undefined) setStatus(this, `key frames: ${indices}`);
            };
        }
    },

    async setup() {
        api.addEventListener("rerender.keyframe_progress", ({ detail }) => {
            const node = app.graph?.getNodeById(Number(detail.node)) ?? app.graph?.getNodeById(detail.node);
            if (!node) return;
            setStatus(node, `key frame ${detail.key_frame + 1}/${detail.total} (frame ${detail.frame_index})`);
        });
    },
});
