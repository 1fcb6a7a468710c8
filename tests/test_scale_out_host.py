"""The main job spread over three real ComfyUI servers on loopback (`run_headless.py --servers`): one of them is
killed while it holds intervals, and the job still ends with every interval done exactly once and the very video
the one-server run writes."""
import re
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from host_compat import make_base_directory
from host_server import HostServer
from test_headless_host import other_clients_prompt
from test_workflows_host import HEADLESS

# 11 frames, a key frame every 4th without the last: keys 0, 4, 8 -> intervals 0-4, 4-8 and the frames after 8.
FRAMES, FPS, SIZE, INTERVAL = 11, 10, 48, 4   # 48 px: not a multiple of 32, so the padded transfer is exercised
SETS = [f"ImageScale.width={SIZE}", f"ImageScale.height={SIZE}", f"Rerender_KeyframePicker.interval={INTERVAL}",
        "Rerender_KeyframePicker.include_last=false", "Rerender_KeyframeSampler.steps=2",
        "Rerender_PatchPropagator.search_vote_iters=3", "Rerender_PatchPropagator.patchmatch_iters=2",
        "Rerender_PatchPropagator.seed=7"]
EXPECTED = ["0-4", "4-8", "8-10"]


def write_clip(path, shared_data):
    capture = cv2.VideoCapture(str(shared_data / "videos" / "car_turn_480x480_10fps.mp4"))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (64, 64))
    for _ in range(FRAMES):
        frame = cv2.resize(capture.read()[1], (64, 64), interpolation=cv2.INTER_AREA)
        writer.write(frame)
    writer.release()
    return frame


@pytest.fixture(scope="module")
def three_servers(host, tmp_path_factory, shared_data):
    """Three servers, each with its own folders (nothing shared but HTTP) and the tiny models."""
    from tiny_models import save_tiny_checkpoint, save_tiny_controlnet
    servers = []
    for name in "abc":
        base = make_base_directory(tmp_path_factory.mktemp(f"scale_out_{name}"))
        for folder in ("checkpoints", "controlnet"):
            (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        save_tiny_checkpoint(base / "models" / "checkpoints" / "tiny_sd15.safetensors")
        save_tiny_controlnet(base / "models" / "controlnet" / "tiny_control.safetensors")
        servers.append(HostServer(host.comfy_path, base))
    clip = tmp_path_factory.mktemp("scale_out_clip") / "clip.mp4"
    frame = write_clip(clip, shared_data)
    cv2.imwrite(str(servers[2].base / "input" / "rerender_example.png"), frame)   # for another client's prompt
    started = []
    try:
        for server in servers:
            started.append(server.start())
        yield servers, clip
    finally:
        for server in started:
            server.stop()


def command(clip, output, *where):
    sets = [arg for item in SETS for arg in ("--set", item)]
    return [sys.executable, str(HEADLESS), *where, "--video", str(clip), "--output", str(output),
            "--checkpoint", "tiny_sd15.safetensors", "--controlnet", "tiny_control.safetensors", *sets]


def decoded_frames(path) -> np.ndarray:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    return np.stack(frames)


def test_killed_server_loses_no_interval_and_the_video_equals_the_one_server_run(three_servers, tmp_path):
    (a, b, c), clip = three_servers
    started = time.time()
    single = subprocess.run(command(clip, tmp_path / "one.mp4", "--server", a.url), capture_output=True,
                            text=True, timeout=600)
    one_server_s = time.time() - started
    assert single.returncode == 0, single.stderr[-3000:]

    # c is busy with another client's long prompt: the intervals it takes wait in its queue until it is killed
    c.submit(other_clients_prompt("rerender_fidelity_img2img", steps=400))
    log = tmp_path / "scale_out.log"
    started = time.time()
    with open(log, "w") as stderr:
        job = subprocess.Popen(command(clip, tmp_path / "three.mp4", "--servers", f"{a.url},{b.url},{c.url}"),
                               stderr=stderr, text=True)
    try:
        deadline = time.time() + 300
        while not c.queued_ids()[1]:         # pending prompts on c: ours, behind the blocker
            assert job.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.2)
        held = len(c.queued_ids()[1])
        c.proc.kill()
        assert job.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    three_servers_s = time.time() - started
    text = log.read_text()
    c_label = c.url.removeprefix("http://")
    done = re.findall(r"interval (\d+-\d+) done on (\S+)", text)
    requeued = re.findall(r"interval (\d+-\d+) re-queued", text)
    assert sorted(label for label, _ in done) == EXPECTED, text      # each interval once, none lost
    assert c_label not in {where for _, where in done}
    assert f"lost {c_label}" in text and len(requeued) == held >= 1, text

    one, three = decoded_frames(tmp_path / "one.mp4"), decoded_frames(tmp_path / "three.mp4")
    assert one.shape == (FRAMES, SIZE, SIZE, 3)
    assert np.array_equal(one, three)
    print(f"\nwall time: one server (run_headless --server) {one_server_s:.1f}s; three servers with one killed "
          f"(--servers) {three_servers_s:.1f}s, {held} interval(s) re-queued")
