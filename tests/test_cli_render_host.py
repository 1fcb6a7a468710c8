"""`python -m rerender_cli render`: the main job in process on an embedded host equals the same job queued on the
real server, frame for frame and bit for bit; the node definitions it checks `--set` against are the server's;
a missing model names the folders searched; no host found names where it looked and COMFYUI_PATH."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from host_compat import REPO_ROOT
from test_cli_propagate import read_video
from test_workflows_host import HEADLESS_SETS

LAUNCHER = [sys.executable, str(Path(__file__).resolve().parent / "launch_cli.py"), "render"]
TINY_JOB = ["--checkpoint", "tiny_sd15.safetensors", "--controlnet", "tiny_control.safetensors",
            "--prompt", "a pencil sketch",
            *[arg for item in HEADLESS_SETS["rerender_full_pipeline"] for arg in ("--set", item)]]


def render(*args, env=None):
    return subprocess.run([*LAUNCHER, *args], capture_output=True, text=True, timeout=1200, cwd=REPO_ROOT,
                          env=env)


def test_render_in_process_equals_the_same_job_queued_on_the_server(server, tmp_path):
    video = str(server.base / "input" / "clip.mp4")
    queued = render("--server", server.url, "--video", video, "--output", str(tmp_path / "server.mp4"), *TINY_JOB)
    assert queued.returncode == 0, queued.stderr[-3000:]
    embedded = render("--comfy-args", f"--base-directory {server.base}", "--video", video,
                      "--output", str(tmp_path / "embedded.mp4"), *TINY_JOB)
    assert embedded.returncode == 0, embedded.stderr[-3000:]
    assert "key frame" in embedded.stderr          # the progress line followed the host's own messages
    (server_frames, server_fps), (embedded_frames, embedded_fps) = (read_video(tmp_path / name)
                                                                    for name in ("server.mp4", "embedded.mp4"))
    assert len(embedded_frames) == len(server_frames) == 6 and embedded_fps == server_fps
    for index, (ours, theirs) in enumerate(zip(embedded_frames, server_frames)):
        assert np.array_equal(ours, theirs), f"frame {index} differs"


def test_ctrl_c_stops_the_embedded_run_with_130_and_writes_nothing(server, tmp_path):
    log = tmp_path / "render.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen([*LAUNCHER, "--comfy-args", f"--base-directory {server.base}", "--video",
                                    str(server.base / "input" / "clip.mp4"), "--output", str(tmp_path / "o.mp4"),
                                    *TINY_JOB, "--set", "Rerender_KeyframeSampler.steps=400"],
                                   stderr=stderr, cwd=REPO_ROOT)
    try:
        deadline = time.time() + 600
        while "Key Frame Sampler [" not in log.read_text():      # sampling, with hundreds of steps to go
            assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    assert log.read_text().strip().splitlines()[-1].endswith("interrupted; no output written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["render.log"]


def test_node_definitions_are_the_servers_object_info(host, server):
    from rerender_cli.embedded import node_definitions
    import folder_paths
    ours = node_definitions(host.nodes, folder_paths)
    theirs = server.get_json("/object_info")
    import json
    pack_nodes = [name for name in theirs if name.startswith("Rerender_")]
    assert len(pack_nodes) == len(host.pack_node_ids)
    for name in pack_nodes:
        assert json.loads(json.dumps(ours[name]["input"])) == theirs[name]["input"], name


def test_a_missing_model_names_the_folders_searched(server, tmp_path):
    done = render("--comfy-args", f"--base-directory {server.base}", "--video", str(server.base / "input" / "clip.mp4"),
                  "--output", str(tmp_path / "o.mp4"), "--checkpoint", "not_there.safetensors")
    lines = done.stderr.strip().splitlines()
    assert (done.returncode, len(lines)) == (3, 1), done.stderr[-3000:]
    assert "'not_there.safetensors'" in lines[0] and str(server.base / "models" / "checkpoints") in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("comfyui_path", ["/nonexistent/ComfyUI", None])
def test_no_host_found_names_where_it_looked(tmp_path, comfyui_path):
    if comfyui_path is None and REPO_ROOT.parent.name == "custom_nodes":
        pytest.skip("this clone sits in a ComfyUI's custom_nodes/: that host is found")
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    if comfyui_path:
        env["COMFYUI_PATH"] = comfyui_path
    done = render("--video", str(REPO_ROOT / "rerender_cli" / "demo" / "clip.mp4"), "--output",
                  str(tmp_path / "o.mp4"), env=env)
    lines = done.stderr.strip().splitlines()
    assert (done.returncode, len(lines)) == (3, 1), done.stderr[-3000:]
    assert "no ComfyUI host found" in lines[0] and "COMFYUI_PATH" in lines[0]
    assert (comfyui_path or str(REPO_ROOT.parent)) in lines[0]
    assert list(tmp_path.iterdir()) == []
