// Runs one shipped UI workflow from the editor in headless Chromium (widgets set for the test's tiny models), waits
// for the run to finish and reports what the preview nodes show: each image the frontend loaded for them (node.imgs,
// with its natural size) and the pack's status lines. Saves a screenshot of the picker and the preview nodes after the
// run: <artefact dir>/previews-after-run.png.
// Usage: node check_previews.mjs <server url> <workflow.json> <artefact dir> <widget values as JSON:
//        {"<node class>": {"<widget>": value}}>
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { fitCanvasTo, quietCanvas } from "./canvas_view.mjs";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");
const [url, workflowPath, artefactDir, valuesJson] = process.argv.slice(2);
const SHOWN_TYPES = ["Rerender_KeyframePicker", "PreviewImage"];
const SCREENSHOT = { width: 1200, height: 1300 };

const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"],
});
const report = { events: [], nodes: {}, missingWidgets: [] };
try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    await page.goto(url, { waitUntil: "load", timeout: 120000 });
    await page.waitForFunction(() => window.app?.graph && window.LiteGraph, null, { timeout: 120000 });
    await page.waitForTimeout(1500);
    await quietCanvas(page);
    report.missingWidgets = await page.evaluate(async ({ workflow, values }) => {
        await window.app.loadGraphData(workflow);
        const missing = [];
        for (const node of window.app.graph._nodes) {
            for (const [name, value] of Object.entries(values[node.type] ?? {})) {
                const widget = node.widgets?.find((w) => w.name === name);
                if (widget) widget.value = value;
                else missing.push(`${node.type}.${name}`);
            }
        }
        window.rerenderTestEvents = [];
        for (const type of ["execution_start", "execution_error", "execution_success"]) {
            window.app.api.addEventListener(type, () => window.rerenderTestEvents.push(type));
        }
        return missing;
    }, { workflow: JSON.parse(readFileSync(workflowPath, "utf8")), values: JSON.parse(valuesJson) });
    await page.keyboard.press("Escape");
    await page.evaluate(() => window.app.queuePrompt(0, 1));
    await page.waitForFunction(() => window.rerenderTestEvents.some((e) => e !== "execution_start"), null,
        { timeout: 600000 });
    report.events = await page.evaluate(() => window.rerenderTestEvents);

    // in view: the editor loads a preview's images once it draws the node
    const shown = await page.evaluate((types) => window.app.graph._nodes
        .filter((n) => types.includes(n.type)).map((n) => n.id), SHOWN_TYPES);
    await page.evaluate(() => window.app.extensionManager.command.execute("Workspace.ToggleFocusMode"));
    await page.setViewportSize(SCREENSHOT);                  // tall: the picker and previews lie in two columns
    await page.waitForTimeout(800);
    await page.evaluate(fitCanvasTo, { nodeIds: shown, margin: 24, area: { left: 0, top: 0, ...SCREENSHOT } });
    await page.waitForFunction(() => window.app.graph._nodes.filter((n) => n.type === "PreviewImage")
        .every((n) => n.imgs?.length && n.imgs.every((img) => img.complete && img.naturalWidth > 0)), null,
        { timeout: 30000 }).catch(() => {});                  // the report says what came
    await page.evaluate(fitCanvasTo, { nodeIds: shown, margin: 24, area: { left: 0, top: 0, ...SCREENSHOT } });
    await page.waitForTimeout(500);                          // again: a preview grows to fit its images
    report.nodes = await page.evaluate((ids) => Object.fromEntries(ids.map((id) => {
        const node = window.app.graph.getNodeById(id);
        return [node.title, { type: node.type, status: node.rerenderStatus ?? [],
            images: (node.imgs ?? []).map((img) => [img.naturalWidth, img.naturalHeight]) }];
    })), shown);
    await page.screenshot({ path: join(artefactDir, "previews-after-run.png") });
} finally {
    await browser.close();
}
console.log(JSON.stringify(report));
