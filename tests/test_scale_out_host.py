"""The main job spread over three real ComfyUI servers on loopback (`python -m rerender_cli.run_headless --servers`): one of them is
killed while it holds intervals, and the job still ends with every interval done exactly once and the very video
the one-server run writes; a frozen server is dropped within the websocket heartbeat; losing the server that renders
the key frames renders them again on another; Ctrl-C stops the job's prompts.

The tests share the three servers and run in file order: b is frozen and thawed, c is killed, then b is killed,
and the last test has only a."""
import asyncio
import os
import re
import signal
import subprocess
import time

import cv2
import numpy as np
import pytest

from host_compat import REPO_ROOT, make_base_directory
from host_server import HostServer
from test_headless_host import interrupt, other_clients_prompt, wait_until
from test_workflows_host import HEADLESS

from rerender_cli import scale_out  # noqa: E402

# 11 frames, a key frame every 4th without the last: keys 0, 4, 8 -> intervals 0-4, 4-8 and the frames after 8.
FRAMES, FPS, SIZE, INTERVAL = 11, 10, 48, 4   # 48 px: not a multiple of 32, so the padded transfer is exercised
SETS = [f"Video Frames.longer_side={SIZE}", f"Rerender_KeyframePicker.interval={INTERVAL}",
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
    return [*HEADLESS, *where, "--video", str(clip), "--output", str(output),
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


@pytest.fixture(scope="module")
def one_server_video(three_servers, tmp_path_factory):
    """The plain one-server run (run_headless --server) on a: what every scale-out run must equal; and its time."""
    (a, _, _), clip = three_servers
    output = tmp_path_factory.mktemp("one_server") / "one.mp4"
    started = time.time()
    single = subprocess.run(command(clip, output, "--server", a.url), capture_output=True, text=True, timeout=600,
                            cwd=REPO_ROOT)
    assert single.returncode == 0, single.stderr[-3000:]
    frames = decoded_frames(output)
    assert frames.shape == (FRAMES, SIZE, SIZE, 3)
    return frames, time.time() - started


def label(server) -> str:
    return server.url.removeprefix("http://")


def test_a_frozen_server_is_dropped_within_the_heartbeat(three_servers, monkeypatch):
    """A stopped process still accepts connections (the kernel does) but never answers: only the missing pong can
    tell. Its pending HTTP call and the prompts it holds must fail with ServerLost, not wait forever."""
    (_, b, _), _ = three_servers
    monkeypatch.setattr(scale_out, "HEARTBEAT_S", 2)

    async def freeze_and_call():
        async with scale_out.aiohttp.ClientSession() as session:
            server = scale_out.Server(b.url, session)
            await server.connect()
            held = server._outcome("a prompt it holds")
            os.kill(b.proc.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(scale_out.ServerLost):
                    await asyncio.wait_for(server._request("GET", "/queue"), timeout=30)
                waited = time.monotonic() - started
            finally:
                os.kill(b.proc.pid, signal.SIGCONT)
            assert isinstance(held.exception(), scale_out.ServerLost) and not server.alive
            await server.close()
            return waited
    waited = asyncio.run(freeze_and_call())
    assert waited < 3 * 2, f"dropped after {waited:.1f}s with a 2 s heartbeat"


def test_killed_server_loses_no_interval_and_the_video_equals_the_one_server_run(three_servers, one_server_video,
                                                                                 tmp_path):
    (a, b, c), clip = three_servers
    one, one_server_s = one_server_video
    # c is busy with another client's long prompt: the intervals it takes wait in its queue until it is killed
    c.submit(other_clients_prompt("rerender_fidelity_img2img", steps=400))
    log = tmp_path / "scale_out.log"
    started = time.time()
    with open(log, "w") as stderr:
        job = subprocess.Popen(command(clip, tmp_path / "three.mp4", "--servers", f"{a.url},{b.url},{c.url}"),
                               stderr=stderr, text=True, cwd=REPO_ROOT)
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
    done = re.findall(r"interval (\d+-\d+) done on (\S+)", text)
    requeued = re.findall(r"interval (\d+-\d+) re-queued", text)
    assert sorted(label for label, _ in done) == EXPECTED, text      # each interval once, none lost
    assert label(c) not in {where for _, where in done}
    assert f"lost {label(c)}" in text and len(requeued) == held >= 1, text
    assert np.array_equal(one, decoded_frames(tmp_path / "three.mp4"))
    print(f"\nwall time: one server (run_headless --server) {one_server_s:.1f}s; three servers with one killed "
          f"(--servers) {three_servers_s:.1f}s, {held} interval(s) re-queued")


def test_losing_the_key_frame_server_renders_the_key_frames_on_another(three_servers, one_server_video, tmp_path):
    (a, b, c), clip = three_servers
    log = tmp_path / "scale_out.log"
    with open(log, "w") as stderr:     # b first: it renders the key frames
        job = subprocess.Popen(command(clip, tmp_path / "video.mp4", "--servers", f"{b.url},{a.url}"),
                               stderr=stderr, text=True, cwd=REPO_ROOT)
    try:
        wait_until(lambda: f"{label(b)}: key frames" in log.read_text(), job, log, timeout_s=300)
        b.proc.kill()
        assert job.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    assert f"lost {label(b)}" in text and f"key frames rendered on {label(a)}" in text, text
    assert sorted(re.findall(r"interval (\d+-\d+) done on " + re.escape(label(a)), text)) == EXPECTED, text
    assert np.array_equal(one_server_video[0], decoded_frames(tmp_path / "video.mp4"))


def test_ctrl_c_stops_the_jobs_prompt_on_its_server(three_servers, tmp_path):
    (a, b, c), clip = three_servers
    log = tmp_path / "scale_out.log"
    slow = command(clip, tmp_path / "video.mp4", "--servers", f"{a.url},{c.url}") + [
        "--set", "Rerender_KeyframeSampler.steps=400"]
    with open(log, "w") as stderr:     # c is gone: the job goes on with a alone
        job = subprocess.Popen(slow, stderr=stderr, text=True, cwd=REPO_ROOT)
    wait_until(lambda: f"{label(a)}: key frames" in log.read_text(), job, log, timeout_s=300)
    running = a.queued_ids()[0]
    assert len(running) == 1
    interrupt(job, log)
    entry = a.wait_for_history(running[0], timeout_s=60)
    assert "execution_interrupted" in [message[0] for message in entry["status"]["messages"]]
    assert a.queued_ids() == ([], [])
    assert "going on without it" in log.read_text()
