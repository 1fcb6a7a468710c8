"""The UI workflows in the real ComfyUI frontend (PyPI's comfyui-frontend-package served by the host), driven by
headless Chromium through playwright-core: no missing node, no console error from the pack's js, extension loaded;
and what the preview nodes show after a run."""
import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from host_compat import PACK_DIR_NAME, REPO_ROOT, skip_or_fail
from test_workflows_host import TINY_OVERRIDES
from workflow_geometry import problems

FRONTEND_TESTS = Path(__file__).resolve().parent / "frontend"
UI_WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))   # the API twins live in workflows/api/


@pytest.fixture(scope="module")
def browser_tools():
    if shutil.which("node") is None or not Path("/usr/bin/chromium").exists():
        skip_or_fail("frontend test skipped: needs node and Debian's chromium (/usr/bin/chromium)")
    if not (FRONTEND_TESTS / "node_modules" / "playwright-core").is_dir():
        skip_or_fail("frontend test skipped: run `npm install --prefix tests/frontend` for playwright-core")


# where the server lists each loader's file: the shipped names, which the test server does not have
MODEL_FOLDERS = {"CheckpointLoaderSimple": "checkpoints", "ControlNetLoader": "controlnet"}
INPUT_LOADERS = {"LoadVideo": "clip.mp4", "LoadImage": "rerender_example.png"}   # the test input each stands in for


@pytest.fixture
def shipped_files(server):
    """The files the shipped workflows name, under those names, for as long as the test runs: empty model files
    (the editor only checks the server lists them; no red ring on a loader that a user's disk satisfies) and copies
    of the test inputs (a Load Image shows its picture)."""
    made = []
    for path in UI_WORKFLOWS:
        for node in json.loads(path.read_text())["nodes"]:
            name = (node.get("widgets_values") or [""])[0]
            if not isinstance(name, str) or not name:
                continue
            if node["type"] in MODEL_FOLDERS:
                target = server.base / "models" / MODEL_FOLDERS[node["type"]] / name
            elif node["type"] in INPUT_LOADERS:
                target = server.base / "input" / name
            else:
                continue
            if target.exists():
                continue
            if node["type"] in INPUT_LOADERS:
                shutil.copyfile(server.base / "input" / INPUT_LOADERS[node["type"]], target)
            else:
                target.touch()
            made.append(target)
    yield
    for target in made:
        target.unlink()


def test_ui_workflows_load_without_missing_nodes_or_pack_errors(server, browser_tools):
    assert UI_WORKFLOWS, "no UI workflow found"
    done = subprocess.run(["node", str(FRONTEND_TESTS / "check_workflows.mjs"), server.url, PACK_DIR_NAME,
                           *map(str, UI_WORKFLOWS)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["scriptServed"] and report["extensionLoaded"], report
    assert report["packErrors"] == [], report["packErrors"]
    for path, result in report["workflows"].items():
        assert result["unregistered"] == [] and not result["missingDialog"], (path, result)
        assert result["nodesLoaded"] == len(json.loads(Path(path).read_text())["nodes"]), (path, result)
        # the layout as the editor draws it: its own node sizes and its own measure of each group title
        assert problems(result["geometry"]["nodes"], result["geometry"]["groups"]) == [], path


def test_previews_show_the_key_frames_and_flow_after_a_run_from_the_editor(server, browser_tools, shipped_files,
                                                                            tmp_path):
    """The shipped video to video graph queued from the editor on the tiny models (4 frames at 64 px, 2 steps): the
    picker shows its indices, the key frames preview one 64x64 image per key frame, the flow preview pair 0->1.
    The screenshot (previews-after-run.png in the test's tmp_path) shows what no assertion reads: the pictures."""
    values = {node_type: dict(inputs) for node_type, inputs in TINY_OVERRIDES.items()}
    values["Rerender_VideoFrames"]["frame_count"] = 4
    values["Rerender_KeyframeSampler"].update(steps=2, seed=random.randrange(2**31))
    # hidden while split_at_cuts is off, so the key frames stay the same: the picker runs instead of coming from the
    # server's cache (a cached node shows no text in a page that did not run it)
    values["Rerender_KeyframePicker"]["cut_threshold"] = round(random.uniform(0.3, 0.4), 6)
    done = subprocess.run(["node", str(FRONTEND_TESTS / "check_previews.mjs"), server.url,
                           str(REPO_ROOT / "workflows" / "Rerender - video to video.json"), str(tmp_path),
                           json.dumps(values)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"screenshot: {tmp_path / 'previews-after-run.png'}")
    assert report["missingWidgets"] == [] and report["events"] == ["execution_start", "execution_success"], report
    nodes = report["nodes"]
    assert nodes["Key Frame Picker"]["status"] == ["key frames: 0,3"], nodes
    assert nodes["Key frames preview"]["images"] == [[64, 64]] * 2, nodes
    assert nodes["Flow preview"]["images"] == [[64, 64]], nodes         # estimate on demand: pair 0->1 only
    assert (tmp_path / "previews-after-run.png").stat().st_size > 0
