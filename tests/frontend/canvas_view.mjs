// Shared by the browser checks: how the editor's canvas is pointed at part of a graph before a screenshot.

/** Runs in the page (page.evaluate): zooms and pans the canvas so that the given nodes (every node and group when
 * `nodeIds` is empty) fill the rectangle `area` of the viewport, in CSS pixels, less `margin`; returns the zoom. */
export function fitCanvasTo({ nodeIds = [], area, margin }) {
    const graph = window.app.graph;
    const canvas = window.app.canvas;
    const titleHeight = window.LiteGraph.NODE_TITLE_HEIGHT;
    const nodes = nodeIds.length ? nodeIds.map((id) => graph.getNodeById(id)) : graph._nodes;
    const groups = nodeIds.length ? [] : graph._groups;
    const boxes = [...groups.map((g) => [...(g._bounding ?? g.bounding)]),
        ...nodes.map((n) => [n.pos[0], n.pos[1] - titleHeight, n.size[0], n.size[1] + titleHeight])];
    const left = Math.min(...boxes.map((b) => b[0])), top = Math.min(...boxes.map((b) => b[1]));
    const width = Math.max(...boxes.map((b) => b[0] + b[2])) - left;
    const height = Math.max(...boxes.map((b) => b[1] + b[3])) - top;
    const areaWidth = area.width - 2 * margin, areaHeight = area.height - 2 * margin;
    const scale = Math.min(areaWidth / width, areaHeight / height);
    canvas.deselectAll?.();
    canvas.ds.scale = scale;
    canvas.ds.offset[0] = (area.left + margin + (areaWidth - width * scale) / 2) / scale - left;
    canvas.ds.offset[1] = (area.top + margin + (areaHeight - height * scale) / 2) / scale - top;
    canvas.setDirty(true, true);
    return scale;
}

/** Settings for pictures of the graph: node titles and widgets drawn at any zoom, no stats, zoom toolbar or minimap. */
export async function quietCanvas(page) {
    await page.evaluate(async () => {
        const settings = { "LiteGraph.Canvas.MinFontSizeForLOD": 0,
            "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1, "Comfy.Graph.CanvasInfo": false,
            "Comfy.Graph.CanvasMenu": false, "Comfy.Minimap.Visible": false };
        for (const [id, value] of Object.entries(settings)) await window.app.extensionManager.setting.set(id, value);
    });
}
