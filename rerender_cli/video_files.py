"""Reading a video frame by frame and writing one so that a failed or interrupted run leaves no file behind.

The reader is OpenCV's (no host needed). The writer picks by the output's extension: `.mkv` / `.avi` are written
lossless (FFV1, so every frame reads back exactly), anything else as H.264 through PyAV when it is installed (the
host's requirements install it), else OpenCV's MPEG-4 Part 2. Frames go to a hidden file beside the output that is
renamed onto it only when the video is complete.
"""
import os
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from .errors import UserError

# FFmpeg's own log lines (e.g. "moov atom not found" for a file that is not a video) would add to the one-line error;
# OpenCV reads this when it opens a file
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
LOSSLESS_SUFFIXES = (".mkv", ".avi")
H264_CRF = "18"


class VideoReader:
    """Frames of a video file in order, as RGB uint8 [H,W,3]; a file that is not a video is a UserError (exit 3)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"input video '{path}' does not exist", 3)
        self._capture = cv2.VideoCapture(str(self.path))
        self.fps = self._capture.get(cv2.CAP_PROP_FPS) if self._capture.isOpened() else 0.0
        self.count = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT)) if self._capture.isOpened() else 0
        self.width = int(self._capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        self.height = int(self._capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if self.count <= 0 or self.fps <= 0 or self.width <= 0 or self.height <= 0:
            self._capture.release()
            raise UserError(f"'{path}' is not a video OpenCV can read (no frames, size or frame rate in it)", 3)
        self.position = 0

    def read(self) -> np.ndarray:
        """The next frame; a video that ends before the frame count its header gives is a UserError."""
        ok, frame = self._capture.read()
        if not ok:
            raise UserError(f"'{self.path}' ended at frame {self.position}, but its header says {self.count} "
                            f"frames; re-encode it (e.g. ffmpeg -i in.mp4 out.mp4)", 3)
        self.position += 1
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self._capture.release()


class VideoWriter:
    """RGB uint8 frames into a hidden file beside `path`; `commit()` renames it onto `path`, `discard()` (or leaving
    the `with` block on an exception) removes it."""

    def __init__(self, path: Path, fps: float, width: int, height: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self.frames = 0
        self._av = None
        if self.path.suffix.lower() in LOSSLESS_SUFFIXES:
            self._open_opencv("FFV1", fps, width, height)
            return
        try:
            import av
        except ImportError:
            av = None
        if av is None or width % 2 or height % 2:       # yuv420p H.264 needs even sides
            self._open_opencv("mp4v", fps, width, height)
            return
        self._av = av.open(str(self.partial), "w")
        self._stream = self._av.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.options = {"crf": H264_CRF}
        self._frame_class = av.VideoFrame

    def _open_opencv(self, fourcc: str, fps: float, width: int, height: int) -> None:
        self._cv = cv2.VideoWriter(str(self.partial), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
        if not self._cv.isOpened():
            raise UserError(f"cannot write a video to '{self.path}' (OpenCV has no {fourcc} writer for "
                            f"'{self.path.suffix}'); use .mp4 or .mkv", 3)

    def write(self, rgb: np.ndarray) -> None:
        if self._av is not None:
            frame = self._frame_class.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            for packet in self._stream.encode(frame):
                self._av.mux(packet)
        else:
            self._cv.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def _close(self) -> None:
        if self._av is not None:
            for packet in self._stream.encode():
                self._av.mux(packet)
            self._av.close()
            self._av = None
        elif getattr(self, "_cv", None) is not None:
            self._cv.release()
            self._cv = None

    def commit(self) -> Path:
        self._close()
        os.replace(self.partial, self.path)
        return self.path

    def discard(self) -> None:
        try:
            self._close()
        finally:
            self.partial.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            self.discard()
