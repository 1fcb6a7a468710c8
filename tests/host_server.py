"""A real ComfyUI server process on a free loopback port, with this pack installed, for end-to-end tests."""
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp

LAUNCHER = Path(__file__).resolve().parent / "launch_host.py"
STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HostServer:
    def __init__(self, comfy_path: Path, base: Path):
        self.comfy_path, self.base = comfy_path, base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.proc = None

    def command(self, *extra) -> list:
        return [sys.executable, str(LAUNCHER), str(self.comfy_path / "main.py"), "--cpu", "--disable-api-nodes",
                "--base-directory", str(self.base), *extra]

    def start(self) -> "HostServer":
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.command("--listen", "127.0.0.1", "--port", str(self.port)),
                                         stdout=log, stderr=subprocess.STDOUT, cwd=str(self.comfy_path),
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.time() + STARTUP_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start:\n{self.log()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if time.time() > deadline:
                    self.stop()                       # a server that never listened must not outlive the test
                    raise RuntimeError(f"ComfyUI did not listen within {STARTUP_TIMEOUT_S}s:\n{self.log()[-3000:]}")
                time.sleep(1)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def get_json(self, route: str):
        async def fetch():
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{self.url}{route}") as response:
                    assert response.status == 200, f"GET {route}: HTTP {response.status}"
                    return await response.json()
        return asyncio.run(fetch())

    def post_prompt(self, prompt: dict) -> tuple:
        """POST /prompt without waiting for a run: (HTTP status, response body)."""
        async def post():
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{self.url}/prompt", json={"prompt": prompt}) as response:
                    return response.status, await response.json()
        return asyncio.run(post())

    def post_json(self, route: str, body: dict):
        async def post():
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{self.url}{route}", json=body) as response:
                    return response.status, await response.json(content_type=None)
        return asyncio.run(post())

    def queued_ids(self) -> tuple:
        """(prompt ids running, prompt ids pending) from GET /queue."""
        queue = self.get_json("/queue")
        return [item[1] for item in queue["queue_running"]], [item[1] for item in queue["queue_pending"]]

    def history_ids(self) -> set:
        return set(self.get_json("/history"))

    def submit(self, prompt: dict, client_id: str = "another-client") -> str:
        """POST /prompt without following it; the prompt id."""
        status, body = self.post_json("/prompt", {"prompt": prompt, "client_id": client_id})
        assert status == 200, body
        return body["prompt_id"]

    def wait_for_history(self, prompt_id: str, timeout_s: float = 300) -> dict:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None:           # the host writes a history entry when the prompt is done
                return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout_s}s")

    def queue(self, prompt: dict, timeout_s: float = 600) -> tuple:
        """POST /prompt, follow /ws until the prompt finishes; returns (ws messages, its /history entry)."""
        return asyncio.run(self._queue(prompt, timeout_s))

    async def _queue(self, prompt, timeout_s):
        client_id = uuid.uuid4().hex
        messages = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={client_id}") as ws:
                async with session.post(f"{self.url}/prompt",
                                        json={"prompt": prompt, "client_id": client_id}) as response:
                    body = await response.json()
                    assert response.status == 200, f"/prompt rejected the workflow: {json.dumps(body)[:3000]}"
                    prompt_id = body["prompt_id"]
                deadline = time.time() + timeout_s
                while time.time() < deadline:
                    msg = await ws.receive(timeout=timeout_s)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    data = json.loads(msg.data)
                    messages.append(data)
                    if data["type"] in ("execution_error", "execution_interrupted"):
                        break
                    if data["type"] == "executing" and data["data"].get("node") is None \
                            and data["data"].get("prompt_id") == prompt_id:
                        break
            async with session.get(f"{self.url}/history/{prompt_id}") as response:
                history = await response.json()
        return messages, history[prompt_id]
