"""`propagate`: painted key frames -> the whole video, with no model and no host (an EbSynth replacement).

Runs the Patch Propagator's algorithm (rerender.propagate) on a video file, streamed: the video is read and written
segment by segment (frames up to the first key, then each interval between two keys, then the frames after the last
key), so memory holds one segment, never the clip; key frame images are read when their segment comes. The frames
after the last key are a single pass walking away from it and are streamed frame by frame. Each segment is
propagated exactly as the node propagates the whole clip (same passes, same flow pairs, same per-frame seeds), so
the output equals the node's.
"""
import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from rerender import flow as flowlib
from rerender import propagate

from .errors import UserError
from .video_files import VideoReader, VideoWriter

DEMO = Path(__file__).resolve().parent / "demo"
DEMO_VIDEO = DEMO / "clip.mp4"
DEMO_KEYS = {0: DEMO / "key_first.png", 24: DEMO / "key_last.png"}


def parse_key(text: str) -> tuple:
    """INDEX=FILE -> (index, path)."""
    index, equals, path = text.partition("=")
    try:
        return int(index), Path(path)
    except ValueError:
        raise UserError(f"--key '{text}' must look like INDEX=FILE, e.g. 0=first.png", 3) from None


def check_key_frames(keys: Sequence[tuple], count: int, width: int, height: int) -> dict:
    """{index: path} in index order from (index, path) pairs, each image read once and checked against the clip
    before any work; they are read again when their segment comes (a long clip may have thousands)."""
    checked = {}
    for index, path in keys:
        if not 0 <= index < count:
            raise UserError(f"key frame {index} ({path}) is outside the video's {count} frames (0..{count - 1})", 3)
        if index in checked:
            raise UserError(f"key frame {index} is given twice", 3)
        image = read_key_frame(path)
        if image.shape[:2] != (height, width):
            raise UserError(f"key frame '{path}' is {image.shape[1]}x{image.shape[0]} but the video's frames are "
                            f"{width}x{height}; paint the key frames at the video's size", 3)
        checked[index] = Path(path)
    if not checked:
        raise UserError("no key frame given; pass at least one --key INDEX=FILE", 3)
    return dict(sorted(checked.items()))


def read_key_frame(path: Path) -> np.ndarray:
    """A key frame image as RGB uint8."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR) if Path(path).is_file() else None
    if image is None:
        raise UserError(f"key frame '{path}' is not an image file that OpenCV can read", 3)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def as_float(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).to(torch.float32) / 255.0


def as_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()


def flow_estimator(raft: Path = None, dis_preset: str = "medium", raft_iterations: int = flowlib.RAFT_ITERATIONS):
    """OpenCV DIS, or RAFT from a checkpoint file (princeton-vl or torchvision layout)."""
    if raft is None:
        return flowlib.DISEstimator(dis_preset)
    raft = Path(raft)
    if not raft.is_file():
        raise UserError(f"RAFT weights '{raft.name}' not found in {raft.resolve().parent} (get raft-sintel.pth "
                        f"with python -m rerender_cli.fetch_weights --dest DIR, or leave out --raft to use DIS)", 3)
    from rerender.raft_checkpoint import load_raft
    try:
        return flowlib.RAFTEstimator(load_raft(str(raft)), iterations=raft_iterations)
    except ValueError as error:
        raise UserError(str(error), 3) from None


class Progress:
    """One terminal line: a bar over every single-pass synthesis of the clip ("pass frames": two per frame between
    two keys, one outside them), seconds per synthesis and the ETA."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream, self.start = max(total, 1), 0, stream, time.monotonic()

    def tick(self, *_ignored) -> None:
        if self.done:
            elapsed = time.monotonic() - self.start
            each = elapsed / self.done
            eta = int(each * (self.total - self.done))
            filled = int(30 * self.done / self.total)
            self.stream.write(f"\r\x1b[2Kpropagating [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}"
                              f" pass frames  {each:.2f} s each  ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
            self.stream.flush()
        self.done += 1

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


class _StreamedFrames:
    """frames[i] for a pass walking forward from a key: the key's frame and the two latest, read on demand."""

    def __init__(self, reader: VideoReader, key_index: int, key_frame: torch.Tensor):
        self.reader, self.held = reader, {key_index: key_frame}
        self.key_index = key_index

    def __getitem__(self, index: int) -> torch.Tensor:
        while index not in self.held:
            position = self.reader.position
            self.held[position] = as_float(self.reader.read())
            stale = position - 2                             # the pass only looks back one frame
            if stale != self.key_index:
                self.held.pop(stale, None)
        return self.held[index]


class _StreamedFlow:
    """`pair(src, dst)` of consecutive frames, computed as a VideoFlow of those two frames computes it."""

    def __init__(self, frames: _StreamedFrames, estimator: Callable):
        self.frames, self.estimator = frames, estimator

    def pair(self, src: int, dst: int, device=None) -> tuple:
        low, high = min(src, dst), max(src, dst)
        pair_flow = flowlib.VideoFlow(torch.stack([self.frames[low], self.frames[high]]), self.estimator,
                                      max_cached_pairs=1)
        return pair_flow.pair(src - low, dst - low, device=device)


def propagate_file(video: Path, keys: Sequence[tuple], output: Path,
                   settings: propagate.PropagationSettings = propagate.PropagationSettings(),
                   estimator: Callable = None, show_progress: bool = True) -> Path:
    """Propagate the painted `keys` ((index, image path) pairs) over `video` into `output`; every input is checked
    before the first frame is written, and nothing is left at `output` unless the whole video was written."""
    reader = VideoReader(video)
    try:
        key_paths = check_key_frames(keys, reader.count, reader.width, reader.height)
        estimator = estimator if estimator is not None else flowlib.DISEstimator()
        progress = Progress(propagate.pass_frame_count(reader.count, list(key_paths))) if show_progress else None
        on_frame = progress.tick if progress is not None else None
        with VideoWriter(output, reader.fps, reader.width, reader.height) as writer:
            propagate_stream(reader, key_paths, writer, settings, estimator, on_frame)
            if progress is not None:
                progress.close()
            return writer.commit()
    finally:
        reader.close()


def propagate_stream(reader: VideoReader, key_paths: dict, writer: VideoWriter, settings, estimator,
                     on_frame=None) -> None:
    """Read, propagate and write segment by segment (see the module's docstring); `key_paths` from
    check_key_frames."""
    keys = list(key_paths)
    held = []           # frames of the segment being read, from its first frame on
    start = 0           # index of held[0]
    for key in keys:
        while reader.position <= key:
            held.append(as_float(reader.read()))
        segment_keys = [k - start for k in keys if start <= k <= key]
        if segment_keys[0] == 0 and key - start <= 1:     # nothing between two keys: the key as painted
            writer.write(read_key_frame(key_paths[key]))
        else:
            frames = torch.stack(held)
            styles = torch.stack([as_float(read_key_frame(key_paths[start + k])) for k in segment_keys])
            video = propagate.propagate_video(
                frames, segment_keys, styles, flowlib.VideoFlow(frames, estimator),
                dataclasses.replace(settings, seed=settings.seed + start), on_frame=on_frame)
            first_new = 1 if start in key_paths else 0   # the segment's first key was written with the last one
            for image in video[first_new:]:
                writer.write(as_uint8(image))
        held, start = [held[-1]], key
    last = keys[-1]
    if last + 1 < reader.count:
        frames = _StreamedFrames(reader, last, held[-1])
        style = as_float(read_key_frame(key_paths[last]))
        with propagate.pass_threads(reader.height, reader.width):  # as the node's passes run at this size
            for _, result in propagate.run_pass(frames, last, style, range(last + 1, reader.count),
                                                _StreamedFlow(frames, estimator), settings, on_frame=on_frame):
                writer.write(as_uint8(result.image.permute(1, 2, 0)))
