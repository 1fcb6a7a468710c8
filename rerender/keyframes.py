"""Key frame selection: uniform (Rerender), motion-adaptive (FRESCO Algorithm 1, reference §4.2), or a user list;
optionally split into shots at detected cuts, with a key frame on each side of every cut."""
import bisect
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F

# Cut detection compares colour histograms of consecutive frames: 8 levels per RGB channel (512 joint bins), on
# frames area-scaled to at most 128 px a side (fast, and insensitive to grain and compression noise).
CUT_HISTOGRAM_LEVELS = 8
CUT_PROXY_SIDE = 128
CUT_CHUNK_FRAMES = 16
# On the shared clips (whole, 64 px to full size) the distance between consecutive frames of one shot stays below
# 0.05 and the join of the two clips scores 0.64-0.68 (tests/test_shot_cuts.py); 0.3 sits well between.
DEFAULT_CUT_THRESHOLD = 0.3


@dataclass(frozen=True)
class KeyFrameSelection:
    """Which frames of a clip are key frames: the RERENDER_KEYFRAMES payload. Indices are sorted, unique, in range.

    Shots: `cuts` holds the first frame of every shot after the first (a cut lies between frames c-1 and c), sorted,
    in 1..num_frames-1; empty (the default) = the whole clip is one shot, as before cuts existed. Both frames beside
    every cut are key frames (checked here), so no interval between consecutive keys straddles a cut: the one
    across it, (c-1, c), has no frame in between. Within each shot the first key frame is that shot's anchor, which
    every later key frame of the shot is constrained to; nothing may take pixels, flow or attention across a cut.

    What downstream stages call (all cheap, no frames needed):
      `shots()`             -> [range of frames] per shot, in order (one range for the whole clip without cuts)
      `shot_of(frame)`      -> the number of the shot holding `frame`
      `shot_keys()`         -> [tuple of key indices] per shot (never empty)
      `anchor_of(key)`      -> the anchor (first key) of the shot holding frame `key`
      `intervals()`         -> consecutive (key a, key b) pairs inside one shot: the frames strictly between are
                               propagated from a and b
    A stage that batches key frames (FRESCO) batches each `shot_keys()` group separately, with that group's first
    key as the anchor."""
    indices: tuple
    num_frames: int
    cuts: tuple = ()

    def __post_init__(self):
        validate_indices(self.indices, self.num_frames, "key frame indices")
        validate_cuts(self.cuts, self.indices, self.num_frames)

    def as_string(self) -> str:
        return ",".join(str(i) for i in self.indices)

    def shots(self) -> list:
        bounds = [0, *self.cuts, self.num_frames]
        return [range(start, stop) for start, stop in zip(bounds, bounds[1:])]

    def shot_of(self, frame: int) -> int:
        if not 0 <= frame < self.num_frames:
            raise IndexError(f"frame {frame} is outside the clip of {self.num_frames} frames")
        return bisect.bisect_right(self.cuts, frame)

    def shot_keys(self) -> list:
        keys = [[] for _ in range(len(self.cuts) + 1)]
        for index in self.indices:
            keys[self.shot_of(index)].append(index)
        return [tuple(group) for group in keys]

    def anchor_of(self, key: int) -> int:
        return self.shot_keys()[self.shot_of(key)][0]

    def intervals(self) -> list:
        """Consecutive (key a, key b) pairs of one shot; the frames strictly between them are propagated."""
        return [(a, b) for a, b in zip(self.indices[:-1], self.indices[1:]) if self.shot_of(a) == self.shot_of(b)]


def validate_cuts(cuts: Iterable[int], indices: Iterable[int], num_frames: int) -> None:
    cuts, keys = list(cuts), set(indices)
    bad = [c for c in cuts if not 0 < c < num_frames]
    if bad:
        raise ValueError(f"shot cuts: {bad} out of range for a clip of {num_frames} frames (a cut is the first frame "
                         f"of a new shot: 1..{num_frames - 1}).")
    for a, b in zip(cuts, cuts[1:]):
        if b <= a:
            raise ValueError(f"shot cuts: must be strictly increasing, but {b} follows {a}.")
    unkeyed = [f for c in cuts for f in (c - 1, c) if f not in keys]
    if unkeyed:
        raise ValueError(f"shot cuts {cuts}: frames {unkeyed} beside a cut are not key frames; every cut needs a key "
                         "frame on each side (the Key Frame Picker's split_at_cuts adds them).")


def validate_indices(indices: Iterable[int], num_frames: int, what: str) -> None:
    indices = list(indices)
    if num_frames < 1:
        raise ValueError(f"{what}: the clip has no frames; connect a non-empty image batch.")
    if not indices:
        raise ValueError(f"{what}: no key frame selected; at least one index is needed.")
    bad = [i for i in indices if not 0 <= i < num_frames]
    if bad:
        raise ValueError(f"{what}: {bad} out of range for a clip of {num_frames} frames (valid: 0..{num_frames - 1}).")
    for a, b in zip(indices, indices[1:]):
        if b <= a:
            raise ValueError(f"{what}: must be strictly increasing, but {b} follows {a}; "
                             "list them in order without repeats.")


def _per_shot(num_frames: int, cuts: tuple, select: Callable[[int, int], Iterable[int]]) -> KeyFrameSelection:
    """`select(start, stop)` -> key offsets from `start`, for each shot; plus both frames beside every cut."""
    bounds = [0, *cuts, num_frames]
    keys = {c + side for c in cuts for side in (-1, 0)}
    for start, stop in zip(bounds, bounds[1:]):
        keys.update(start + offset for offset in select(start, stop))
    return KeyFrameSelection(tuple(sorted(keys)), num_frames, tuple(cuts))


def uniform_keyframes(num_frames: int, interval: int, include_last: bool = True, cuts: tuple = ()) -> KeyFrameSelection:
    """Rerender's spacing: the first frame, then every `interval` frames; optionally the last frame too, so that
    every frame lies between two key frames (Rerender picks its frame count so that this holds). With `cuts`, the
    spacing restarts at each shot's first frame and both frames beside every cut are keys."""
    if interval < 1:
        raise ValueError(f"interval must be at least 1, got {interval}.")

    def shot_keys(start: int, stop: int) -> list:
        length = stop - start
        indices = list(range(0, length, interval))
        if include_last and length > 0 and indices[-1] != length - 1:
            indices.append(length - 1)
        return indices

    return _per_shot(num_frames, tuple(cuts), shot_keys)


def _motion_proxy(frame: np.ndarray) -> np.ndarray:
    """The frame as FRESCO compares it: short side 512, Gaussian blur 9x9 (OpenCV's automatic sigma), in [-1, 1]."""
    h, w = frame.shape[:2]
    scale = 512.0 / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = cv2.resize(frame, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LANCZOS4)
    return cv2.GaussianBlur(resized, (9, 9), 0) * 2.0 - 1.0


def frame_differences(frames: Iterable[np.ndarray], interrupt_check: Optional[Callable[[], None]] = None) -> np.ndarray:
    """d[i] = MSE(frame_i, frame_{i-1}) on the motion proxies, d[0] = 0. Holds two frames at a time."""
    diffs, previous = [], None
    for frame in frames:
        if interrupt_check is not None:
            interrupt_check()
        proxy = _motion_proxy(np.asarray(frame, dtype=np.float32))
        diffs.append(0.0 if previous is None else float(np.mean((proxy - previous) ** 2)))
        previous = proxy
    return np.asarray(diffs, dtype=np.float64)


def _adaptive_offsets(diffs: np.ndarray, s_min: int, s_max: int) -> list:
    """FRESCO Algorithm 1 on one run of frames (diffs[0] ignored)."""
    n = len(diffs)
    if s_min == s_max:
        return list(range(0, n, s_min))
    d = np.array(diffs, dtype=np.float64)
    keys = sorted({0, n - 1})
    d[:s_min] = -1
    d[max(n - s_min, 0):] = -1
    while any(b - a > s_max for a, b in zip(keys, keys[1:])):
        best = int(np.argmax(d))
        if d[best] < 0:
            break
        d[max(best - s_min, 0):best + s_min] = -1
        keys = sorted(keys + [best])
    return keys


def adaptive_keyframes_from_differences(diffs: np.ndarray, s_min: int, s_max: int,
                                        cuts: tuple = ()) -> KeyFrameSelection:
    """FRESCO Algorithm 1: start from the first and last frame; while a gap exceeds s_max, insert the frame of
    largest motion that is at least s_min away from every inserted one (and from the clip's ends). With `cuts`,
    each shot is one such run (the cut's own difference is not motion) and both frames beside every cut are keys."""
    if s_min < 1 or s_max < 1:
        raise ValueError(f"s_min and s_max must be at least 1 (got s_min={s_min}, s_max={s_max}).")
    if s_min > s_max:
        raise ValueError(f"s_min ({s_min}) is larger than s_max ({s_max}); set s_min <= s_max.")
    return _per_shot(len(diffs), tuple(cuts), lambda start, stop: _adaptive_offsets(diffs[start:stop], s_min, s_max))


def adaptive_keyframes(frames: Iterable[np.ndarray], s_min: int, s_max: int,
                       interrupt_check: Optional[Callable[[], None]] = None, cuts: tuple = ()) -> KeyFrameSelection:
    """Motion-adaptive key frames for frames given as HxWx3 float arrays in 0..1 (any iterable, streamed)."""
    if s_min > s_max:
        raise ValueError(f"s_min ({s_min}) is larger than s_max ({s_max}); set s_min <= s_max.")
    return adaptive_keyframes_from_differences(frame_differences(frames, interrupt_check), s_min, s_max, cuts)


def _parse_int(token: str, item: str, text: str) -> int:
    try:
        return int(token)
    except ValueError:
        where = f"'{token}'" if token == item else f"'{token}' in '{item}'"
        raise ValueError(f"key frame list '{text}': {where} is not an integer; use e.g. '0,10,25' or "
                         "'0:80:10'.") from None


def _index_items(text: str) -> list:
    """The list's items, each (item text, [start, stop, step] or [index]) with ints or None; syntax only, so it
    can be checked before the clip's length is known."""
    items = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        fields = [f.strip() for f in item.split(":")]
        if len(fields) > 3:
            raise ValueError(f"key frame list '{text}': '{item}' has too many ':'; use start:stop:step.")
        values = [_parse_int(f, item, text) if f else None for f in fields]
        if len(values) == 1 and values[0] is None:
            continue
        if len(values) == 3 and values[2] is not None and values[2] <= 0:
            raise ValueError(f"key frame list '{text}': the step in '{item}' must be positive.")
        items.append((item, values))
    if not items:
        raise ValueError(f"key frame list '{text}': no key frame index given; use e.g. '0,10,25' or '0:80:10'.")
    return items


def check_index_list(text: str) -> None:
    """Raise ValueError if `text` is not valid index-list syntax (the checks that need no clip)."""
    _index_items(text)


def _resolve(value: int, num_frames: int) -> int:
    return value + num_frames if value < 0 else value


def parse_index_list(text: str, num_frames: int, cuts: tuple = ()) -> KeyFrameSelection:
    """VideoHelperSuite index syntax: comma-separated items, each an index (negative counts from the end) or a
    Python slice `start:stop:step` over the frame range. The result must be strictly increasing and in range.
    Errors quote the index as typed (-5, not the frame it would be). With `cuts`, both frames beside every cut are
    added to the list."""
    if num_frames < 1:
        raise ValueError("key frame list: the clip has no frames; connect a non-empty image batch.")
    valid = f"valid: 0..{num_frames - 1}, or -{num_frames}..-1 from the end"
    indices = []
    for item, values in _index_items(text):
        if len(values) == 1:
            index = _resolve(values[0], num_frames)
            if not 0 <= index < num_frames:
                raise ValueError(f"key frame list '{text}': index {item} is out of range for a clip of "
                                 f"{num_frames} frames ({valid}).")
            indices.append(index)
            continue
        start, stop, step = (values + [None] * 3)[:3]
        start_i = _resolve(start, num_frames) if start is not None else None
        stop_i = _resolve(stop, num_frames) if stop is not None else None
        if start_i is not None and not 0 <= start_i < num_frames:
            raise ValueError(f"key frame list '{text}': '{item}' starts at {start}, outside a clip of "
                             f"{num_frames} frames ({valid}).")
        if stop_i is not None and stop_i > num_frames:
            raise ValueError(f"key frame list '{text}': '{item}' stops at {stop}, beyond a clip of "
                             f"{num_frames} frames.")
        indices.extend(range(num_frames)[slice(start_i, stop_i, step)])
    validate_indices(indices, num_frames, f"key frame list '{text}'")
    return _per_shot(num_frames, tuple(cuts), lambda start, stop: (i - start for i in indices if start <= i < stop))


# ---- shot cuts --------------------------------------------------------------------------------------------------
def colour_histograms(frames: torch.Tensor) -> torch.Tensor:
    """[N,H,W,3] frames in 0..1 -> [N, levels³] joint RGB histograms, each summing to 1, on area-scaled proxies
    (one bincount for the whole batch)."""
    images = frames.movedim(-1, 1).float()
    height, width = images.shape[-2:]
    scale = min(1.0, CUT_PROXY_SIDE / max(height, width))
    if scale < 1.0:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        images = F.interpolate(images, size=size, mode="area")
    levels = CUT_HISTOGRAM_LEVELS
    quantised = (images.clamp(0.0, 1.0) * levels).long().clamp(max=levels - 1)
    bins = (quantised[:, 0] * levels + quantised[:, 1]) * levels + quantised[:, 2]
    count = images.shape[0]
    offsets = torch.arange(count, device=bins.device).view(-1, 1) * levels ** 3
    histograms = torch.bincount((bins.flatten(1) + offsets).flatten(), minlength=count * levels ** 3)
    histograms = histograms.view(count, -1).float()
    return histograms / histograms.sum(dim=1, keepdim=True)


def histogram_distances(frames: torch.Tensor, interrupt_check: Optional[Callable[[], None]] = None,
                        progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """d[i] = how much of frame i's colour histogram differs from frame i-1's (half the L1 distance: 0 = the same
    colours, 1 = no colour in common), d[0] = 0. Frames go CUT_CHUNK_FRAMES at a time; `progress(frames done)`."""
    distances, previous = [np.zeros(1)], None
    for start in range(0, frames.shape[0], CUT_CHUNK_FRAMES):
        if interrupt_check is not None:
            interrupt_check()
        histograms = colour_histograms(frames[start:start + CUT_CHUNK_FRAMES])
        chained = histograms if previous is None else torch.cat([previous, histograms])
        distances.append((0.5 * (chained[1:] - chained[:-1]).abs().sum(dim=1)).double().cpu().numpy())
        previous = histograms[-1:]
        if progress is not None:
            progress(min(start + CUT_CHUNK_FRAMES, frames.shape[0]))
    return np.concatenate(distances)[:frames.shape[0]]


def cuts_from_distances(distances: np.ndarray, threshold: float) -> tuple:
    """The frames that start a new shot: those whose histogram distance to the previous frame exceeds
    `threshold`."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"cut threshold must be in (0, 1], got {threshold}.")
    return tuple(int(i) for i in np.flatnonzero(np.asarray(distances)[1:] > threshold) + 1)


def detect_cuts(frames: torch.Tensor, threshold: float = DEFAULT_CUT_THRESHOLD,
                interrupt_check: Optional[Callable[[], None]] = None,
                progress: Optional[Callable[[int], None]] = None) -> tuple:
    """(cuts, distances): the first frame of every shot after the first, and each frame's histogram distance to
    its predecessor (see `histogram_distances`)."""
    distances = histogram_distances(frames, interrupt_check, progress)
    return cuts_from_distances(distances, threshold), distances
