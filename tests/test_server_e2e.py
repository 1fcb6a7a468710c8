"""End to end: the real ComfyUI server on loopback with the pack installed, driven over its HTTP API and websocket
the way headless pipelines drive it."""
import json
import subprocess

import cv2

from host_compat import PACK_DIR_NAME, REPO_ROOT, make_base_directory
from host_server import STARTUP_TIMEOUT_S, HostServer


def test_server_starts_with_the_pack_and_lists_its_nodes(server):
    info = server.get_json("/object_info")
    log = server.log()
    assert "IMPORT FAILED" not in log, log[-3000:]
    assert PACK_DIR_NAME in log  # the loader's import-times list names every pack it loaded
    for node_id in ("Rerender_KeyframePicker", "Rerender_FidelityEncode", "Rerender_AdaINLatent"):
        node = info[node_id]
        assert node["category"].startswith("Rerender/")
        for name, spec in node["input"]["required"].items():
            assert spec[1].get("tooltip"), f"{node_id}.{name}"
        assert all(node["output_tooltips"])


def test_api_workflow_runs_to_success(server):
    prompt = json.loads((REPO_ROOT / "workflows" / "api" / "rerender_fidelity_roundtrip.json").read_text())
    prompt["1"]["inputs"]["image"] = "rerender_example.png"
    messages, entry = server.queue(prompt)
    kinds = [m["type"] for m in messages]
    assert "execution_error" not in kinds, [m for m in messages if m["type"] == "execution_error"]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]
    outputs = entry["outputs"]
    assert outputs["10"]["text"] == ["0"]                      # the picker's indices, via Preview Any
    for node, prefix in (("5", "fidelity_encode"), ("8", "plain_encode")):  # ids in build_workflows order
        image = outputs[node]["images"][0]
        saved = server.base / "output" / image["subfolder"] / image["filename"]
        assert prefix in image["filename"] and cv2.imread(str(saved)).shape == (128, 128, 3)
    assert "executed" in kinds


def test_quick_test_for_ci_exits_cleanly(host, tmp_path):
    quick = HostServer(host.comfy_path, make_base_directory(tmp_path))
    done = subprocess.run(quick.command("--quick-test-for-ci"), cwd=str(host.comfy_path), capture_output=True,
                          text=True, timeout=STARTUP_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "IMPORT FAILED" not in done.stdout + done.stderr
    assert PACK_DIR_NAME in done.stdout + done.stderr
