"""Key frame selection: uniform (Rerender), motion-adaptive (FRESCO Algorithm 1, reference §4.2), or a user list."""
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import cv2
import numpy as np


@dataclass(frozen=True)
class KeyFrameSelection:
    """Which frames of a clip are key frames: the RERENDER_KEYFRAMES payload. Indices are sorted, unique, in range;
    the first one is the anchor that every later key frame is constrained to."""
    indices: tuple
    num_frames: int

    def __post_init__(self):
        validate_indices(self.indices, self.num_frames, "key frame indices")

    def as_string(self) -> str:
        return ",".join(str(i) for i in self.indices)

    def intervals(self) -> list:
        """Consecutive (key a, key b) pairs; the frames strictly between them are propagated."""
        return list(zip(self.indices[:-1], self.indices[1:]))


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


def uniform_keyframes(num_frames: int, interval: int, include_last: bool = True) -> KeyFrameSelection:
    """Rerender's spacing: the first frame, then every `interval` frames; optionally the last frame too, so that
    every frame lies between two key frames (Rerender picks its frame count so that this holds)."""
    if interval < 1:
        raise ValueError(f"interval must be at least 1, got {interval}.")
    indices = list(range(0, num_frames, interval))
    if include_last and num_frames > 0 and indices[-1] != num_frames - 1:
        indices.append(num_frames - 1)
    return KeyFrameSelection(tuple(indices), num_frames)


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


def adaptive_keyframes_from_differences(diffs: np.ndarray, s_min: int, s_max: int) -> KeyFrameSelection:
    """FRESCO Algorithm 1: start from the first and last frame; while a gap exceeds s_max, insert the frame of
    largest motion that is at least s_min away from every inserted one (and from the clip's ends)."""
    n = len(diffs)
    if s_min < 1 or s_max < 1:
        raise ValueError(f"s_min and s_max must be at least 1 (got s_min={s_min}, s_max={s_max}).")
    if s_min > s_max:
        raise ValueError(f"s_min ({s_min}) is larger than s_max ({s_max}); set s_min <= s_max.")
    if s_min == s_max:
        return KeyFrameSelection(tuple(range(0, n, s_min)), n)
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
    return KeyFrameSelection(tuple(keys), n)


def adaptive_keyframes(frames: Iterable[np.ndarray], s_min: int, s_max: int,
                       interrupt_check: Optional[Callable[[], None]] = None) -> KeyFrameSelection:
    """Motion-adaptive key frames for frames given as HxWx3 float arrays in 0..1 (any iterable, streamed)."""
    if s_min > s_max:
        raise ValueError(f"s_min ({s_min}) is larger than s_max ({s_max}); set s_min <= s_max.")
    return adaptive_keyframes_from_differences(frame_differences(frames, interrupt_check), s_min, s_max)


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


def parse_index_list(text: str, num_frames: int) -> KeyFrameSelection:
    """VideoHelperSuite index syntax: comma-separated items, each an index (negative counts from the end) or a
    Python slice `start:stop:step` over the frame range. The result must be strictly increasing and in range.
    Errors quote the index as typed (-5, not the frame it would be)."""
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
    return KeyFrameSelection(tuple(indices), num_frames)
