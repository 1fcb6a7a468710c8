"""Wall time of the main job on one ComfyUI server vs spread over several (`python -m rerender_cli.run_headless --servers`), all on this
machine, with the test suite's random-weight models: the one-server run (`--server`), the scale-out job on one
server and on all of them. Checks that the videos' frames are identical. On one machine the servers share its
cores, so this shows the mechanism's overhead, not the speed-up of separate machines. Every run gets freshly
started servers (server start-up is not timed), so the host's cache answers nothing from an earlier run; an untimed
first run warms the disk cache.

    COMFYUI_PATH=/path/to/ComfyUI python bench/scale_out_bench.py --servers 3 --frames 13 --size 64 --interval 4
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
from first_video_cost import write_clip, write_models  # noqa: E402
from host_compat import SHARED_DATA, find_comfyui, make_base_directory  # noqa: E402
from host_server import HostServer  # noqa: E402

HEADLESS = [sys.executable, "-m", "rerender_cli.run_headless"]   # run with cwd=REPO


def job(args, clip: Path, output: Path, *where) -> float:
    sets = [f"Video Frames.longer_side={args.size}",
            f"Rerender_KeyframePicker.interval={args.interval}", f"Rerender_KeyframeSampler.steps={args.steps}"]
    command = [*HEADLESS, *where, "--video", str(clip), "--output", str(output),
               "--checkpoint", "sd15_random.safetensors", "--controlnet", "control_random.safetensors",
               *[arg for item in sets for arg in ("--set", item)]]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(where)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def frames_of(path: Path) -> np.ndarray:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while (read := capture.read())[0]:
        frames.append(read[1])
    return np.stack(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--frames", type=int, default=13)
    parser.add_argument("--size", type=int, default=64, help="frame width and height after Upscale Image")
    parser.add_argument("--steps", type=int, default=3, help="Key Frame Sampler steps")
    parser.add_argument("--interval", type=int, default=4, help="Key Frame Picker interval")
    parser.add_argument("--unet", choices=["sd15", "test"], default="test",
                        help="test: the test suite's reduced UNet (default); sd15: SD1.5's full UNet")
    parser.add_argument("--clip", type=Path, default=SHARED_DATA / "videos" / "car_turn_480x480_10fps.mp4")
    args = parser.parse_args()
    comfy_path, reason = find_comfyui()
    if comfy_path is None:
        raise SystemExit(f"scale_out_bench: {reason}")
    work = Path(tempfile.mkdtemp(prefix="rerender_scale_out_"))
    try:
        bases = [make_base_directory(work / f"server_{i}") for i in range(args.servers)]
        write_models(comfy_path, bases[0], args.unet)
        for base in bases[1:]:                  # each server its own folders: nothing shared but HTTP
            for folder in ("checkpoints", "controlnet"):
                shutil.copytree(bases[0] / "models" / folder, base / "models" / folder, dirs_exist_ok=True)
        clip = work / "clip.mp4"
        write_clip(args.clip, clip, args.frames)
        runs = {"warm-up (untimed)": (1, "warm_up.mp4", "--server"),   # the first run also loads files from disk
                "one server, run_headless --server": (1, "one.mp4", "--server"),
                "one server, --servers": (1, "scale_1.mp4", "--servers"),
                f"{args.servers} servers, --servers": (args.servers, "scale_n.mp4", "--servers")}
        times = {}
        for what, (count, output, option) in runs.items():
            # freshly started servers for every run: the host's cache must not answer for an earlier run
            servers = [HostServer(comfy_path, base).start() for base in bases[:count]]
            try:
                times[what] = job(args, clip, work / output, option, ",".join(server.url for server in servers))
            finally:
                for server in servers:
                    server.stop()
        reference = frames_of(work / "one.mp4")
        same = [np.array_equal(reference, frames_of(work / name)) for name in ("scale_1.mp4", "scale_n.mp4")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"scale-out: {args.frames} frames x {args.size}x{args.size}, key frame interval {args.interval}, "
          f"{args.steps} steps, {args.unet} UNet, servers on one machine")
    for what, seconds in list(times.items())[1:]:
        print(f"  {what:36s} {seconds:8.1f} s")
    print(f"  frames identical to the one-server run: --servers 1: {same[0]}, --servers {args.servers}: {same[1]}")


if __name__ == "__main__":
    main()
