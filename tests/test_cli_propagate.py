"""`python -m rerender_cli propagate`: the shipped demo, the streamed propagation against the node's whole-clip
propagation, every bad input refused in one line with exit 3 and nothing written, and Ctrl-C."""
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch

from host_compat import REPO_ROOT, default_sigint
from rerender import propagate
from rerender.flow import DISEstimator, VideoFlow
from rerender_cli import propagate_video
from rerender_cli.video_files import VideoReader, VideoWriter

COMMAND = [sys.executable, "-m", "rerender_cli", "propagate"]   # run with cwd=REPO_ROOT
# PatchMatch kept cheap: these tests check frames, rates, streaming and errors, not the propagation's quality
CHEAP = ["--search-vote-iters", "1", "--patchmatch-iters", "0", "--pyramid-levels", "1"]
CHEAP_SETTINGS = propagate.PropagationSettings(search_vote_iters=1, patchmatch_iters=0, pyramid_levels=1,
                                             warm_start=False)


def run_propagate(*args, timeout=600):
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def read_video(path) -> tuple:
    """(BGR frames, fps)."""
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames, fps


def test_demo_writes_every_frame_at_the_clip_rate_with_the_key_frames_exact(tmp_path):
    output = tmp_path / "demo.mkv"                  # lossless, so the key frames can be compared exactly
    done = run_propagate("--demo", "--output", str(output), *CHEAP)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"wrote {output}"
    frames, fps = read_video(output)
    source = VideoReader(propagate_video.DEMO_VIDEO)
    assert (len(frames), fps) == (source.count, pytest.approx(source.fps, abs=0.01)) == (25, pytest.approx(25.0))
    for index, path in propagate_video.DEMO_KEYS.items():
        assert np.array_equal(frames[index], cv2.imread(str(path))), f"key frame {index} changed"
    assert "ETA" in done.stderr


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    """12 frames of the demo clip at 48x64, lossless, and 'painted' (inverted) key frames 3, 4 and 8: frames before
    the first key, two keys with nothing between them, one interval and frames after the last key."""
    folder = tmp_path_factory.mktemp("small_clip")
    reader = VideoReader(propagate_video.DEMO_VIDEO)
    frames = [cv2.resize(reader.read(), (48, 64), interpolation=cv2.INTER_AREA) for _ in range(12)]
    with VideoWriter(folder / "clip.mkv", reader.fps, 48, 64) as writer:
        for frame in frames:
            writer.write(frame)
        writer.commit()
    keys = {}
    for index in (3, 4, 8):
        keys[index] = folder / f"key_{index}.png"
        cv2.imwrite(str(keys[index]), cv2.cvtColor(255 - frames[index], cv2.COLOR_RGB2BGR))
    return folder / "clip.mkv", keys, np.stack(frames)


def test_streamed_video_equals_the_nodes_whole_clip_propagation(small_clip, tmp_path):
    video, keys, frames = small_clip
    output = propagate_video.propagate_file(video, list(keys.items()), tmp_path / "out.mkv", CHEAP_SETTINGS,
                                            show_progress=False)
    streamed, _ = read_video(output)
    whole = torch.from_numpy(frames).float() / 255.0
    styles = torch.stack([propagate_video.as_float(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB))
                          for p in keys.values()])
    expected = propagate.propagate_video(whole, list(keys), styles, VideoFlow(whole, DISEstimator()), CHEAP_SETTINGS)
    assert len(streamed) == len(frames)
    for index, frame in enumerate(streamed):
        assert np.array_equal(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), propagate_video.as_uint8(expected[index])), index


def test_the_frames_after_the_last_key_are_streamed(small_clip):
    """The pass after the last key holds its key's frame and the two latest frames, however long it runs."""
    video, _, frames = small_clip
    reader = VideoReader(video)
    for _ in range(4):
        reader.read()
    window = propagate_video._StreamedFrames(reader, 3, torch.zeros(1))
    held = []
    for index in range(4, len(frames)):
        assert np.array_equal(propagate_video.as_uint8(window[index]), frames[index])
        window[index - 1]
        held.append(sorted(window.held))
    assert held[-1] == [3, len(frames) - 2, len(frames) - 1] and max(map(len, held)) == 3


@pytest.mark.parametrize("case, expected", [
    ("not_a_video", "is not a video OpenCV can read"),
    ("key_size", "is 32x32 but the video's frames are 48x64"),
    ("key_index", "key frame 12 (",),
    ("missing_raft", "RAFT weights 'raft-missing.pth' not found in"),
])
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(small_clip, tmp_path, case, expected):
    video, keys, _ = small_clip
    args = ["--video", str(video), "--key", f"3={keys[3]}", "--output", str(tmp_path / "out.mp4"), *CHEAP]
    if case == "not_a_video":
        (tmp_path / "notes.mp4").write_text("not a video")
        args[1] = str(tmp_path / "notes.mp4")
    elif case == "key_size":
        cv2.imwrite(str(tmp_path / "small.png"), np.zeros((32, 32, 3), np.uint8))
        args += ["--key", f"8={tmp_path / 'small.png'}"]
    elif case == "key_index":
        args += ["--key", f"12={keys[8]}"]
    else:
        args += ["--raft", str(tmp_path / "raft-missing.pth")]
        expected += f" {tmp_path}"
    done = run_propagate(*args)
    lines = done.stderr.strip().splitlines()
    assert (done.returncode, len(lines)) == (3, 1), done.stderr
    assert expected in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".png" and p.name != "notes.mp4") == []


def test_ctrl_c_exits_130_and_leaves_no_partial_output(tmp_path):
    output = tmp_path / "demo.mp4"
    process = subprocess.Popen([*COMMAND, "--demo", "--output", str(output)], stderr=subprocess.PIPE, text=True,
                               cwd=REPO_ROOT, preexec_fn=default_sigint)
    seen = ""
    deadline = time.time() + 300
    while "propagating" not in seen:                 # the first frame is done and the partial file is open
        assert process.poll() is None and time.time() < deadline, seen
        seen += process.stderr.read(1)
    process.send_signal(signal.SIGINT)
    try:
        assert process.wait(timeout=120) == 130
    finally:
        if process.poll() is None:
            process.kill()
    assert process.stderr.read().strip().splitlines()[-1].endswith("interrupted; no output written")
    assert list(tmp_path.iterdir()) == []
