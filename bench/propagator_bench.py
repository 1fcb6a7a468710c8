"""Patch propagator quality and speed against a known answer, beside plain flow warping and the original EbSynth.

Ground truth: a deterministic stylisation of every frame (issue 5): cv2.stylization(sigma_s=60, sigma_r=0.45), then
per BGR channel on 0..1: B = 0.85 x^1.25, G = x^0.9, R = 1.2 x^0.8, clipped. Key frames every `--interval` frames
are taken from it; every other frame is produced by
  ours      rerender.propagate (both passes per interval + temporal-aware blending, reference defaults),
  warp      the nearest key frame warped by the flow (bilinear), the anchor that costs nothing,
  ebsynth   the original EbSynth binary (when `ebsynth` is on PATH, or --ebsynth PATH), one forward pass from the
            previous key with the reference's guides and arguments (-searchvoteiters 12 -patchmatchiters 6), guides
            advected with the same flow and cv2.inpaint(TELEA, 30) like the reference.
All use the same OpenCV DIS flow. Printed: PSNR/SSIM per frame and by distance to the nearest key, the warp error of
each output (mean |out_t - warp(out_t-1)| on 0..255 over non-occluded pixels; the ground truth's own value is the
floor), and seconds per output frame.

Cases: a clip name, or NAME:S for every S-th frame of it (fast motion: `man:3` and `car:3` triple the motion per
frame), or NAME:zoomZ where frame t is the centred crop of frame t scaled up by (1 + Z/100)^t and resized back (the
subject comes toward the camera, on top of the clip's own motion: `man:zoom3` grows 3% per frame), or both
(`man:5:zoom3`: every fifth frame, then the zoom over the frames that remain). The ground truth is the stylisation of
the transformed frames. `--busy N` keeps N CPU-bound processes running beside the measurement (a user's machine is rarely idle);
`--busy-beside N` measures ours quiet, then again with N of them beside, in the same run. The busy processes are
bounded in time and stopped by the bench itself.
Example (quick): python bench/propagator_bench.py --frames 11 --clips man car man:3 car:3
"""
import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from rerender import propagate  # noqa: E402
from rerender.flow import DISEstimator, VideoFlow  # noqa: E402
from rerender.warp import flow_warp  # noqa: E402

VIDEOS = REPO.parent / "shared" / "data" / "videos"
CLIPS = {"man": "man_talking_512x640_25fps.mp4", "car": "car_turn_480x480_10fps.mp4"}


def read_clip(path: Path, count: int, stride: int = 1) -> np.ndarray:
    """The first `count` frames (0 = all) of every `stride`-th frame, BGR uint8."""
    capture = cv2.VideoCapture(str(path))
    frames, position = [], 0
    while count <= 0 or len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        if position % stride == 0:
            frames.append(frame)
        position += 1
    capture.release()
    return np.stack(frames)


def parse_case(case: str) -> tuple:
    """NAME[:STRIDE][:zoomZ] -> (name, stride, zoom percent per frame)."""
    name, *parts = case.split(":")
    stride, zoom = 1, 0.0
    try:
        if parts and parts[-1].startswith("zoom"):
            zoom = float(parts.pop()[4:])
        if parts:
            stride = int(parts.pop(0))
        valid = name in CLIPS and not parts and stride >= 1 and 0.0 <= zoom < 100.0
    except ValueError:
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"{case!r}: use one of {sorted(CLIPS)}, optionally with :STRIDE and/or "
                                         f":zoomZ (Z percent per frame)")
    return name, stride, zoom


def case_name(name: str, stride: int, zoom: float) -> str:
    return name + (f":{stride}" if stride != 1 else "") + (f":zoom{zoom:g}" if zoom else "")


def zoom_clip(bgr: np.ndarray, percent: float) -> np.ndarray:
    """Frame t replaced by its centred crop scaled up by (1 + percent/100)^t, resized back to the frame size."""
    if not percent:
        return bgr
    h, w = bgr.shape[1:3]
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    out = np.empty_like(bgr)
    for t, frame in enumerate(bgr):
        s = (1.0 + percent / 100.0) ** t
        matrix = np.array([[s, 0.0, (1.0 - s) * cx], [0.0, s, (1.0 - s) * cy]])
        out[t] = cv2.warpAffine(frame, matrix, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)
    return out


BUSY_LOOP = """
import os, sys, time
import numpy as np
parent, deadline = os.getppid(), time.time() + float(sys.argv[1])
a = np.random.rand(256, 256)
while time.time() < deadline and os.getppid() == parent:
    for _ in range(50):
        a = np.tanh(a @ a * 1e-3)
"""


class BusyMachine:
    """N single-threaded CPU-bound processes for the duration of a `with` block (each also stops by itself after
    `seconds`, or when the bench that started it is gone)."""

    def __init__(self, count: int, seconds: float):
        self.count, self.seconds, self.procs = count, seconds, []

    def __enter__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(self.seconds)], env=env)
                      for _ in range(self.count)]
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()


def stylise(bgr: np.ndarray) -> np.ndarray:
    """The issue's ground-truth stylisation; returns RGB float 0..1."""
    styled = cv2.stylization(bgr, sigma_s=60, sigma_r=0.45).astype(np.float32) / 255.0
    b, g, r = styled[..., 0], styled[..., 1], styled[..., 2]
    return np.clip(np.stack((1.2 * r ** 0.8, g ** 0.9, 0.85 * b ** 1.25), axis=-1), 0.0, 1.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10.0 * math.log10(1.0 / max(float(((a - b) ** 2).mean()), 1e-12))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM over RGB ([H,W,3] 0..1), Gaussian window 11, sigma 1.5 (Wang et al.)."""
    x, y = a.permute(2, 0, 1)[:, None].double(), b.permute(2, 0, 1)[:, None].double()
    t = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-t ** 2 / (2 * 1.5 ** 2))
    g = (g / g.sum())
    window = (g[:, None] * g[None, :])[None, None]
    blur = lambda z: F.conv2d(z, window)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def warp_error(video: torch.Tensor, flows: VideoFlow, indices) -> float:
    """Mean |out_t - warp(out_{t-1})| (0..255) over non-occluded pixels, for consecutive t in `indices`."""
    total, count = 0.0, 0.0
    for t in indices:
        if t == 0:
            continue
        flow, occlusion = flows.pair(t - 1, t)
        warped = flow_warp(video[t - 1].permute(2, 0, 1)[None], flow)[0].permute(1, 2, 0)
        valid = (occlusion[0, 0] < 0.5)[..., None]
        total += float(((video[t] - warped).abs() * valid).sum()) * 255.0
        count += float(valid.sum()) * 3
    return total / max(count, 1.0)


def plain_warp(truth: torch.Tensor, keys, flows: VideoFlow) -> torch.Tensor:
    out = truth.clone()
    for t in range(truth.shape[0]):
        if t in keys:
            continue
        key = min(keys, key=lambda k: (abs(k - t), k))
        flow, _ = flows.pair(key, t)
        out[t] = flow_warp(truth[key].permute(2, 0, 1)[None], flow)[0].permute(1, 2, 0)
    return out


def to_bgr8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255).round().byte().numpy()[..., ::-1].copy()


def ebsynth_pass(binary: str, frames: torch.Tensor, truth: torch.Tensor, keys, flows: VideoFlow, workdir: Path):
    """The reference's forward pass with the original EbSynth: every non-key frame from the previous key frame
    (frames before the first key from it); guides as 8-bit PNGs exactly as video_blend.py builds them."""
    out = truth.clone()
    h, w = frames.shape[1:3]
    rows, cols = np.mgrid[0:h, 0:w]
    coordinates = np.zeros((h, w, 3), np.uint8)  # BGR image with R = row, G = col, B = 0
    coordinates[..., 2] = (rows / (h - 1) * 255).astype(np.uint8)
    coordinates[..., 1] = (cols / (w - 1) * 255).astype(np.uint8)
    laplacian = np.array(propagate.EDGE_KERNEL, np.float32)
    edge = lambda bgr: cv2.filter2D(bgr, -1, laplacian)  # noqa: E731

    def advect8(image, src, dst):
        flow, occlusion = flows.pair(src, dst)
        warped = flow_warp(torch.from_numpy(image).permute(2, 0, 1)[None].float(), flow, mode="nearest")
        warped = warped[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
        return cv2.inpaint(warped, (occlusion[0, 0].numpy() > 0.5).astype(np.uint8), 30, cv2.INPAINT_TELEA)

    seconds, produced = 0.0, 0
    passes = [(k, list(range(k + 1, (keys[i + 1] if i + 1 < len(keys) else frames.shape[0]))))
              for i, k in enumerate(keys)] + [(keys[0], list(range(keys[0] - 1, -1, -1)))]
    for key, targets in passes:
        key_bgr, style_bgr = to_bgr8(frames[key]), to_bgr8(truth[key])
        for name, image in (("key.png", key_bgr), ("key_edge.png", edge(key_bgr)), ("style.png", style_bgr),
                            ("pos0.png", coordinates)):
            cv2.imwrite(str(workdir / name), image)
        previous, previous_out, positions = key, style_bgr, coordinates
        for t in targets:
            frame_bgr = to_bgr8(frames[t])
            temporal = advect8(previous_out, previous, t)
            positions = advect8(positions, previous, t)
            for name, image in (("tgt.png", frame_bgr), ("tgt_edge.png", edge(frame_bgr)),
                                ("tgt_temporal.png", temporal), ("tgt_pos.png", positions)):
                cv2.imwrite(str(workdir / name), image)
            command = [binary, "-style", str(workdir / "style.png"),
                       "-guide", str(workdir / "key.png"), str(workdir / "tgt.png"), "-weight", "6",
                       "-guide", str(workdir / "key_edge.png"), str(workdir / "tgt_edge.png"), "-weight", "0.5",
                       "-guide", str(workdir / "style.png"), str(workdir / "tgt_temporal.png"), "-weight", "0.5",
                       "-guide", str(workdir / "pos0.png"), str(workdir / "tgt_pos.png"), "-weight", "2",
                       "-output", str(workdir / "out.png"), "-searchvoteiters", "12", "-patchmatchiters", "6"]
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            seconds += time.perf_counter() - start
            produced += 1
            previous_out = cv2.imread(str(workdir / "out.png"))
            previous = t
            out[t] = torch.from_numpy(previous_out[..., ::-1].astype(np.float32) / 255.0)
    return out, seconds / max(produced, 1)


def report(name, video, truth, keys, flows, seconds_per_frame, per_frame=True):
    targets = [t for t in range(truth.shape[0]) if t not in keys]
    scores = {t: (psnr(video[t], truth[t]), ssim(video[t], truth[t])) for t in targets}
    if per_frame:
        print(f"  {name} per frame (PSNR dB / SSIM): " + "  ".join(
            f"{t}:{scores[t][0]:.2f}/{scores[t][1]:.3f}" for t in targets))
    by_distance = {}
    for t in targets:
        by_distance.setdefault(min(abs(k - t) for k in keys), []).append(scores[t][0])
    distances = "  ".join(f"d{d}:{np.mean(v):.2f}" for d, v in sorted(by_distance.items()))
    mean_psnr = np.mean([s[0] for s in scores.values()])
    mean_ssim = np.mean([s[1] for s in scores.values()])
    temporal = warp_error(video, flows, range(truth.shape[0]))
    print(f"  {name:8s} PSNR {mean_psnr:6.2f} dB  SSIM {mean_ssim:.4f}  warp error {temporal:.2f}"
          f"  {seconds_per_frame:7.2f} s/frame   PSNR by distance to key: {distances}")
    return mean_psnr, seconds_per_frame


def run_clip(case: tuple, args) -> None:
    name, stride, zoom = case
    bgr = zoom_clip(read_clip(VIDEOS / CLIPS[name], args.frames, stride), zoom)
    name = case_name(name, stride, zoom)
    frames = torch.from_numpy(bgr[..., ::-1].astype(np.float32) / 255.0)
    truth = torch.from_numpy(np.stack([stylise(f) for f in bgr]))
    keys = list(range(0, frames.shape[0], args.interval))
    print(f"{name}: {frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]}, key frames {keys}")
    start = time.perf_counter()
    flows = VideoFlow.estimate(frames, DISEstimator(args.dis_preset))
    print(f"  flow (DIS {args.dis_preset}): {time.perf_counter() - start:.1f} s; warp error of the ground truth "
          f"itself: {warp_error(truth, flows, range(truth.shape[0])):.2f}")
    targets = frames.shape[0] - len(keys)

    start = time.perf_counter()
    warped = plain_warp(truth, keys, flows)
    results = {"warp": report("warp", warped, truth, keys, flows, (time.perf_counter() - start) / targets,
                              not args.summary)}
    for label, settings in args.variants:
        start = time.perf_counter()
        ours = propagate.propagate_video(frames, keys, truth[keys], flows, settings)
        results[label] = report(label, ours, truth, keys, flows, (time.perf_counter() - start) / targets,
                                not args.summary)
        if args.save:
            out_dir = REPO / "bench" / "out" / f"{name}_{label}"
            out_dir.mkdir(parents=True, exist_ok=True)
            for t in range(ours.shape[0]):
                cv2.imwrite(str(out_dir / f"{t:04d}.png"), to_bgr8(ours[t]))
    if args.busy_beside and "ours" in results:
        with BusyMachine(args.busy_beside, args.busy_seconds):
            start = time.perf_counter()
            propagate.propagate_video(frames, keys, truth[keys], flows, dict(args.variants)["ours"])
            busy_seconds = (time.perf_counter() - start) / targets
        print(f"  ours with {args.busy_beside} busy processes beside: {busy_seconds:.2f} s/frame, "
              f"{busy_seconds / results['ours'][1]:.2f}x its quiet time in this run")
    if args.ebsynth:
        with tempfile.TemporaryDirectory() as workdir:
            video, seconds = ebsynth_pass(args.ebsynth, frames, truth, keys, flows, Path(workdir))
        results["ebsynth"] = report("ebsynth", video, truth, keys, flows, seconds, not args.summary)
    anchor = results.get("ebsynth", results["warp"])
    anchor_name = "ebsynth" if "ebsynth" in results else "warp"
    for label in (label for label, _ in args.variants):
        psnr_ours, seconds_ours = results[label]
        line = f"  {label}: PSNR {psnr_ours - results['warp'][0]:+.2f} dB vs warp"
        if anchor_name == "ebsynth":
            line += (f", {psnr_ours - anchor[0]:+.2f} dB vs ebsynth, time per output frame "
                     f"{seconds_ours / anchor[1]:.2f}x one EbSynth pass")
        print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", nargs="+", type=parse_case, default=[(c, 1, 0.0) for c in CLIPS],
                        help="cases: clip names, NAME:S for every S-th frame (fast motion), NAME:zoomZ (growing by "
                             "Z%% per frame), NAME:S:zoomZ")
    parser.add_argument("--frames", type=int, default=0, help="first N frames of each clip (0 = all)")
    parser.add_argument("--interval", type=int, default=10, help="key frame spacing K")
    parser.add_argument("--dis-preset", default="medium", choices=["ultrafast", "fast", "medium"])
    parser.add_argument("--threads", type=int, default=0,
                        help="torch/OpenCV threads (0 = leave the propagator's own choice)")
    parser.add_argument("--busy", type=int, default=0, help="keep N CPU-bound processes running beside the bench")
    parser.add_argument("--busy-beside", type=int, default=0,
                        help="after each case's quiet measurement, run ours again with N busy processes beside and "
                             "print its time against the quiet one of the same run")
    parser.add_argument("--busy-seconds", type=float, default=7200, help="upper bound on the busy processes' life")
    parser.add_argument("--ebsynth", default=shutil.which("ebsynth"),
                        help="path of an EbSynth binary to compare with (default: `ebsynth` on PATH)")
    parser.add_argument("--no-ebsynth", action="store_true")
    parser.add_argument("--no-ours", action="store_true", help="only the anchors (warp, EbSynth)")
    parser.add_argument("--telea", action="store_true", help="also run ours with the reference's TELEA hole fill")
    parser.add_argument("--poisson", action="store_true", help="also run ours with the Poisson fusion on")
    parser.add_argument("--scale-search", action="store_true",
                        help="also run ours with the key searched at the scale read off the flow (scale_search)")
    parser.add_argument("--cold-start", action="store_true",
                        help="also run ours with every frame searched coarse to fine from a random field "
                             "(warm_start off, the search before issue 25)")
    parser.add_argument("--summary", action="store_true", help="leave out the per-frame PSNR/SSIM lines")
    parser.add_argument("--save", action="store_true", help="write our frames to bench/out/")
    args = parser.parse_args()
    if args.no_ebsynth:
        args.ebsynth = None
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    args.variants = [] if args.no_ours else [("ours", propagate.PropagationSettings())]
    if args.telea:
        args.variants.append(("ours-telea", propagate.PropagationSettings(hole_fill="telea")))
    if args.poisson:
        args.variants.append(("ours-ps", propagate.PropagationSettings(poisson=True)))
    if args.cold_start:
        args.variants.append(("ours-cold", propagate.PropagationSettings(warm_start=False)))
    if args.scale_search:
        args.variants.append(("ours-scale", propagate.PropagationSettings(scale_search=True)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"{args.busy} busy processes beside, EbSynth: {args.ebsynth or 'not found'}")
    with BusyMachine(args.busy, args.busy_seconds):
        for case in args.clips:
            run_clip(case, args)


if __name__ == "__main__":
    main()
