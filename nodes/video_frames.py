"""Video Frames node: a frame range of a VIDEO, decoded alone, at a size that keeps the aspect ratio.

Get Video Components decodes the whole clip at its source size as float32 (a minute of 1080p30 is about 45 GB);
this node decodes only the window from `first_frame` to the last frame it keeps, and scales the kept frames so that
the longer side is `longer_side` and both sides are multiples of 8 (what an SD-family VAE takes)."""
import math

import comfy.utils
from comfy_api.latest import io

from .categories import SHARED as CATEGORY

SIDE_MULTIPLE = 8


def scaled_size(width: int, height: int, longer_side: int) -> tuple:
    """(width, height) with the longer side at `longer_side` (0: the source's), the aspect ratio kept, and both
    sides rounded to the nearest multiple of 8 (at least 8)."""
    scale = 1.0 if longer_side == 0 else longer_side / max(width, height)
    return tuple(max(SIDE_MULTIPLE, round(side * scale / SIDE_MULTIPLE) * SIDE_MULTIPLE) for side in (width, height))


def decoded_window(video, first_frame: int, span: int):
    """The frames `first_frame` .. `first_frame + span - 1` (span 0: to the end) and the frame rate, decoding only
    that window where the video can be trimmed. The window's bounds sit half a frame outside the kept frames' times,
    so that rounding of timestamps never drops or adds one."""
    fps = float(video.get_frame_rate())
    if first_frame or span:
        start = max(0.0, (first_frame - 0.5) / fps) if first_frame else 0.0
        duration = (first_frame + span - 0.5) / fps - start if span else 0.0
        trimmed = video.as_trimmed(start, duration, strict_duration=False)
        if trimmed is not None:
            return trimmed.get_components().images, fps
    components = video.get_components()
    end = first_frame + span if span else None
    return components.images[first_frame:end], fps


class VideoFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Rerender_VideoFrames",
            display_name="Video Frames",
            category=CATEGORY,
            description="The frames of a video to render, and their frame rate: a range (first frame, count, "
                        "stride) decoded alone, scaled with the aspect ratio kept. Memory: each decoded frame "
                        "of the window takes width x height x 12 bytes at the source size (25 MB at 1080p) while "
                        "decoding; each kept frame the same at the output size (1.8 MB at 512x288).",
            inputs=[
                io.Video.Input("video", tooltip="The clip (Load Video)."),
                io.Int.Input("first_frame", default=0, min=0, max=10 ** 7,
                             tooltip="The first frame to keep (0 = the clip's first)."),
                io.Int.Input("frame_count", default=0, min=0, max=10 ** 6,
                             tooltip="How many frames to keep (0 = all up to the end). Start with a few dozen: "
                                     "the diffusion cost grows with the key frames, the propagation with all."),
                io.Int.Input("stride", default=1, min=1, max=1000,
                             tooltip="Keep every stride-th frame; the frame rate is divided by it."),
                io.Int.Input("longer_side", default=512, min=0, max=8192, step=SIDE_MULTIPLE,
                             tooltip="The longer side of the output in pixels; the other follows the aspect ratio. "
                                     "Both are rounded to multiples of 8. 0 keeps the source size (rounded)."),
            ],
            outputs=[
                io.Image.Output("frames", display_name="frames", tooltip="The kept frames, in order."),
                io.Float.Output("fps", display_name="fps", tooltip="Their frame rate (the source's / stride), for "
                                                                   "Create Video."),
            ],
        )

    @classmethod
    def execute(cls, video, first_frame, frame_count, stride, longer_side) -> io.NodeOutput:
        span = (frame_count - 1) * stride + 1 if frame_count else 0
        window, fps = decoded_window(video, first_frame, span)
        frames = window[::stride]
        if frames.shape[0] == 0:
            raise ValueError(f"Video Frames: `first_frame` {first_frame} lies past the clip's end "
                             f"({video.get_frame_count()} frames); lower it.")
        height, width = frames.shape[1:3]
        size = scaled_size(width, height, longer_side)
        if size != (width, height):
            method = "area" if math.prod(size) < width * height else "bilinear"
            frames = comfy.utils.common_upscale(frames.movedim(-1, 1), *size, method, "disabled").movedim(1, -1)
        return io.NodeOutput(frames, fps / stride)


NODES = [VideoFrames]
