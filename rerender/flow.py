"""Dense flow and occlusion between frames of a clip (reference §2), from RAFT or OpenCV DIS.

Estimators are callables `estimator(image_a, image_b) -> flow`: images `[B,3,H,W]` float 0..1 (any device), flow
`[B,2,H,W]` float32 in pixels on the estimator's device, the *forward* flow of a -> b: pixel p of image_a matches
p + flow(p) in image_b, so `warp.flow_warp(image_b, flow)` lays image_b onto image_a. Any such callable works
(`DISEstimator`, `RAFTEstimator` here).

`VideoFlow` is what the later stages consume: `pair(src, dst)` gives the backward flow laying frame src onto frame
dst (= estimator(frame_dst, frame_src)) and the occlusion of dst's pixels, computed per unordered pair when first
asked for (both directions in one estimator batch, as the occlusion test needs both) and cached on the CPU in half
precision, in a bounded least-recently-used cache, so a long clip never holds the flows of the whole clip.
"""
import math
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .warp import flow_warp

CONSISTENCY_ALPHA = 0.01
CONSISTENCY_BETA = 0.5
PHOTOMETRIC_THRESHOLD = 0.25  # mean RGB error on 0..1 images; FRESCO's 0.25*255 on 0..255 images
DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
RAFT_ITERATIONS = 32  # as princeton-vl's evaluate.py on Sintel
_WHEEL_STEPS = 16  # flow colours: interpolation steps between the 55 colours of the Middlebury wheel


def flow_magnitude(flow: torch.Tensor) -> torch.Tensor:
    """[N,1,H,W] vector length of a [N,2,H,W] flow (hypot: `norm(dim=1)` is ~50x slower on CPU for this layout)."""
    return torch.hypot(flow[:, :1], flow[:, 1:2])


def forward_backward_occlusion(flow: torch.Tensor, reverse_flow: torch.Tensor,
                               alpha: float = CONSISTENCY_ALPHA, beta: float = CONSISTENCY_BETA) -> torch.Tensor:
    """[N,1,H,W] bool, True where `flow` (a -> b, on a's grid) and `reverse_flow` (b -> a, on b's grid) disagree:
    |f + warp(r, f)| > alpha (|f| + |r|) + beta, with both magnitudes taken at the same pixel (GMFlow's check)."""
    round_trip = flow + flow_warp(reverse_flow, flow)
    threshold = alpha * (flow_magnitude(flow) + flow_magnitude(reverse_flow)) + beta
    return flow_magnitude(round_trip) > threshold


def photometric_occlusion(image: torch.Tensor, other: torch.Tensor, flow: torch.Tensor,
                          threshold: float = PHOTOMETRIC_THRESHOLD) -> torch.Tensor:
    """[N,1,H,W] bool, True where `other` warped onto `image` by `flow` differs by more than `threshold` (mean RGB)."""
    return (image.float() - flow_warp(other.float(), flow)).abs().mean(dim=1, keepdim=True) > threshold


def _as_gray_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] 0..1 -> [B,H,W] uint8 luma (ITU-R 601 weights, as cv2.COLOR_RGB2GRAY); an explicit weighted sum,
    as a reduction over the channel dimension is several times slower on the CPU."""
    rgb = images.detach().to("cpu", torch.float32)
    luma = rgb[:, 0] * (0.299 * 255) + rgb[:, 1] * (0.587 * 255) + rgb[:, 2] * (0.114 * 255)
    return luma.round_().clamp_(0, 255).to(torch.uint8).numpy()


class DISEstimator:
    """OpenCV's DIS optical flow (no weights): the fallback when no flow model is connected. CPU only."""

    def __init__(self, preset: str = "medium"):
        if preset not in DIS_PRESETS:
            raise ValueError(f"DIS preset must be one of {sorted(DIS_PRESETS)}, got {preset!r}")
        self.preset = preset
        self._dis = cv2.DISOpticalFlow_create(DIS_PRESETS[preset])

    def __call__(self, image_a: torch.Tensor, image_b: torch.Tensor) -> torch.Tensor:
        gray_a, gray_b = _as_gray_uint8(image_a), _as_gray_uint8(image_b)
        flows = [self._dis.calc(a, b, None) for a, b in zip(gray_a, gray_b)]
        return torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).contiguous()

    def __getstate__(self):
        return {"preset": self.preset}  # the OpenCV object does not pickle; it is rebuilt from the preset

    def __setstate__(self, state):
        self.__init__(state["preset"])

    def __repr__(self):
        return f"DISEstimator({self.preset!r})"


def _raft_class():
    from torchvision.models.optical_flow import RAFT
    return RAFT


def is_raft(module) -> bool:
    return isinstance(module, _raft_class())


class RAFTEstimator:
    """A torchvision RAFT module (the host's OPTICAL_FLOW `.model`, or `raft_checkpoint.load_raft`) as an estimator.

    Frames are mapped to [-1, 1] and replicate-padded, centred, to a multiple of 8 (and to RAFT's 128 px minimum) as
    princeton-vl's `InputPadder` does, so sizes need not be multiples of 8 and nothing is resampled. `prepare`, if
    given, runs before each call (the host's `load_models_gpu`, so a module that was offloaded comes back); the
    module runs where its weights are, or on `device` when one is given (then it is moved there, as the host's own
    RAFT wrapper does)."""

    def __init__(self, module, device=None, iterations: int = RAFT_ITERATIONS, prepare: Optional[Callable] = None):
        if not is_raft(module):
            raise ValueError(f"expected a torchvision RAFT module (raft_large / raft_small), got "
                             f"{type(module).__module__}.{type(module).__name__}")
        if iterations < 1:
            raise ValueError(f"RAFT iterations must be at least 1, got {iterations}")
        self.module, self.iterations, self.prepare = module, int(iterations), prepare
        self.device = None if device is None else torch.device(device)
        if self.device is not None:
            module.to(self.device)

    def __call__(self, image_a: torch.Tensor, image_b: torch.Tensor) -> torch.Tensor:
        if self.prepare is not None:
            self.prepare()
        device = self.device if self.device is not None else next(self.module.parameters()).device
        height, width = image_a.shape[-2:]
        pad_h = max(math.ceil(height / 8) * 8, 128) - height
        pad_w = max(math.ceil(width / 8) * 8, 128) - width
        pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        images = torch.cat([image_a, image_b]).to(device, torch.float32) * 2.0 - 1.0
        images = F.pad(images, pads, mode="replicate")
        with torch.inference_mode():
            flow = raft_final_flow(self.module, *images.chunk(2), self.iterations)
        return flow[..., pads[2]:pads[2] + height, pads[0]:pads[0] + width].clone()

    def __repr__(self):
        return f"RAFTEstimator({'large' if self.module.mask_predictor is not None else 'small'}, " \
               f"iterations={self.iterations})"


def raft_final_flow(module, image1: torch.Tensor, image2: torch.Tensor, iterations: int) -> torch.Tensor:
    """torchvision `RAFT.forward(...)[-1]`, upsampling only the last estimate: the stock forward upsamples and keeps
    every iteration's full-resolution flow (32 of them here), which is time and device memory for nothing."""
    from torchvision.models.optical_flow._utils import make_coords_grid, upsample_flow

    batch, _, height, width = image1.shape
    fmap1, fmap2 = module.feature_encoder(torch.cat([image1, image2])).chunk(2)
    module.corr_block.build_pyramid(fmap1, fmap2)
    context_out = module.context_encoder(image1)
    hidden_size = module.update_block.hidden_state_size
    hidden, context = context_out.split([hidden_size, context_out.shape[1] - hidden_size], dim=1)
    hidden, context = torch.tanh(hidden), F.relu(context)
    coords0 = make_coords_grid(batch, height // 8, width // 8).to(fmap1.device)
    coords1 = coords0.clone()
    for _ in range(iterations):
        corr_features = module.corr_block.index_pyramid(centroids_coords=coords1)
        hidden, delta = module.update_block(hidden, context, corr_features, coords1 - coords0)
        coords1 = coords1 + delta
    module.corr_block.corr_pyramid = [torch.tensor(0)]  # the block's own cache: free the volume now, not next call
    up_mask = None if module.mask_predictor is None else module.mask_predictor(hidden)
    return upsample_flow(coords1 - coords0, up_mask=up_mask)


def _frames_nchw(frames) -> torch.Tensor:
    """Validate a clip ([N,H,W,3] tensor or a sequence of [H,W,3] tensors) and return it as an [N,3,H,W] view
    (no copy of a tensor: pairs convert their two frames to float32 when estimated)."""
    if isinstance(frames, (list, tuple)):
        sizes = {tuple(f.shape) for f in frames}
        if len(sizes) > 1:
            raise ValueError(f"frames: all frames must have the same size, got {sorted(sizes)}; resize them first "
                             f"(e.g. with an Upscale Image node) so the whole clip shares one size")
        frames = torch.stack(list(frames)) if frames else torch.empty(0, 0, 0, 3)
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"frames: expected an IMAGE batch [N,H,W,3], got {shape}")
    if frames.shape[0] < 2:
        raise ValueError(f"frames: flow needs at least 2 frames, got {frames.shape[0]}; pass the whole clip")
    return frames.movedim(-1, 1)


DEFAULT_CACHE_PAIRS = 32  # unordered pairs kept by an on-demand VideoFlow: > the picker's s_max (20) + passes in flight


def consistency_settings(alpha: float, beta: float, photometric_check: bool) -> dict:
    """VideoFlow's occlusion-test keywords from Flow Estimation's widgets (for the node and the cluster job's
    intervals, which estimate their flow without the host)."""
    return dict(alpha=alpha, beta=beta, photometric_threshold=PHOTOMETRIC_THRESHOLD if photometric_check else None)


@contextmanager
def _intra_op_threads(count: int):
    """Run torch ops of the calling thread with `count` intra-op threads (the setting is per thread), then restore."""
    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class VideoFlow:
    """Flow and occlusion between any two frames of a clip; the RERENDER_FLOW payload.

    A pair is estimated on first request, both directions in one estimator batch, always in the order (lower
    frame, higher frame) and with the intra-op thread count of the thread that made this object, so the numbers do
    not depend on who asks first or from which thread (a propagation worker runs single-threaded). Results live on
    the CPU (flow float16, occlusion bool; 10 bytes per pixel per pair) and are returned as float32.

    `max_cached_pairs` bounds memory: at most that many unordered pairs are kept, the least recently used dropped
    first (asking for a dropped pair again estimates it again, to the same numbers). None keeps every pair, as
    `estimate` (all consecutive pairs up front) does by default. The object holds a reference to the frames, not a
    copy."""

    def __init__(self, frames, estimator: Callable, alpha: float = CONSISTENCY_ALPHA, beta: float = CONSISTENCY_BETA,
                 photometric_threshold: Optional[float] = None,
                 max_cached_pairs: Optional[int] = DEFAULT_CACHE_PAIRS):
        if max_cached_pairs is not None and max_cached_pairs < 1:
            raise ValueError(f"max_cached_pairs must be at least 1 (or None: no bound), got {max_cached_pairs}")
        self._frames = _frames_nchw(frames)
        self.num_frames, _, self.height, self.width = self._frames.shape
        self.estimator = estimator
        self.alpha, self.beta, self.photometric_threshold = alpha, beta, photometric_threshold
        self.max_cached_pairs = max_cached_pairs
        self.estimator_threads = torch.get_num_threads()
        self._pairs = OrderedDict()  # (low, high) -> (flows [2,2,H,W] f16, occlusion [2,1,H,W] bool), LRU order
        self._pairs_lock = threading.Lock()  # pairs are asked for from several propagation passes at once
        self.estimates = 0  # estimator batches run (a pair dropped and asked for again counts twice)
        self.peak_cached_pairs = 0

    @classmethod
    def estimate(cls, frames, estimator: Callable, progress: Optional[Callable[[int, int], None]] = None,
                 interrupt_check: Optional[Callable[[], None]] = None, max_cached_pairs: Optional[int] = None,
                 **settings) -> "VideoFlow":
        """Compute both directions of every consecutive pair now, kept for the whole clip unless
        `max_cached_pairs` says otherwise; `progress(done, total)` after each pair and `interrupt_check()` before
        each (it raises to stop). `settings`: alpha, beta, photometric_threshold."""
        video_flow = cls(frames, estimator, max_cached_pairs=max_cached_pairs, **settings)
        total = video_flow.num_frames - 1
        for index in range(total):
            if interrupt_check is not None:
                interrupt_check()
            video_flow.pair(index, index + 1)
            if progress is not None:
                progress(index + 1, total)
        return video_flow

    @property
    def computed_pairs(self) -> frozenset:
        """The directed pairs held now."""
        with self._pairs_lock:
            keys = list(self._pairs)
        return frozenset(key for low, high in keys for key in ((low, high), (high, low)))

    @property
    def pair_nbytes(self) -> int:
        """CPU bytes one cached unordered pair takes (both flows in float16, both occlusion masks)."""
        return 2 * (2 * 2 + 1) * self.height * self.width

    def pair(self, src: int, dst: int, device=None) -> tuple:
        """flow [1,2,H,W] float32: backward flow laying frame src onto frame dst (flow_warp(frame_src, flow) ~
        frame_dst); occlusion [1,1,H,W] float32, 1 where a dst pixel has no reliable source in src."""
        for name, index in (("src", src), ("dst", dst)):
            if not 0 <= index < self.num_frames:
                raise IndexError(f"{name} frame {index} is out of range for a {self.num_frames}-frame clip")
        if src == dst:
            return (torch.zeros(1, 2, self.height, self.width, device=device),
                    torch.zeros(1, 1, self.height, self.width, device=device))
        key, row = ((src, dst), 0) if src < dst else ((dst, src), 1)
        with self._pairs_lock:
            entry = self._pairs.get(key)
            if entry is None:
                entry = self._pairs[key] = self._compute(*key)
                self.estimates += 1
                while self.max_cached_pairs is not None and len(self._pairs) > self.max_cached_pairs:
                    self._pairs.popitem(last=False)
                self.peak_cached_pairs = max(self.peak_cached_pairs, len(self._pairs))
            else:
                self._pairs.move_to_end(key)
        flows, occlusion = entry
        return flows[row:row + 1].to(device, torch.float32), occlusion[row:row + 1].to(device, torch.float32)

    def _compute(self, src: int, dst: int) -> tuple:
        """Both directions in one batch: row 0 lays src onto dst (on dst's grid), row 1 dst onto src."""
        targets = self._frames[[dst, src]].to(torch.float32)
        sources = self._frames[[src, dst]].to(torch.float32)
        with _intra_op_threads(self.estimator_threads):
            flows = self.estimator(targets, sources).float()
            occlusion = forward_backward_occlusion(flows, flows.flip(0), self.alpha, self.beta)
            if self.photometric_threshold is not None:
                on_device = flows.device
                occlusion |= photometric_occlusion(targets.to(on_device), sources.to(on_device), flows,
                                                   self.photometric_threshold)
        return flows.to("cpu", torch.float16), occlusion.cpu()

    def consecutive(self, start: int = 0, stop: Optional[int] = None, device=None):
        """Yield (index, flow, occlusion) of pair (index-1, index) for index in [max(start, 1), stop)."""
        for index in range(max(start, 1), self.num_frames if stop is None else stop):
            yield (index, *self.pair(index - 1, index, device))

    def matches_clip(self, frames: torch.Tensor, indices, tolerance: float = 2 / 255) -> bool:
        """Whether `frames` ([N,H,W,3] 0..1) are the clip this flow was estimated on: same shape, and the frames at
        `indices` equal within `tolerance` (mean absolute difference), so a flow from another clip is caught."""
        if tuple(frames.shape[:3]) != (self.num_frames, self.height, self.width):
            return False
        index = torch.as_tensor(list(indices), dtype=torch.long)
        own = self._frames[index].to(torch.float32)
        given = frames[index.to(frames.device)].movedim(-1, 1).to(own.device, torch.float32)
        return bool((own - given).abs().flatten(1).mean(1).max() <= tolerance)

    def __getstate__(self):
        """Picklable (for caches that serialise node outputs): the frames, settings and cached pairs; no lock."""
        state = self.__dict__.copy()
        del state["_pairs_lock"]
        with self._pairs_lock:
            state["_pairs"] = OrderedDict(self._pairs)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pairs_lock = threading.Lock()

    def __repr__(self):
        bound = "all kept" if self.max_cached_pairs is None else f"at most {self.max_cached_pairs} kept"
        return (f"VideoFlow({self.num_frames} frames {self.width}x{self.height}, {self.estimator!r}, "
                f"{len(self._pairs)} pairs cached, {bound})")


def _middlebury_color_wheel(steps_per_color: int) -> torch.Tensor:
    """The Middlebury flow colour wheel (Baker et al.: red-yellow-green-cyan-blue-magenta ramps of 15, 6, 4, 11,
    13, 6 colours), linearly interpolated with `steps_per_color` entries per colour step, [54*steps+1, 3]."""
    ramps = ((15, (1, 0, 0), (1, 1, 0)), (6, (1, 1, 0), (0, 1, 0)), (4, (0, 1, 0), (0, 1, 1)),
             (11, (0, 1, 1), (0, 0, 1)), (13, (0, 0, 1), (1, 0, 1)), (6, (1, 0, 1), (1, 0, 0)))
    segments = []
    for steps, start, end in ramps:
        t = torch.arange(steps, dtype=torch.float32).unsqueeze(1) / steps
        segments.append(torch.tensor(start) * (1 - t) + torch.tensor(end) * t)
    wheel = torch.cat(segments).T[None]  # [1, 3, 55]
    fine = F.interpolate(wheel, size=54 * steps_per_color + 1, mode="linear", align_corners=True)
    return fine[0].T.contiguous()


def flow_to_color(flow: torch.Tensor, max_magnitude: Optional[float] = None) -> torch.Tensor:
    """[N,2,H,W] flow -> [N,H,W,3] float 0..1 image (hue = direction, saturation = magnitude / max_magnitude;
    white = still; Middlebury colour coding). Pass one `max_magnitude` for a whole clip so colours compare across
    frames."""
    flow = flow.float()
    radius = flow_magnitude(flow)[:, 0]
    radius = (radius / max(float(radius.max()) if max_magnitude is None else max_magnitude, 1e-6)).unsqueeze(-1)
    wheel = _middlebury_color_wheel(_WHEEL_STEPS).to(flow.device)
    angle = torch.atan2(-flow[:, 1], -flow[:, 0]) / math.pi  # -1..1, as the Middlebury code
    index = ((angle + 1) * (27 * _WHEEL_STEPS)).round_().long()  # 0 .. 54 colours * steps
    inside = radius <= 1  # within range: fade from white to the colour; beyond: the colour, darkened
    offset = torch.where(inside, 1 - radius, 0.0)
    scale = torch.where(inside, radius, 0.75)
    return torch.addcmul(offset, scale, F.embedding(index, wheel))
