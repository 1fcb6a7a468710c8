"""`propagate` (rerender_cli.propagate_video, streamed) on long clips and beside bench/propagator_bench.py.

memory: peak resident memory (ru_maxrss) of one process propagating 1, 5 and 10 minutes (default) of the demo clip
  looped at 25 fps, each length in its own process, beside what the whole clip would take as float32 frames (the
  size an IMAGE batch of it has) at the bench's size and at 1080p. PatchMatch costs ~0.5 s per frame even at 64x80
  on the 2 shared cores this was written on, so not every frame can be propagated in a bench: every frame is a key
  frame (its inverted input) except, every `--every` seconds (30), one interval of `--interval` frames propagated with both passes
  and the blend, and the last `--tail` frames, propagated by the streamed single pass after the last key. The
  reading, writing, key frame handling and segment machinery run over every frame of the clip, so a leak or a
  buffer that grows with the clip shows in the peak; the interval's own memory is what a propagated interval of
  that length holds (at 1080p: about 40 bytes a pixel a frame of the interval, see the printed bound). The clip is
  H.264 (the demo clip at the bench's size, its packets repeated), the key frames BMP files (one per frame of the
  loop, shared by its repeats), the output H.264 .mp4 as the README's commands write it.
speed: seconds per in-between frame of `propagate` on the first 11 frames of the man clip at its full size (keys 0
  and 10 from propagator_bench's ground-truth stylisation, reference settings), the flow, decoding and encoding
  included, beside propagator_bench.py's own s/frame for the same frames (flow precomputed there), in one run.

    python bench/propagate_cli_bench.py memory [--minutes 1 5 10] [--size 64x80] [--interval 8] [--tail 10] [--every 30]
    python bench/propagate_cli_bench.py speed
"""
import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from rerender import propagate  # noqa: E402
from rerender_cli import propagate_video  # noqa: E402
from rerender_cli.video_files import VideoReader, VideoWriter  # noqa: E402

FPS = 25
FULL_HD = (1920, 1080)
BYTES_PER_INTERVAL_PIXEL = 40   # frames + output (float32 RGB) + forward pass image and error, per interval frame


def whole_clip_mib(frames: int, width: int, height: int) -> float:
    return frames * width * height * 3 * 4 / 2**20


def repeat_video(loop: Path, output: Path, repeats: int) -> None:
    """`loop` (H.264) `repeats` times by copying its packets, not encoding them again: a 10-minute 1080p clip in
    seconds and a few GB of disk (lossless it would take ~40 GB)."""
    import av
    with av.open(str(loop)) as source:
        stream = source.streams.video[0]
        packets = [(packet.pts, packet.dts, bytes(packet), packet.is_keyframe) for packet in source.demux(stream)
                   if packet.size]
        with av.open(str(output), "w") as target:
            copy = target.add_stream_from_template(stream)
            duration = len(packets) * int(round(1 / (FPS * stream.time_base)))
            for index in range(repeats * len(packets)):
                pts, dts, data, keyframe = packets[index % len(packets)]
                offset = index // len(packets) * duration
                packet = av.Packet(data)
                packet.pts, packet.dts, packet.is_keyframe = pts + offset, dts + offset, keyframe
                packet.time_base, packet.stream = stream.time_base, copy
                target.mux(packet)


def child_memory(minutes: float, width: int, height: int, interval: int, tail: int, every: float) -> dict:
    """One length, in this process: build the looped clip and the key frames, propagate, report."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reader = VideoReader(propagate_video.DEMO_VIDEO)
    loop = [cv2.resize(reader.read(), (width, height), interpolation=cv2.INTER_AREA) for _ in range(reader.count)]
    count = -(-int(minutes * 60 * FPS) // len(loop)) * len(loop)   # whole loops: packets are in decoding order
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        with VideoWriter(folder / "loop.mp4", FPS, width, height) as writer:
            for frame in loop:
                writer.write(frame)
            writer.commit()
        repeat_video(folder / "loop.mp4", folder / "clip.mp4", count // len(loop))
        block = int(every * FPS)
        propagated = {index for start in range(0, count - tail, block) for index in range(start + 1, start + interval)}
        propagated |= set(range(count - tail, count))
        paintings = []          # one file per frame of the loop, shared by its repeats: 1080p keys fit on disk
        for position, frame in enumerate(loop):
            paintings.append(folder / f"{position:06d}.bmp")     # read fast: the clip has thousands of keys
            cv2.imwrite(str(paintings[-1]), 255 - frame)    # RGB inverted is still an inversion
        keys = [(index, paintings[index % len(loop)]) for index in range(count) if index not in propagated]
        settings = propagate.PropagationSettings(search_vote_iters=2, patchmatch_iters=1)
        start = time.perf_counter()
        propagate_video.propagate_file(folder / "clip.mp4", keys, folder / "out.mp4", settings, show_progress=False)
        seconds = time.perf_counter() - start
        written = VideoReader(folder / "out.mp4").count
    return {"minutes": minutes, "frames": count, "written": written, "key_frames": len(keys),
            "propagated_frames": len(propagated), "seconds": round(seconds, 1),
            "rss_before_mib": round(before),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "whole_clip_float32_mib": round(whole_clip_mib(count, width, height)),
            "whole_clip_float32_1080p_gib": round(whole_clip_mib(count, *FULL_HD) / 1024, 1)}


def memory(args) -> None:
    width, height = map(int, args.size.split("x"))
    interval_1080p = BYTES_PER_INTERVAL_PIXEL * FULL_HD[0] * FULL_HD[1] * (args.interval + 1) / 2**20
    print(f"looped demo clip at {width}x{height}, {FPS} fps; one {args.interval}-frame interval propagated every "
          f"{args.every:g} s and the last {args.tail} frames after the last key; each length in its own process")
    print(f"bound of one propagated interval of {args.interval} frames at 1080p: ~{interval_1080p:.0f} MiB "
          f"(+ the flow cache, at most {propagate_video.flowlib.DEFAULT_CACHE_PAIRS} pairs of 10 B/pixel)")
    for minutes in args.minutes:
        done = subprocess.run([sys.executable, __file__, "child", str(minutes), args.size, str(args.interval),
                               str(args.tail), str(args.every)], capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{row['minutes']:>4g} min  {row['frames']:6d} frames ({row['written']} written, "
              f"{row['propagated_frames']} propagated, {row['key_frames']} key frames) in {row['seconds']:7.1f} s: "
              f"peak RSS {row['peak_rss_mib']} MiB (after imports {row['rss_before_mib']} MiB); whole clip as "
              f"float32: {row['whole_clip_float32_mib']} MiB here, {row['whole_clip_float32_1080p_gib']} GiB at 1080p")


def speed(args) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from propagator_bench import CLIPS, VIDEOS, read_clip, stylise
    bgr = read_clip(VIDEOS / CLIPS["man"], args.frames)
    keys = [0, args.frames - 1]
    anchor = subprocess.run([sys.executable, str(REPO / "bench" / "propagator_bench.py"), "--clips", "man",
                             "--frames", str(args.frames), "--interval", str(args.frames - 1), "--no-ebsynth",
                             "--summary"], capture_output=True, text=True, check=True).stdout
    anchor_line = next(line for line in anchor.splitlines() if line.strip().startswith("ours"))
    anchor_seconds = float(re.search(r"([\d.]+) s/frame", anchor_line).group(1))
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        with VideoWriter(folder / "clip.mkv", FPS, bgr.shape[2], bgr.shape[1]) as writer:
            for frame in bgr:
                writer.write(np.ascontiguousarray(frame[..., ::-1]))
            writer.commit()
        key_files = []
        for index in keys:
            path = folder / f"key_{index}.png"
            cv2.imwrite(str(path), cv2.cvtColor((stylise(bgr[index]) * 255).round().astype(np.uint8),
                                                cv2.COLOR_RGB2BGR))
            key_files.append((index, path))
        start = time.perf_counter()
        propagate_video.propagate_file(folder / "clip.mkv", key_files, folder / "out.mp4", show_progress=False)
        seconds = (time.perf_counter() - start) / (args.frames - len(keys))
    print(f"man, {args.frames} frames {bgr.shape[2]}x{bgr.shape[1]}, keys {keys}, reference settings:")
    print(f"  propagator_bench.py ours: {anchor_seconds:.2f} s/frame (flow precomputed)   [{anchor_line.strip()}]")
    print(f"  propagate (CLI, streamed; flow, decode and encode included): {seconds:.2f} s/frame "
          f"= {seconds / anchor_seconds:.2f}x")


def main() -> None:
    if sys.argv[1:2] == ["child"]:
        minutes, size, interval, tail, every = sys.argv[2:7]
        width, height = map(int, size.split("x"))
        print(json.dumps(child_memory(float(minutes), width, height, int(interval), int(tail), float(every))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["memory", "speed"])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 5, 10])
    parser.add_argument("--size", default="64x80", help="WxH of the looped clip (memory)")
    parser.add_argument("--interval", type=int, default=8, help="length of each propagated interval (memory)")
    parser.add_argument("--tail", type=int, default=10, help="frames after the last key (memory)")
    parser.add_argument("--every", type=float, default=30, help="seconds of clip between propagated intervals "
                        "(memory)")
    parser.add_argument("--frames", type=int, default=11, help="frames of the man clip (speed)")
    args = parser.parse_args()
    memory(args) if args.mode == "memory" else speed(args)


if __name__ == "__main__":
    main()
