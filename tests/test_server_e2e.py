"""End to end: the real ComfyUI server on loopback with the pack installed, driven over its HTTP API and websocket
the way headless pipelines drive it."""
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import cv2
import pytest

from host_compat import PACK_DIR_NAME, REPO_ROOT, SHARED_DATA, find_comfyui, make_base_directory

LAUNCHER = Path(__file__).resolve().parent / "launch_host.py"
STARTUP_TIMEOUT_S = 180
PROMPT_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def comfy_path():
    path, reason = find_comfyui()
    if path is None:
        pytest.skip(f"host tests skipped: {reason}")
    return path


@pytest.fixture(scope="module")
def server(comfy_path, tmp_path_factory):
    """A ComfyUI server process on a free loopback port; yields (base url, base dir, log path)."""
    base = make_base_directory(tmp_path_factory.mktemp("server_base"))
    frame = cv2.VideoCapture(str(SHARED_DATA / "videos" / "car_turn_480x480_10fps.mp4")).read()[1]
    cv2.imwrite(str(base / "input" / "rerender_example.png"), cv2.resize(frame, (128, 128)))
    port = free_port()
    log_path = base / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), str(comfy_path / "main.py"), "--cpu", "--listen", "127.0.0.1",
             "--port", str(port), "--disable-api-nodes", "--base-directory", str(base)],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(comfy_path), env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode} during start:\n{log_path.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"ComfyUI did not listen within {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
        yield url, base, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def get_json(session, url):
    async with session.get(url) as response:
        assert response.status == 200, f"GET {url}: HTTP {response.status}"
        return await response.json()


async def queue_and_follow(url, prompt):
    """POST /prompt, follow /ws until the prompt finishes, then return (ws messages, its /history entry)."""
    client_id = uuid.uuid4().hex
    messages = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
            async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
                body = await response.json()
                assert response.status == 200, f"/prompt rejected the workflow: {json.dumps(body)[:2000]}"
                prompt_id = body["prompt_id"]
            deadline = time.time() + PROMPT_TIMEOUT_S
            while time.time() < deadline:
                msg = await ws.receive(timeout=PROMPT_TIMEOUT_S)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                messages.append(data)
                if data["type"] in ("execution_error", "execution_interrupted"):
                    break
                if data["type"] == "executing" and data["data"].get("node") is None \
                        and data["data"].get("prompt_id") == prompt_id:
                    break
        history = await get_json(session, f"{url}/history/{prompt_id}")
    return messages, history[prompt_id]


def test_server_starts_with_the_pack_and_lists_its_nodes(server):
    url, _, log_path = server

    async def fetch():
        async with aiohttp.ClientSession() as session:
            return await get_json(session, f"{url}/object_info")

    info = asyncio.run(fetch())
    log = log_path.read_text()
    assert "IMPORT FAILED" not in log, log[-3000:]
    assert PACK_DIR_NAME in log  # the loader's import-times list names every pack it loaded
    for node_id in ("Rerender_KeyframePicker", "Rerender_FidelityEncode", "Rerender_AdaINLatent"):
        node = info[node_id]
        assert node["category"] == "Rerender"
        for name, spec in node["input"]["required"].items():
            assert spec[1].get("tooltip"), f"{node_id}.{name}"
        assert all(node["output_tooltips"])


def test_api_workflow_runs_to_success(server):
    url, base, _ = server
    prompt = json.loads((REPO_ROOT / "workflows" / "fidelity_roundtrip_api.json").read_text())
    messages, entry = asyncio.run(queue_and_follow(url, prompt))
    kinds = [m["type"] for m in messages]
    assert "execution_error" not in kinds, [m for m in messages if m["type"] == "execution_error"]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]
    outputs = entry["outputs"]
    assert outputs["10"]["text"] == ["0"]                      # the picker's indices, via Preview Any
    for node, prefix in (("5", "fidelity_encode"), ("8", "plain_encode")):
        image = outputs[node]["images"][0]
        saved = base / "output" / image["subfolder"] / image["filename"]
        assert prefix in image["filename"] and cv2.imread(str(saved)).shape == (128, 128, 3)
    assert "progress" in kinds or "executed" in kinds


def test_quick_test_for_ci_exits_cleanly(comfy_path, tmp_path):
    base = make_base_directory(tmp_path)
    done = subprocess.run([sys.executable, str(LAUNCHER), str(comfy_path / "main.py"), "--cpu",
                           "--quick-test-for-ci", "--disable-api-nodes", "--base-directory", str(base)],
                          cwd=str(comfy_path), capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "IMPORT FAILED" not in done.stdout + done.stderr
    assert PACK_DIR_NAME in done.stdout + done.stderr
