"""Peak resident memory of each Rerender stage on long clips, beside the IMAGE batches the host's contract holds.

Each stage runs in its own process, through the real nodes of an in-process ComfyUI, on clips made by looping a
shared video (square centre crop at --size), shortest first; every peak is clean: the process's peak RSS (VmHWM) is
reset just before each clip is built, and the baseline is its RSS then (after the host, the models, the imports and
the previous, freed, length).
glibc is told to map every allocation over 64 KiB on its own (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the
RSS at once instead of lingering in the heap. Printed per stage and length: the peak above the baseline, the IMAGE
(and MASK / LATENT) batches in and out of the node, and the difference: the stage's own intermediates; then, per
stage, how that difference grows per frame from the shortest to the longest clip (MiB/frame; near 0 = bounded).

Stages (DIS flow, --dis-preset, for every stage that needs flow; all flow on demand unless said):
  flow             Flow Estimation (on demand), then every consecutive pair asked for in both directions plus
                   (anchor, key) for every key frame: what the sampler and the propagator will ask
  flow-precompute  Flow Estimation with estimate=precompute (every consecutive pair kept, full-clip previews),
                   for contrast: the growth per frame the on-demand mode avoids
  picker           Key Frame Picker, adaptive mode (streams the motion proxies over the clip)
  sampler          Key Frame Sampler, every constraint at its default, with cross-frame attention, on the tiny
                   random-weight SD1.5-architecture model and VAE of tests/tiny_models.py, --steps steps (4: the
                   fewest with a pixel-aware fusion step at denoise 0.75), flow on demand from a Flow Estimation
                   node. At 512x512 one key frame costs ~20-30 CPU-seconds and a transient ~4 GiB (attention over
                   4096 latent tokens, anchor + previous frame), so key frames are only every --sampler-interval
                   frames (100: 2, 2 and 4 key frames): what grows with the clip rather than with the number of key
                   frames is what this row shows; the key frames' own images and latents are counted as outputs
  fresco           FRESCO Key Frames, every component at its default (a mask of all background, so smoothing acts),
                   on the same tiny model, key frames every --sampler-interval frames as the sampler, --steps steps,
                   5 Adam iterations instead of 20 (the optimisation's memory does not depend on the count)
  propagator       Patch Propagator over the whole clip (IMAGE in and out: every frame). To fit a quiet 2-core
                   machine, PatchMatch runs with cheap settings (patch 3, descriptor 4, one search-vote round, no
                   PatchMatch iterations, one pyramid level: the same images, guides, flows and blending state as the
                   defaults, far fewer operations on them), and only every --propagate-every-th interval of
                   --interval frames is propagated (default 5: 2, 4 and 6 intervals of 9 frames; the others are made
                   all key frames, so the number of propagated intervals still grows with the clip and their key
                   frames are still IMAGE input); 1 = all

Needs $COMFYUI_PATH and ~6 GiB free memory (the sampler's transient). Full run for the closing note (estimated
8-10 minutes on 2 quiet cores from single-stage timings on a busy machine; most of it the sampler and the
propagator):
    COMFYUI_PATH=/path/to/ComfyUI python bench/long_clip_memory_bench.py
Smoke test:
    COMFYUI_PATH=/path/to/ComfyUI python bench/long_clip_memory_bench.py --size 64 --frames 10,20
"""
import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

STAGES = ["flow", "flow-precompute", "picker", "sampler", "fresco", "propagator"]
CLIP = "man_talking_512x640_25fps.mp4"
SOURCE_FRAMES = 50  # decoded once, then looped forwards and backwards to the clip's length
MiB = 2 ** 20
CHEAP_PROPAGATION = dict(patch_size=3, descriptor_size=4, search_vote_iters=1, patchmatch_iters=0, pyramid_levels=1)


# ---- measurement (child process) -------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


def reset_peak() -> int:
    """Reset the peak RSS (Linux clear_refs 5) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def tensor_bytes(*values) -> int:
    """Bytes of the tensors in node outputs (IMAGE, MASK, LATENT dicts); other payloads count 0."""
    total = 0
    for value in values:
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            total += tensor_bytes(*value.values())
        elif isinstance(value, (list, tuple)):
            total += tensor_bytes(*value)
    return total


def source_frames(size: int) -> torch.Tensor:
    """SOURCE_FRAMES frames of the shared clip, square centre crop, size x size, [F,H,W,3] float32."""
    from host_compat import SHARED_DATA
    cap, frames = cv2.VideoCapture(str(SHARED_DATA / "videos" / CLIP)), []
    while len(frames) < SOURCE_FRAMES:
        ok, frame = cap.read()
        if not ok:
            break
        h, w = frame.shape[:2]
        side = min(h, w)
        crop = frame[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2]
        frames.append(cv2.cvtColor(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB))
    cap.release()
    if not frames:
        raise SystemExit(f"cannot read {SHARED_DATA / 'videos' / CLIP}")
    return torch.from_numpy(np.stack(frames)).float() / 255.0


def looped_clip(source: torch.Tensor, count: int) -> torch.Tensor:
    """[count,H,W,3]: the source played forwards, backwards, forwards... (no jump at the seams)."""
    cycle = list(range(len(source))) + list(range(len(source) - 2, 0, -1))
    clip = torch.empty(count, *source.shape[1:])
    for index in range(count):
        clip[index] = source[cycle[index % len(cycle)]]
    return clip


def node_defaults(host, node_id: str, **overrides) -> dict:
    schema = host.nodes.NODE_CLASS_MAPPINGS[node_id].define_schema()
    values = {s.id: s.default for s in schema.inputs if getattr(s, "default", None) is not None}
    values.update(overrides)
    return values


def run_stage(stage: str, counts: list, args) -> None:
    """One process per stage: the host and models once, a short warm-up run (first-use costs: thread pools, lazy
    initialisation), then each clip length in turn (shortest first), each measured from a fresh peak; prints one
    JSON line per length."""
    from conftest import HostSession
    host = HostSession(Path(os.environ["COMFYUI_PATH"]), Path(tempfile.mkdtemp()))
    source = source_frames(args.size)
    models = None
    if stage == "fresco":
        from tiny_models import conditioning, tiny_sd15, tiny_sd_vae
        models = (tiny_sd15(0), conditioning(0), conditioning(1), tiny_sd_vae(0))
    if stage == "sampler":
        from tiny_models import conditioning, tiny_sd15, tiny_sd_vae
        model, vae = tiny_sd15(0), tiny_sd_vae(0)
        (patched,) = host.run_node("Rerender_CrossFrameAttention",
                                   **node_defaults(host, "Rerender_CrossFrameAttention", model=model))
        models = (patched, conditioning(0), conditioning(1), vae)
    interval = args.sampler_interval if stage in ("sampler", "fresco") else args.interval
    measure(host, stage, source, min(counts[0], 2 * interval + 2), models, args)  # warm-up, not reported
    for count in counts:
        gc.collect()
        print(json.dumps(measure(host, stage, source, count, models, args)), flush=True)


def measure(host, stage: str, source: torch.Tensor, count: int, models, args) -> dict:
    flow_args = dict(dis_preset=args.dis_preset)
    baseline = reset_peak()
    frames = looped_clip(source, count)
    inputs, outputs, extra = [frames], [], {}
    if stage in ("flow", "flow-precompute"):
        mode = "precompute" if stage == "flow-precompute" else "on demand"
        result = host.run_node("Rerender_FlowEstimation", frames=frames,
                               **node_defaults(host, "Rerender_FlowEstimation", estimate=mode, **flow_args))
        video_flow, outputs = result[0], list(result[1:])
        for index in range(1, count):
            video_flow.pair(index - 1, index), video_flow.pair(index, index - 1)
        for key in range(args.interval, count, args.interval):
            video_flow.pair(0, key)
        extra = dict(pairs_held=len(video_flow.computed_pairs) // 2, estimates=video_flow.estimates)
    elif stage == "picker":
        result = host.run_node("Rerender_KeyframePicker", frames=frames,
                               **node_defaults(host, "Rerender_KeyframePicker", mode="adaptive"))
        outputs = [result[0]]
        extra = dict(key_frames=len(result[1].indices))
    elif stage == "sampler":
        patched, positive, negative, vae = models
        (video_flow, *previews) = host.run_node("Rerender_FlowEstimation", frames=frames,
                                                **node_defaults(host, "Rerender_FlowEstimation", **flow_args))
        key_frames, keyframes, _ = host.run_node("Rerender_KeyframePicker", frames=frames, **node_defaults(
            host, "Rerender_KeyframePicker", interval=args.sampler_interval))
        images, latent = host.run_node("Rerender_KeyframeSampler", **node_defaults(
            host, "Rerender_KeyframeSampler", model=patched, positive=positive, negative=negative, vae=vae,
            frames=frames, keyframes=keyframes, flow=video_flow, steps=args.steps))
        outputs = [*previews, key_frames, images, latent]
        extra = dict(key_frames=len(keyframes.indices), pairs_held=len(video_flow.computed_pairs) // 2)
    elif stage == "fresco":
        model, positive, negative, vae = models
        (video_flow, *previews) = host.run_node("Rerender_FlowEstimation", frames=frames,
                                                **node_defaults(host, "Rerender_FlowEstimation", **flow_args))
        key_frames, keyframes, _ = host.run_node("Rerender_KeyframePicker", frames=frames, **node_defaults(
            host, "Rerender_KeyframePicker", interval=args.sampler_interval))
        mask = torch.zeros(1, *frames.shape[1:3])
        inputs.append(mask)
        images, latent = host.run_node("Rerender_FrescoKeyFrames", **node_defaults(
            host, "Rerender_FrescoKeyFrames", model=model, positive=positive, negative=negative, vae=vae,
            frames=frames, keyframes=keyframes, flow=video_flow, mask=mask, steps=args.steps, iterations=5))
        outputs = [*previews, key_frames, images, latent]
        extra = dict(key_frames=len(keyframes.indices), pairs_held=len(video_flow.computed_pairs) // 2)
    elif stage == "propagator":
        keys = propagation_keys(count, args.interval, args.propagate_every)
        (video_flow, *previews) = host.run_node("Rerender_FlowEstimation", frames=frames,
                                                **node_defaults(host, "Rerender_FlowEstimation", **flow_args))
        key_frames, keyframes, _ = host.run_node("Rerender_KeyframePicker", frames=frames, **node_defaults(
            host, "Rerender_KeyframePicker", mode="list", index_list=",".join(map(str, keys))))
        key_images = 1.0 - frames[keys]  # any rendering of the key frames
        inputs.append(key_images)
        (video,) = host.run_node("Rerender_PatchPropagator", **node_defaults(
            host, "Rerender_PatchPropagator", frames=frames, keyframes=keyframes, key_frame_images=key_images,
            flow=video_flow, **CHEAP_PROPAGATION))
        outputs = [*previews, key_frames, video]
        propagated = count - len(keys)
        extra = dict(propagated_frames=propagated, pairs_held=len(video_flow.computed_pairs) // 2)
    else:
        raise SystemExit(f"unknown stage {stage!r}; one of {STAGES}")
    return dict(stage=stage, frames=count, peak=peak_rss() - baseline, images=tensor_bytes(inputs, outputs), **extra)


def propagation_keys(count: int, interval: int, every: int) -> list:
    """Key frames every `interval` frames, with every frame of the intervals not propagated (all but every
    `every`-th) made a key frame too; the last frame is always a key."""
    keys = set(range(0, count, interval)) | {count - 1}
    for number, start in enumerate(range(0, count, interval)):
        if number % every:
            keys.update(range(start, min(start + interval, count)))
    return sorted(keys)


# ---- the table (parent process) --------------------------------------------------------------------------------
def child(stage: str, args):
    """Yield the stage's rows as its process prints them."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    command = [sys.executable, __file__, "--child", stage, "--frames", args.frames, "--size", str(args.size),
               "--interval", str(args.interval), "--sampler-interval", str(args.sampler_interval),
               "--steps", str(args.steps), "--dis-preset", args.dis_preset,
               "--propagate-every", str(args.propagate_every)]
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
        rows = 0
        for line in process.stdout:
            if line.startswith("{"):
                rows += 1
                yield json.loads(line)
        if process.wait() != 0 or not rows:
            errors.seek(0)
            sys.stderr.write(errors.read()[-4000:])
            raise SystemExit(f"{stage} failed (exit {process.returncode})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="50,100,300", help="clip lengths, comma-separated")
    parser.add_argument("--size", type=int, default=512, help="frame side in pixels (a multiple of 8)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {STAGES}")
    parser.add_argument("--interval", type=int, default=10, help="key frame interval (flow, propagator)")
    parser.add_argument("--sampler-interval", type=int, default=100, help="key frame interval of the sampler")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps")
    parser.add_argument("--dis-preset", default="ultrafast", help="DIS preset of every flow")
    parser.add_argument("--propagate-every", type=int, default=5,
                        help="propagate every n-th interval (1 = all); the rest are all key frames")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout")
    counts = sorted(int(c) for c in args.frames.split(","))
    if args.child:
        run_stage(args.child, counts, args)
        return

    print(f"peak RSS above the baseline per stage, {args.size}x{args.size} frames "
          f"({args.size * args.size * 3 * 4 / MiB:.2f} MiB per IMAGE frame), each run in its own process")
    print(f"{'stage':<16} {'frames':>6} {'peak MiB':>9} {'images MiB':>11} {'beyond MiB':>11}  details")
    for stage in args.stages.split(","):
        rows = []
        for row in child(stage, args):
            rows.append(row)
            count = row["frames"]
            details = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("stage", "frames", "peak", "images"))
            print(f"{stage:<16} {count:>6} {row['peak'] / MiB:>9.1f} {row['images'] / MiB:>11.1f} "
                  f"{(row['peak'] - row['images']) / MiB:>11.1f}  {details}", flush=True)
        if len(rows) > 1:
            first, last = rows[0], rows[-1]
            growth = ((last["peak"] - last["images"]) - (first["peak"] - first["images"])) / (
                last["frames"] - first["frames"]) / MiB
            print(f"{stage:<16} growth beyond the images, {first['frames']} -> {last['frames']} frames: "
                  f"{growth:+.3f} MiB/frame", flush=True)


if __name__ == "__main__":
    main()
