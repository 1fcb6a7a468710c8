// Opens the host's template browser in headless Chromium, lists the pack's cards, opens each card and counts the
// nodes of the graph it loads, saving a screenshot of that graph as the card's thumbnail (<dir>/<name>.jpg).
// Then runs the fidelity round trip from the editor twice, the second time failing in the Key Frame Picker, and
// reports what the pack's extension shows on the nodes.
// Usage: node check_templates.mjs <server url> <pack dir name> <thumbnail dir>
import { createRequire } from "node:module";
import { join } from "node:path";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");
const [url, packName, thumbnailDir] = process.argv.slice(2);
const ROUND_TRIP = "Rerender - fidelity round trip";

const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"],
});
const report = { cards: [], thumbnails: {}, thumbnailsServed: [], opened: {}, status: {} };
try {
    // wide like the graphs, so that the fitted graph fills the picture (the card shows its middle)
    const page = await browser.newPage({ viewport: { width: 1600, height: 900 } });
    page.on("response", (response) => {
        const path = decodeURIComponent(new URL(response.url()).pathname);
        if (path.startsWith(`/api/workflow_templates/${packName}/`) && path.endsWith(".jpg") && response.ok()) {
            report.thumbnailsServed.push(path.split("/").pop().replace(/\.jpg$/, ""));
        }
    });
    await page.goto(url, { waitUntil: "load", timeout: 120000 });
    await page.waitForFunction(() => window.app?.graph && window.LiteGraph, null, { timeout: 120000 });
    await page.waitForTimeout(1500);
    await page.evaluate(async () => {       // thumbnails: the graph alone, its node contents drawn when zoomed out
        const settings = { "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1, "Comfy.Graph.CanvasInfo": false,
            "Comfy.Graph.CanvasMenu": false, "Comfy.Minimap.Visible": false };
        for (const [id, value] of Object.entries(settings)) {
            try { await window.app.extensionManager.setting.set(id, value); } catch {}
        }
    });

    async function openPackTemplates() {
        await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
        await page.getByText(packName, { exact: true }).first().click();
        await page.waitForSelector('[data-testid^="template-workflow-"]', { timeout: 30000 });
        await page.waitForTimeout(1000);
    }

    await openPackTemplates();
    const cards = await page.evaluate(async () => {
        const seen = [];
        for (const card of document.querySelectorAll('[data-testid^="template-workflow-"]')) {
            card.scrollIntoView();                  // cards load their thumbnail once they are in view
            let image = card.querySelector("img");
            for (let wait = 0; wait < 50 && !(image?.complete && image.naturalWidth > 0); wait++) {
                await new Promise((resolve) => setTimeout(resolve, 100));
                image = card.querySelector("img");
            }
            seen.push({ name: card.dataset.testid.replace("template-workflow-", ""), src: image?.src ?? "",
                loaded: Boolean(image?.complete && image.naturalWidth > 0) });
        }
        return seen;
    });
    report.cards = cards.map((card) => card.name);
    for (const card of cards) report.thumbnails[card.name] = card;
    await page.keyboard.press("Escape");

    for (const name of report.cards) {
        await openPackTemplates();
        await page.locator(`[data-testid="template-workflow-${name}"]`).click();
        await page.waitForFunction(() => window.app.graph._nodes.length > 0, null, { timeout: 30000 })
            .catch(() => {});
        await page.waitForTimeout(1000);
        report.opened[name] = await page.evaluate(() => window.app.graph._nodes.length);
        await page.keyboard.press("Escape");  // a "missing models" dialog: the thumbnail shows the graph alone
        await page.evaluate(() => window.app.extensionManager.command.execute("Workspace.ToggleFocusMode"));
        await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.Canvas.FitView"));
        await page.evaluate(() => {        // no red rings: the model files are missing here, not on a user's disk
            for (const node of window.app.graph._nodes) node.has_errors = false;
            window.app.canvas.setDirty(true, true);
        });
        await page.waitForTimeout(800);
        await page.screenshot({ path: join(thumbnailDir, `${name}.jpg`), type: "jpeg", quality: 70 });
        await page.evaluate(() => window.app.extensionManager.command.execute("Workspace.ToggleFocusMode"));
    }

    // A run that succeeds, then one that fails in the picker (key frame 5 of a one-frame "clip").
    const workflow = await (await fetch(`${url}/api/workflow_templates/${packName}/${ROUND_TRIP}.json`)).json();
    await page.evaluate(async (wf) => {
        await window.app.loadGraphData(wf);
        const load = window.app.graph._nodes.find((n) => n.type === "LoadImage");
        load.widgets.find((w) => w.name === "image").value = "rerender_example.png";
        // an interval no other test queues: the picker really runs instead of coming from the server's cache
        const picker = window.app.graph._nodes.find((n) => n.type === "Rerender_KeyframePicker");
        picker.widgets.find((w) => w.name === "interval").value = 1000 + Math.floor(Math.random() * 9000);
        window.rerenderTestEvents = [];
        for (const type of ["execution_start", "execution_error", "execution_success"]) {
            window.app.api.addEventListener(type, () => window.rerenderTestEvents.push(type));
        }
    }, workflow);
    const picker = () => window.app.graph._nodes.find((n) => n.type === "Rerender_KeyframePicker");
    const pickerState = async () => page.evaluate((find) => {
        const node = eval(find)();
        return { status: node.rerenderStatus ?? [],
            hidden: Object.fromEntries(node.widgets.map((w) => [w.name, Boolean(w.hidden)])) };
    }, `(${picker})`);
    report.status.initial = await pickerState();
    await page.evaluate(() => window.app.queuePrompt(0, 1));
    await page.waitForFunction(() => window.rerenderTestEvents.includes("execution_success"), null,
        { timeout: 300000 });
    await page.waitForTimeout(500);
    report.status.afterSuccess = await pickerState();
    // the same graph again: the host serves it from its cache, and the picker keeps showing its result
    await page.evaluate(() => { window.rerenderTestEvents = []; window.app.queuePrompt(0, 1); });
    await page.waitForFunction(() => window.rerenderTestEvents.includes("execution_success"), null,
        { timeout: 300000 });
    await page.waitForTimeout(500);
    report.status.afterCachedRun = await pickerState();
    await page.evaluate((find) => {
        const node = eval(find)();
        const mode = node.widgets.find((w) => w.name === "mode");
        mode.value = "list";
        mode.callback?.(mode.value);
        node.widgets.find((w) => w.name === "index_list").value = "0,5";
        window.rerenderTestEvents = [];
    }, `(${picker})`);
    report.status.listMode = await pickerState();
    await page.evaluate(() => window.app.queuePrompt(0, 1));
    await page.waitForFunction(() => window.rerenderTestEvents.includes("execution_error"), null,
        { timeout: 300000 });
    await page.waitForTimeout(500);
    report.status.afterFailure = await pickerState();
    report.status.events = await page.evaluate(() => window.rerenderTestEvents);
} finally {
    await browser.close();
}
console.log(JSON.stringify(report));
