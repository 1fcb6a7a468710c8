"""Wall time of the main job on one ComfyUI server vs on a Dask LocalCluster of 1 and of N worker processes
(`python -m rerender_cli.run_headless --cluster`), all on this machine, with the test suite's random-weight
models; checks that the videos' frames are identical to the one-server run. On one machine the workers share its
cores, so this shows the mechanism's overhead, not the speed-up of separate machines. Every run gets a fresh server
or cluster whose start-up (ComfyUI loaded in each worker) is not timed, so no cache answers for an earlier run; an
untimed first run warms the disk cache. Also prints the lines of the project's own scheduling code.

    COMFYUI_PATH=/path/to/ComfyUI python bench/scale_out_bench.py --workers 3 --frames 13 --size 64 --interval 4
"""
import argparse
import os
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
SCHEDULING_CODE = ["rerender_cli/scale_out.py", "rerender_cli/dask_worker.py"]


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


def on_server(args, comfy_path: Path, base: Path, clip: Path, output: Path) -> float:
    server = HostServer(comfy_path, base).start()
    try:
        return job(args, clip, output, "--server", server.url)
    finally:
        server.stop()


def on_cluster(args, workers: int, clip: Path, output: Path) -> float:
    """A fresh LocalCluster of `workers` diffusion workers on 127.0.0.1, ComfyUI loaded in each before timing."""
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, resources={"diffusion": 1},
                      preload=["dask_preload", "rerender_cli.dask_worker"]) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers)
        return job(args, clip, output, "--cluster", cluster.scheduler_address)


def code_lines(paths) -> int:
    return sum(len((REPO / path).read_text().splitlines()) for path in paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
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
        base = make_base_directory(work / "base")
        write_models(comfy_path, base, args.unet)
        os.environ.update(COMFYUI_PATH=str(comfy_path), COMFYUI_ARGS=f"--cpu --disable-api-nodes --base-directory "
                          f"{base}", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
        sys.path.insert(0, str(REPO))
        clip = work / "clip.mp4"
        write_clip(args.clip, clip, args.frames)
        on_server(args, comfy_path, base, clip, work / "warm_up.mp4")     # untimed: loads the files from disk
        times = {"one server, run_headless --server": on_server(args, comfy_path, base, clip, work / "one.mp4"),
                 "LocalCluster of 1 worker, --cluster": on_cluster(args, 1, clip, work / "cluster_1.mp4"),
                 f"LocalCluster of {args.workers} workers, --cluster": on_cluster(args, args.workers, clip,
                                                                                  work / "cluster_n.mp4")}
        reference = frames_of(work / "one.mp4")
        same = [np.array_equal(reference, frames_of(work / name)) for name in ("cluster_1.mp4", "cluster_n.mp4")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"scale-out: {args.frames} frames x {args.size}x{args.size}, key frame interval {args.interval}, "
          f"{args.steps} steps, {args.unet} UNet, all on one machine")
    for what, seconds in times.items():
        print(f"  {what:40s} {seconds:8.1f} s")
    print(f"  frames identical to the one-server run: 1 worker: {same[0]}, {args.workers} workers: {same[1]}")
    print(f"  the project's own scheduling code: {code_lines(SCHEDULING_CODE)} lines ({', '.join(SCHEDULING_CODE)})")


def frames_of(path: Path) -> np.ndarray:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while (read := capture.read())[0]:
        frames.append(read[1])
    return np.stack(frames)


if __name__ == "__main__":
    main()
