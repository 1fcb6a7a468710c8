"""The UI workflows in the real ComfyUI frontend (PyPI's comfyui-frontend-package served by the host), driven by
headless Chromium through playwright-core: no missing node, no console error from the pack's js, extension loaded."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from host_compat import PACK_DIR_NAME, REPO_ROOT, skip_or_fail
from workflow_geometry import problems

FRONTEND_TESTS = Path(__file__).resolve().parent / "frontend"
UI_WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))   # the API twins live in workflows/api/


@pytest.fixture(scope="module")
def browser_tools():
    if shutil.which("node") is None or not Path("/usr/bin/chromium").exists():
        skip_or_fail("frontend test skipped: needs node and Debian's chromium (/usr/bin/chromium)")
    if not (FRONTEND_TESTS / "node_modules" / "playwright-core").is_dir():
        skip_or_fail("frontend test skipped: run `npm install --prefix tests/frontend` for playwright-core")


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
