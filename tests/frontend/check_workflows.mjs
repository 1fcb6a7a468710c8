// Opens the ComfyUI frontend in headless Chromium, loads each UI workflow given on the command line, and prints
// one JSON report: missing node types, "Missing" dialogs, console errors from the pack's js, extension presence.
// Usage: node check_workflows.mjs <server url> <pack dir name> <workflow.json>...
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");
const [url, packName, ...workflowPaths] = process.argv.slice(2);

const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"],
});
// What the editor really draws once a workflow is loaded: every node's box with its title bar, every group's box,
// and the width its title needs in the group's font (tests/workflow_geometry.py checks them).
function installGeometryProbe() {
    window.measureGeometry = () => {
        const titleHeight = window.LiteGraph.NODE_TITLE_HEIGHT;
        const ctx = document.createElement("canvas").getContext("2d");
        return {
            nodes: window.app.graph._nodes.map((n) => ({
                id: n.id, type: n.type, box: [n.pos[0], n.pos[1] - titleHeight, n.size[0], n.size[1] + titleHeight],
            })),
            groups: window.app.graph._groups.map((g) => {
                const fontSize = g.font_size ?? window.LiteGraph.DEFAULT_GROUP_FONT_SIZE ?? 24;
                ctx.font = `${fontSize}px ${window.LiteGraph.GROUP_FONT ?? "Arial"}`;
                return { title: g.title, box: [...(g._bounding ?? g.bounding)], titleWidth: ctx.measureText(g.title).width,
                         titlePadding: g.padding ?? 4 };
            }),
        };
    };
}

const report = { consoleErrors: [], packErrors: [], workflows: {}, extensionLoaded: false, scriptServed: false };
try {
    const page = await browser.newPage();
    const packPath = `/extensions/${packName}/`;
    page.on("console", (msg) => {
        if (msg.type() !== "error") return;
        const where = msg.location()?.url || "";
        const line = `${msg.text()} @ ${where}`;
        report.consoleErrors.push(line);
        if (where.includes(packPath) || msg.text().includes(packPath)) report.packErrors.push(line);
    });
    page.on("pageerror", (error) => {
        const line = `${error.message}\n${error.stack || ""}`;
        report.consoleErrors.push(line);
        if (line.includes(packPath)) report.packErrors.push(line);
    });
    page.on("response", (response) => {
        if (response.url().includes(`${packPath}rerender.js`) && response.ok()) report.scriptServed = true;
    });
    await page.goto(url, { waitUntil: "load", timeout: 120000 });
    await page.waitForFunction(() => window.app?.graph && window.LiteGraph, null, { timeout: 120000 });
    await page.waitForTimeout(2000);
    report.extensionLoaded = await page.evaluate(
        () => (window.app.extensions || []).some((e) => e.name === "comfyui-rerender.status"));
    for (const path of workflowPaths) {
        const workflow = JSON.parse(readFileSync(path, "utf8"));
        await page.evaluate((wf) => window.app.loadGraphData(wf), workflow);
        await page.evaluate(installGeometryProbe);
        await page.waitForTimeout(1500);
        report.workflows[path] = await page.evaluate((types) => ({
            unregistered: types.filter((t) => !window.LiteGraph.registered_node_types[t]),
            missingDialog: /missing node/i.test(document.body.innerText),
            nodesLoaded: window.app.graph._nodes.length,
            geometry: window.measureGeometry(),
        }), workflow.nodes.map((n) => n.type));
        // close any dialog before the next workflow
        await page.keyboard.press("Escape");
    }
} finally {
    await browser.close();
}
console.log(JSON.stringify(report));
