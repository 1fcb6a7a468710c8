"""Patch propagator on a GPU: frames per second at 512x512 (both passes plus blending, default settings), the same
PSNR figures as the CPU bench for the same inputs, GPU-vs-CPU agreement, and peak GPU memory.

Inputs are those of bench/propagator_bench.py: the first `--frames` frames of a clip, centre-cropped to `--size`,
its ground-truth stylisation, key frames every `--interval` taken from it, OpenCV DIS flow. One command on the lent
GPU machine (the `shared/` data does not travel there: copy the clip into the checkout and pass `--video`):

    python bench/propagator_gpu_bench.py [--video path/to/clip.mp4]

The default clip is the committed tests/data/videos/man_talking_512x640_25fps.mp4 (found as the tests find clips:
tests/data first, then ../shared/data), so it travels with the checkout.

`--cpu-check` (on by default) also runs the same propagation on the CPU and prints the largest difference and both
PSNRs; `--device cpu` runs the whole script on the CPU (a smoke test where no GPU is lent).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
from gpu_suite import add_suite_arguments, emit, resolve_device  # noqa: E402
from host_compat import SHARED_DATA  # noqa: E402
from propagator_bench import CLIPS, psnr, read_clip, stylise  # noqa: E402
from rerender import propagate  # noqa: E402
from rerender.flow import DISEstimator, VideoFlow  # noqa: E402


def centre_crop(bgr: np.ndarray, size: int) -> np.ndarray:
    h, w = bgr.shape[1:3]
    if h < size or w < size:
        raise SystemExit(f"the clip is {w}x{h}, smaller than --size {size}")
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(bgr[:, top:top + size, left:left + size])


def timed_propagation(frames, keys, truth, flows, device) -> tuple:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    video = propagate.propagate_video(frames, keys, truth[keys], flows, propagate.PropagationSettings(),
                                      device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return video, time.perf_counter() - start


def mean_psnr(video, truth, targets) -> float:
    return float(np.mean([psnr(video[t], truth[t]) for t in targets]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, default=SHARED_DATA / "videos" / CLIPS["man"])
    parser.add_argument("--frames", type=int, default=11)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--no-cpu-check", dest="cpu_check", action="store_false")
    add_suite_arguments(parser, layouts=False)
    args = parser.parse_args()
    device = torch.device(resolve_device(args))

    bgr = centre_crop(read_clip(args.video, args.frames), args.size)
    frames = torch.from_numpy(bgr[..., ::-1].astype(np.float32) / 255.0)
    truth = torch.from_numpy(np.stack([stylise(f) for f in bgr]))
    keys = list(range(0, frames.shape[0], args.interval))
    targets = [t for t in range(frames.shape[0]) if t not in keys]
    flows = VideoFlow.estimate(frames, DISEstimator("medium"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.video.name}: {frames.shape[0]} frames {args.size}x{args.size}, keys {keys}, on {name}")

    timed_propagation(frames[:3], [0, 2], truth[:3], VideoFlow.estimate(frames[:3], DISEstimator("medium")),
                      device)  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    video, seconds = timed_propagation(frames, keys, truth, flows, device)
    fps = len(targets) / seconds
    print(f"  {device.type}: {fps:.2f} frames/s ({seconds / len(targets):.3f} s per output frame, both passes + "
          f"blending), PSNR {mean_psnr(video, truth, targets):.2f} dB")
    if device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f} MiB")
    if args.cpu_check and device.type != "cpu":
        cpu_video, cpu_seconds = timed_propagation(frames, keys, truth, flows, torch.device("cpu"))
        difference = float((cpu_video - video).abs().max())
        print(f"  cpu: {cpu_seconds / len(targets):.2f} s per output frame, PSNR "
              f"{mean_psnr(cpu_video, truth, targets):.2f} dB; largest |gpu - cpu| {difference:.2e}, mean "
              f"{float((cpu_video - video).abs().mean()):.2e}")
    print(f"  target: >= 10 frames/s at 512x512 -> {'met' if fps >= 10 else 'not met'}")
    emit(args, "frames/s", fps, {}, f"{args.size}x{args.size}, {frames.shape[0]} frames, keys {keys}")


if __name__ == "__main__":
    main()
