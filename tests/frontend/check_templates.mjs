// Opens the host's template browser in headless Chromium, lists the pack's cards, opens each card and counts the
// nodes of the graph it loads, saving the card's thumbnail (<dir>/<name>.jpg): a square as the card shows it, the
// method's name and purpose in a banner of its groups' colour above a render of the graph fitted to the rest.
// Then runs the fidelity round trip from the editor twice, the second time failing in the Key Frame Picker, and
// reports what the pack's extension shows on the nodes.
// Last, a screenshot of the template browser as it shows the cards: <artefact dir>/template-browser.png.
// Usage: node check_templates.mjs <server url> <pack dir name> <thumbnail dir> <artefact dir>
import { createRequire } from "node:module";
import { join } from "node:path";
import { fitCanvasTo, quietCanvas } from "./canvas_view.mjs";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");
const [url, packName, thumbnailDir, artefactDir] = process.argv.slice(2);
const ROUND_TRIP = "Rerender - fidelity round trip";

const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"],
});
// What each card is for, drawn large above its graph: the card is a square about 256 px wide, where the graph's own
// node titles are a few pixels tall, so the name and this line are what reads at card size.
const PURPOSES = {
    "Rerender - video to video": "Restyle a clip with SD 1.5: ControlNet key frames, the frames between carried by flow",
    "Rerender - SDXL video to video": "The same restyling on SDXL: SDXL checkpoint and ControlNet, 1024 px key frames",
    "Rerender - FRESCO": "Restyle a clip with FRESCO: adaptive key frames rendered with flow-guided attention",
    "Rerender - TokenFlow": "Edit the whole clip at once: DDIM inversion, then TokenFlow's shared features",
    "Rerender - Tune-A-Video": "Tune the model on the clip itself, then render it again from a new prompt",
    "Rerender - painted key frames": "Paint the key frames yourself: flow carries your colours across the clip",
    "Rerender - fidelity img2img": "img2img from the fidelity-oriented encode, which keeps the input's fine detail",
    "Rerender - fidelity round trip": "Encode and decode one image two ways, to compare how much detail survives",
};
const CARD_SIZE = 1024;        // the card's square in CSS pixels; the card shows it at about a quarter of this
const BANNER_HEIGHT = 340;    // its top left stays clear: the card draws a "Node graph" badge there
const GRAPH_MARGIN = 20;

/** The method's banner over the top of the canvas, in its groups' colour. */
function drawBanner({ name, purpose, size, bannerHeight }) {
    const graph = window.app.graph;
    const colour = graph._groups[0]?.color ?? "#3f789e";   // build_workflows gives each card's groups one colour
    const hex = colour.replace("#", "");
    const full = hex.length === 3 ? [...hex].map((c) => c + c).join("") : hex;
    const rgb = [0, 2, 4].map((i) => Math.round(parseInt(full.slice(i, i + 2), 16) * 0.6));
    const banner = document.createElement("div");
    banner.id = "rerender-thumbnail-banner";
    Object.assign(banner.style, { position: "fixed", left: "0", top: "0", width: `${size}px`,
        height: `${bannerHeight}px`, boxSizing: "border-box", padding: "0 44px 34px", zIndex: "2147483647",
        background: `rgb(${rgb.join(",")})`, color: "#fff", fontFamily: "Inter, Arial, sans-serif",
        display: "flex", flexDirection: "column", justifyContent: "flex-end", gap: "18px" });
    const title = document.createElement("div");
    title.textContent = name.replace(/^Rerender - /, "");
    Object.assign(title.style, { fontSize: "104px", fontWeight: "800", lineHeight: "1", whiteSpace: "nowrap" });
    const line = document.createElement("div");
    line.textContent = purpose;
    Object.assign(line.style, { fontSize: "40px", lineHeight: "1.2", fontWeight: "500" });
    banner.append(title, line);
    document.body.append(banner);
    for (let font = 104; title.scrollWidth > title.clientWidth && font > 48; font -= 4) {
        title.style.fontSize = `${font}px`;
    }
}

const report = { cards: [], thumbnails: {}, thumbnailsServed: [], opened: {}, thumbnailScale: {}, errorNodes: {},
    captioned: {}, status: {} };
try {
    // twice the pixels: the graph's node titles stay sharp enough to read when the picture is opened full size
    const page = await browser.newPage({ viewport: { width: CARD_SIZE, height: CARD_SIZE }, deviceScaleFactor: 2 });
    page.on("response", (response) => {
        const path = decodeURIComponent(new URL(response.url()).pathname);
        if (path.startsWith(`/api/workflow_templates/${packName}/`) && path.endsWith(".jpg") && response.ok()) {
            report.thumbnailsServed.push(path.split("/").pop().replace(/\.jpg$/, ""));
        }
    });
    await page.goto(url, { waitUntil: "load", timeout: 120000 });
    await page.waitForFunction(() => window.app?.graph && window.LiteGraph, null, { timeout: 120000 });
    await page.waitForTimeout(1500);
    await quietCanvas(page);

    /** Each card's name and whether its thumbnail loaded (cards load it once they are in view). */
    async function cardImages() {
        const seen = [];
        for (const card of document.querySelectorAll('[data-testid^="template-workflow-"]')) {
            card.scrollIntoView();
            let image = card.querySelector("img");
            for (let wait = 0; wait < 50 && !(image?.complete && image.naturalWidth > 0); wait++) {
                await new Promise((resolve) => setTimeout(resolve, 100));
                image = card.querySelector("img");
            }
            seen.push({ name: card.dataset.testid.replace("template-workflow-", ""), src: image?.src ?? "",
                loaded: Boolean(image?.complete && image.naturalWidth > 0) });
        }
        document.querySelector('[data-testid^="template-workflow-"]')?.scrollIntoView();
        return seen;
    }

    async function openPackTemplates(view = page) {
        await view.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
        await view.getByText(packName, { exact: true }).first().click();
        await view.waitForSelector('[data-testid^="template-workflow-"]', { timeout: 30000 });
        await view.waitForTimeout(1000);
    }

    await openPackTemplates();
    const cards = await page.evaluate(cardImages);
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
        await page.keyboard.press("Escape");
        await page.evaluate(() => window.app.extensionManager.command.execute("Workspace.ToggleFocusMode"));
        report.thumbnailScale[name] = await page.evaluate(fitCanvasTo, { margin: GRAPH_MARGIN,
            area: { left: 0, top: BANNER_HEIGHT, width: CARD_SIZE, height: CARD_SIZE - BANNER_HEIGHT } });
        // drawn with a red ring: a model or input file the server does not list
        report.errorNodes[name] = await page.evaluate(
            () => window.app.graph._nodes.filter((n) => n.has_errors).map((n) => n.title));
        report.captioned[name] = Boolean(PURPOSES[name]);
        await page.evaluate(drawBanner, { name, purpose: PURPOSES[name] ?? "", size: CARD_SIZE,
            bannerHeight: BANNER_HEIGHT });
        await page.waitForTimeout(800);
        await page.screenshot({ path: join(thumbnailDir, `${name}.jpg`), type: "jpeg", quality: 72 });
        await page.evaluate(() => document.getElementById("rerender-thumbnail-banner").remove());
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

    // The cards as the browser shows them, with the thumbnails just written (a new page: none from the cache)
    const browsing = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    await browsing.goto(url, { waitUntil: "load", timeout: 120000 });
    await browsing.waitForFunction(() => window.app?.graph && window.LiteGraph, null, { timeout: 120000 });
    await openPackTemplates(browsing);
    await browsing.evaluate(cardImages);
    await browsing.waitForTimeout(500);
    await browsing.screenshot({ path: join(artefactDir, "template-browser.png") });
} finally {
    await browser.close();
}
console.log(JSON.stringify(report));
