"""Propagation of rendered key frames to every other frame (reference §3.2-3.3), EbSynth replaced by
`rerender.patchmatch`.

Per interval between key frames a < b: a forward pass synthesises a+1..b-1 from key a, a backward pass b-1..a+1
from key b, each frame guided by colour (the input frame), edges (its Laplacian), a temporal guide (the pass's
previous output carried along the flow) and a positional guide (coordinates carried along the flow). The two passes
are then merged by temporal-aware blending: an error-based selection mask that stays switched along the motion,
a histogram-preserving blend in Lab, and optionally a screened-Poisson (gradient-domain) fusion solved exactly with
DCTs. Frames before the first key / after the last get the single pass that reaches them. Work is streamed interval
by interval, so memory holds the passes in flight (one per worker) and one interval's forward pass, never the
clip's. On the CPU whole passes run side by side up to 720p, one thread each (see `default_workers`).

Departures from the reference, each measured on bench/propagator_bench.py: guides are carried along the flow with
bilinear instead of nearest sampling; holes in them are filled by a push-pull pyramid in torch by default (the
reference's cv2.inpaint TELEA r=30 is kept as an option: same PSNR, slower), and a patch centred in a hole of this
step is matched without the temporal and positional guides (`patchmatch.Guide.reliable`), where EbSynth weighs the
filled-in values like the rest; the two passes are mixed with
per-pixel weights, the reference's temporal weights divided by each pass's patch error (`error_weights`), where the
reference mixes whole frames with the temporal weights; each frame's search starts from the previous frame's field
carried along the flow and runs at half and full resolution with random radii up to 4 (`warm_start`; over the
whole key for the patches that reach where this step's flow failed, and with more descriptor dimensions and
PatchMatch iterations in a frame mostly new to the key), where EbSynth searches every frame from a random field over
the whole pyramid; the Poisson fusion is off by default (see
PropagationSettings); Lab is kept in float rather than rounded to 8 bits.

Frames are [N,H,W,3] float RGB in 0..1 (ComfyUI IMAGE); internally images are [3,H,W].
"""
import math
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from . import patchmatch
from .warp import flow_warp

EDGE_KERNEL = ((0.0, -1.0, 0.0), (-1.0, 4.0, -1.0), (0.0, -1.0, 0.0))  # reference's Laplacian-like edge filter
POISSON_GRADIENT_WEIGHTS = (2.5, 0.5, 0.5)  # L, a, b (reference)
POISSON_GRADIENT_CLIP = 100.0  # on OpenCV 8-bit Lab values
TELEA_RADIUS = 30
HOLE_FILLS = ("pyramid", "telea")
MIN_COVERAGE = 1e-2  # a pass's share where its guides were all filled, relative to one whose guides were carried
MAX_SCALE = 4.0  # the largest (and 1/ the smallest) scale of the key searched


@dataclass(frozen=True)
class PropagationSettings:
    """Reference defaults (guide weights 6 / 0.5 / 0.5 / 2, EbSynth as the reference calls it, histogram blend),
    except `poisson`: off, as in the Rerender paper (the released code turns it on). On the bench's clips it costs
    ~1.5 dB PSNR against the ground truth: its gradients are clipped at 100 on 8-bit Lab, which flattens strong
    edges."""
    colour_weight: float = 6.0
    edge_weight: float = 0.5
    temporal_weight: float = 0.5
    positional_weight: float = 2.0
    patch_size: int = patchmatch.EBSYNTH_PATCH_SIZE
    search_vote_iters: int = patchmatch.EBSYNTH_SEARCH_VOTE_ITERS
    patchmatch_iters: int = patchmatch.EBSYNTH_PATCHMATCH_ITERS
    uniformity: float = patchmatch.EBSYNTH_UNIFORMITY
    stop_threshold: float = patchmatch.EBSYNTH_STOP_THRESHOLD
    pyramid_levels: Optional[int] = None
    descriptor_size: int = patchmatch.DEFAULT_DESCRIPTOR_SIZE
    hole_fill: str = "pyramid"
    histogram_blend: bool = True
    poisson: bool = False
    seed: int = 0
    scale_search: bool = False     # +0.05 dB on man:zoom3 for a larger search (issue 25): opt-in until it pays
    min_scale_change: float = 0.06
    coverage_weights: bool = False  # not yet measured on the bench (issue 25): off keeps the blend as it was
    warm_start: bool = True  # each frame's search starts from the previous frame's field carried along the flow,
    # at half and full resolution only (pyramid_levels then applies to frames searched cold: none, unless scale_search)
    warm_search_radius: int = 4  # the random search's largest radius from a warm start (not where the flow failed)
    # A frame where less than this share of the pixels was carried from the key along the flow is mostly new
    # content, which the warm start knows nothing of: its pixels not carried run all `patchmatch_iters` and are
    # compared through `new_content_descriptor_size` dims (issue 25: car:5 +0.6 dB, its frames 4-7 +1.1-1.3 dB).
    # Carried pixels keep `descriptor_size`, 8 dims, which favour coherent matches (24 there cost man:3 0.09 dB),
    # and the warm start's 3 iterations (all 6 there cost man:3 a fifth more time for nothing).
    new_content_share: float = 0.9
    new_content_descriptor_size: int = 24

    def __post_init__(self):
        if self.hole_fill not in HOLE_FILLS:
            raise ValueError(f"hole_fill must be one of {HOLE_FILLS}, got {self.hole_fill!r}")
        for name in ("colour_weight", "edge_weight", "temporal_weight", "positional_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def settings_from_widgets(colour_weight, edge_weight, temporal_weight, positional_weight, patch_size,
                          search_vote_iters, patchmatch_iters, hole_fill, histogram_blend, poisson_fusion, uniformity,
                          stop_threshold, pyramid_levels, descriptor_size, seed) -> PropagationSettings:
    """The settings Patch Propagator's widgets ask for (pyramid_levels 0 = the warm start, N = every frame searched
    from scratch over N levels; Poisson fusion only with the histogram blend); one mapping for the node and for the
    cluster job's intervals, which run without the host."""
    return PropagationSettings(
        colour_weight=colour_weight, edge_weight=edge_weight, temporal_weight=temporal_weight,
        positional_weight=positional_weight, patch_size=patch_size, search_vote_iters=search_vote_iters,
        patchmatch_iters=patchmatch_iters, uniformity=uniformity, stop_threshold=stop_threshold,
        pyramid_levels=pyramid_levels or None, warm_start=not pyramid_levels, descriptor_size=descriptor_size,
        hole_fill=hole_fill,
        histogram_blend=histogram_blend, poisson=poisson_fusion and histogram_blend, seed=seed)


@dataclass
class PassFrame:
    image: torch.Tensor  # [3,H,W] 0..1
    error: torch.Tensor  # [H,W] patch error (EbSynth units)
    coverage: Optional[torch.Tensor] = None  # [H,W] 0..1: how much of each pixel's guides came from the key along
    # the flow (1) rather than from hole filling (0); None = everywhere


# ---- guides ---------------------------------------------------------------------------------------------------
def edge_guide(image: torch.Tensor) -> torch.Tensor:
    """Reference edge guide: the 3x3 Laplacian filter per channel on 8-bit values, negatives clipped to 0 (as
    OpenCV filter2D into uint8, BORDER_REFLECT_101 = torch 'reflect')."""
    kernel = torch.tensor(EDGE_KERNEL, device=image.device).view(1, 1, 3, 3).repeat(image.shape[0], 1, 1, 1)
    padded = F.pad((image.float() * 255.0).round()[None], (1, 1, 1, 1), mode="reflect")
    return (F.conv2d(padded, kernel, groups=image.shape[0])[0].clamp(0.0, 255.0) / 255.0)


def coordinate_image(height: int, width: int, device=None) -> torch.Tensor:
    """Reference positional guide at the key: R = row/(H-1), G = col/(W-1), B = 0 (kept in float, not 8-bit)."""
    rows = torch.linspace(0.0, 1.0, height, device=device).view(height, 1).expand(height, width)
    cols = torch.linspace(0.0, 1.0, width, device=device).view(1, width).expand(height, width)
    return torch.stack((rows, cols, torch.zeros_like(rows)))


def fill_holes(image: torch.Tensor, holes: torch.Tensor, method: str = "pyramid") -> torch.Tensor:
    """Fill the pixels where `holes` ([H,W] bool) is set. 'telea': cv2.inpaint(radius 30, TELEA) as the reference
    (8-bit, on the CPU, slow for large holes); 'pyramid': push-pull interpolation in torch (any device, fast)."""
    if not bool(holes.any()):
        return image
    if method == "telea":
        as_uint8 = (image.permute(1, 2, 0).float().clamp(0, 1) * 255).round().byte().cpu().numpy()
        mask = holes.cpu().numpy().astype(np.uint8)
        filled = np.stack([cv2.inpaint(np.ascontiguousarray(as_uint8[..., c]), mask, TELEA_RADIUS,
                                       cv2.INPAINT_TELEA) for c in range(image.shape[0])], axis=0)
        filled = torch.from_numpy(filled).to(image.device, torch.float32) / 255.0
        return torch.where(holes, filled, image)
    return _push_pull_fill(image, holes)


def _push_pull_fill(image: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
    """Average the known pixels down a pyramid, then fill each level's holes from the coarser level."""
    known = (~holes).float()[None, None]
    values = image[None].float() * known
    levels = []
    while True:
        levels.append((values, known))
        if min(values.shape[-2:]) <= 1 or bool(known.min() > 0):
            break
        values = F.avg_pool2d(values, 2, ceil_mode=True)
        known = F.avg_pool2d(known, 2, ceil_mode=True)
    coarse_values, coarse_known = levels[-1]
    filled = coarse_values / coarse_known.clamp(min=1e-6)
    for values, known in reversed(levels[:-1]):
        upsampled = F.interpolate(filled, size=values.shape[-2:], mode="bilinear", align_corners=False)
        filled = torch.where(known > 0, values / known.clamp(min=1e-6), upsampled)
    return torch.where(holes[None, None], filled, image[None].float())[0]


def advect_holes(flow: torch.Tensor, occlusion: torch.Tensor) -> torch.Tensor:
    """[H,W] bool: the pixels that `advect` fills (occluded, or carried from outside the frame)."""
    _, _, h, w = flow.shape
    xs = torch.arange(w, device=flow.device).view(1, w) + flow[0, 0]
    ys = torch.arange(h, device=flow.device).view(h, 1) + flow[0, 1]
    return (occlusion[0, 0] > 0.5) | (xs < 0) | (xs > w - 1) | (ys < 0) | (ys > h - 1)


def advect(image: torch.Tensor, flow: torch.Tensor, occlusion: torch.Tensor, hole_fill: str) -> torch.Tensor:
    """Carry `image` ([C,H,W]) one step along `flow` ([1,2,H,W], backward, as VideoFlow.pair), then fill occluded
    pixels and pixels that came from outside the frame (the temporal and positional guides). Bilinear, where the
    reference samples the nearest pixel: re-sampling every frame to the nearest pixel lets the guides drift by up to
    half a pixel per frame and costs ~1.5 dB over a 10-frame pass (measured on the bench's man clip)."""
    warped = flow_warp(image[None].float(), flow)[0]
    return fill_holes(warped, advect_holes(flow, occlusion), hole_fill)


def carry_field(field: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """The previous frame's field ([2,H,W] source x, y) carried one step along `flow` ([1,2,H,W], backward): each
    pixel takes the match of the pixel it came from (nearest; from outside the frame, the nearest edge pixel)."""
    h, w = field.shape[-2:]
    xs = (torch.arange(w, device=flow.device).view(1, w) + flow[0, 0]).round().clamp(0, w - 1).long()
    ys = (torch.arange(h, device=flow.device).view(h, 1) + flow[0, 1]).round().clamp(0, h - 1).long()
    return field[:, ys, xs]


# ---- scale ----------------------------------------------------------------------------------------------------
def flow_scale(positions: torch.Tensor, valid: Optional[torch.Tensor] = None, step: int = 8) -> float:
    """How much larger the target shows the key's content, from the positional guide (`positions` [3,H,W]: key
    coordinates row/(H-1), col/(W-1) carried along the flow): 1/sqrt(det J) of the map target pixel -> key pixel,
    J from differences over `step` pixels, median over the pixels whose coordinates were carried, not filled
    (`valid` [H,W] bool). 1 when too few pixels tell."""
    h, w = positions.shape[-2:]
    if h <= 2 * step or w <= 2 * step:
        return 1.0
    rows, cols = positions[0] * (h - 1), positions[1] * (w - 1)
    centre = (slice(step, h - step), slice(step, w - step))
    dr_dy = (rows[2 * step:, step:w - step] - rows[:h - 2 * step, step:w - step]) / (2 * step)
    dr_dx = (rows[step:h - step, 2 * step:] - rows[step:h - step, :w - 2 * step]) / (2 * step)
    dc_dy = (cols[2 * step:, step:w - step] - cols[:h - 2 * step, step:w - step]) / (2 * step)
    dc_dx = (cols[step:h - step, 2 * step:] - cols[step:h - step, :w - 2 * step]) / (2 * step)
    det = dr_dy * dc_dx - dr_dx * dc_dy
    keep = det > 1e-3
    if valid is not None:
        # all four neighbours carried too, so no difference reaches into a filled hole
        v = valid
        keep &= (v[centre] & v[2 * step:, step:w - step] & v[:h - 2 * step, step:w - step]
                 & v[step:h - step, 2 * step:] & v[step:h - step, :w - 2 * step])
    if int(keep.sum()) < 0.05 * keep.numel():
        return 1.0
    return float(det[keep].median().clamp(min=1e-3) ** -0.5)


def search_scales(scale: float, settings: "PropagationSettings") -> list:
    """The scales of the key searched for a target that shows it `scale` times larger: the key itself, and where
    the scale moved by more than `settings.min_scale_change`, the key resized to that scale."""
    if not settings.scale_search or abs(math.log(max(scale, 1e-6))) <= math.log1p(settings.min_scale_change):
        return [1.0]
    return [1.0, min(max(scale, 1.0 / MAX_SCALE), MAX_SCALE)]


def scaled_atlas(images: Sequence[torch.Tensor], scales: Sequence[float], positions: torch.Tensor,
                 margin: int) -> tuple:
    """The key's images (each [C,H,W], aligned; the last is its coordinate image) at every scale, side by side in
    one atlas (bottoms padded by repeating the last row). A resized copy keeps only the part of the key that the
    target's `positions` reach, plus `margin` pixels. Returns (the atlas of each image, the share of its pixels
    that one key-sized copy takes)."""
    h, w = images[0].shape[-2:]
    parts = [[] for _ in images]
    for scale in scales:
        if scale == 1.0:
            for part, image in zip(parts, images):
                part.append(image)
            continue
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        rows = positions[0] * (size[0] - 1)
        cols = positions[1] * (size[1] - 1)
        top = max(0, int(rows.min()) - margin)
        bottom = min(size[0], int(rows.max()) + 2 + margin)
        left = max(0, int(cols.min()) - margin)
        right = min(size[1], int(cols.max()) + 2 + margin)
        for part, image in zip(parts, images):
            resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=True,
                                    antialias=scale < 1.0)[0]
            part.append(resized[:, top:bottom, left:right])
    height = max(p.shape[-2] for p in parts[0])
    atlases = [torch.cat([F.pad(p[None], (0, 0, 0, height - p.shape[-2]), mode="replicate")[0] for p in part], -1)
               for part in parts]
    return atlases, (h * w) / (atlases[0].shape[-2] * atlases[0].shape[-1])


# ---- one pass -------------------------------------------------------------------------------------------------
def run_pass(frames: torch.Tensor, key_index: int, key_style: torch.Tensor, targets: Sequence[int], flows,
             settings: PropagationSettings, device=None,
             on_frame: Optional[Callable[[int], None]] = None) -> Iterator[tuple]:
    """Synthesise `targets` (consecutive frame indices walking away from `key_index`, either direction) from one
    rendered key frame. Yields (index, PassFrame). `frames` [N,H,W,3] 0..1; `key_style` [H,W,3] 0..1; `flows`
    has `pair(src, dst, device)` (VideoFlow). `on_frame(index)` is called before each frame (progress/interrupt)."""
    device = device if device is not None else key_style.device
    key_image = _chw(frames[key_index], device)
    key_stylised = _chw(key_style, device)
    h, w = key_image.shape[-2:]
    key_edges = edge_guide(key_image)
    key_positions = coordinate_image(h, w, device)
    previous_index, previous_output, positions = key_index, key_stylised, key_positions
    carried = torch.ones(h, w, dtype=torch.bool, device=device)  # positions carried from the key, never filled
    coverage = torch.ones(h, w, device=device)  # the same, soft (bilinear)
    field = torch.stack(torch.meshgrid(torch.arange(w, device=device), torch.arange(h, device=device),
                                       indexing="xy"))  # the key's own field: the identity
    for index in targets:
        if on_frame is not None:
            on_frame(index)
        flow, occlusion = flows.pair(previous_index, index, device=device)
        temporal = advect(previous_output, flow, occlusion, settings.hole_fill)
        positions = advect(positions, flow, occlusion, settings.hole_fill)
        holes = advect_holes(flow, occlusion)
        carried = (flow_warp(carried.float()[None, None], flow)[0, 0] > 0.999) & ~holes
        coverage = flow_warp(coverage[None, None], flow)[0, 0] * ~holes
        field = carry_field(field, flow) if field is not None else None
        image = _chw(frames[index], device)
        scales = search_scales(flow_scale(positions, carried), settings)
        # the key at another scale is a jump no warm search makes: that frame searches coarse to fine
        warm = settings.warm_start and len(scales) == 1 and field is not None
        style, sources, share = key_stylised, (key_image, key_edges, key_stylised, key_positions), 1.0
        if len(scales) > 1:
            (key_scaled, style, positional), share = scaled_atlas(
                (key_image, key_stylised, key_positions), scales, positions, 4 * settings.patch_size)
            sources = (key_scaled, edge_guide(key_scaled), style, positional)
        # the guides carried along the flow are made up where the flow failed: matched without them there (the
        # temporal guide where this step's flow failed, as the frame before was synthesised in full; the positional
        # guide wherever a position was ever filled, as the fill's made-up position is carried on), and the warm
        # start's field is made up at every patch that reaches this step's holes: searched over the whole key
        wide_search = F.max_pool2d(holes.float()[None, None], settings.patch_size, stride=1,
                                   padding=settings.patch_size // 2)[0, 0] > 0
        new_content = float(carried.float().mean()) < settings.new_content_share
        guides = []
        for weight, source, target, reliable in ((settings.colour_weight, sources[0], image, None),
                                                 (settings.edge_weight, sources[1], edge_guide(image), None),
                                                 (settings.temporal_weight, sources[2], temporal, ~holes),
                                                 (settings.positional_weight, sources[3], positions, carried)):
            if weight > 0:
                guides.append(patchmatch.Guide(source, target, weight, reliable))
        result = patchmatch.synthesize(
            style, guides, patch_size=settings.patch_size, pyramid_levels=settings.pyramid_levels,
            search_vote_iters=settings.search_vote_iters, patchmatch_iters=settings.patchmatch_iters,
            uniformity=settings.uniformity, stop_threshold=settings.stop_threshold,
            descriptor_size=(max(settings.descriptor_size, settings.new_content_descriptor_size) if new_content
                             else settings.descriptor_size),
            short_descriptor=carried if new_content else None, short_descriptor_size=settings.descriptor_size,
            seed=settings.seed + index, uniform_share=share, initial_field=field if warm else None,
            search_radius=settings.warm_search_radius if warm else None,
            thorough_search=~carried if new_content else None,
            wide_search=wide_search if warm else None)
        # a field into an atlas of scales means nothing to the key alone
        previous_index, previous_output, field = index, result.image, result.nnf if len(scales) == 1 else None
        patchmatch.release_freed_memory()
        yield index, PassFrame(result.image, result.error, coverage)


def _chw(image: torch.Tensor, device) -> torch.Tensor:
    return image.to(device, torch.float32).permute(2, 0, 1).contiguous()


# ---- blending -------------------------------------------------------------------------------------------------
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.950456, 1.0, 1.088754)  # D65, as OpenCV
_LAB_EPSILON = 6.0 / 29.0


def rgb_to_lab255(image: torch.Tensor) -> torch.Tensor:
    """[3,H,W] sRGB 0..1 -> CIE Lab (D65) on OpenCV's 8-bit scale (L*255/100, a+128, b+128), the scale where the
    reference's blending constants (gradient clip 100, histogram std 256/36) are defined."""
    rgb = image.float().clamp(0, 1)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(_RGB_TO_XYZ, device=image.device)
    white = torch.tensor(_WHITE, device=image.device).view(3, 1, 1)
    xyz = torch.einsum("ij,jhw->ihw", matrix, linear) / white
    f = torch.where(xyz > _LAB_EPSILON ** 3, xyz.clamp(min=1e-12) ** (1 / 3),
                    xyz / (3 * _LAB_EPSILON ** 2) + 4 / 29)
    return torch.stack(((116 * f[1] - 16) * (255 / 100), 500 * (f[0] - f[1]) + 128, 200 * (f[1] - f[2]) + 128))


def lab255_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_lab255`, clipped to 0..1."""
    fy = (lab[0] * (100 / 255) + 16) / 116
    f = torch.stack((fy + (lab[1] - 128) / 500, fy, fy - (lab[2] - 128) / 200))
    xyz = torch.where(f > _LAB_EPSILON, f ** 3, 3 * _LAB_EPSILON ** 2 * (f - 4 / 29))
    xyz = xyz * torch.tensor(_WHITE, device=lab.device).view(3, 1, 1)
    linear = torch.einsum("ij,jhw->ihw", torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, device=lab.device)), xyz)
    linear = linear.clamp(0, 1)
    return torch.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear.clamp(min=1e-12) ** (1 / 2.4) - 0.055)


def _standardise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    own_mean = x.mean(dim=(1, 2), keepdim=True)
    own_std = x.std(dim=(1, 2), keepdim=True, unbiased=False).clamp(min=1e-6)
    return (x - own_mean) / own_std * std + mean


def histogram_blend(lab_a: torch.Tensor, lab_b: torch.Tensor, lab_selected: torch.Tensor,
                    weight_b) -> torch.Tensor:
    """Heitz-Neyret style histogram-preserving blend as the reference does it: both passes standardised (mean 128,
    std 256/36), mixed with weights (1-w, w) (`weight_b`: a number or a per-pixel [H,W] map), re-centred with the
    reference's fixed 0.5 divisor, then given the mean/std of the min-error composite per channel, clipped to the
    8-bit Lab range (kept in float)."""
    centre = torch.tensor(128.0, device=lab_a.device)
    spread = torch.tensor(256.0 / 36.0, device=lab_a.device)
    mixed = ((_standardise(lab_a, centre, spread) * (1.0 - weight_b) + _standardise(lab_b, centre, spread) * weight_b
              - 128.0) / 0.5 + 128.0)
    target_mean = lab_selected.mean(dim=(1, 2), keepdim=True)
    target_std = lab_selected.std(dim=(1, 2), keepdim=True, unbiased=False)
    return _standardise(mixed, target_mean, target_std).clamp(0.0, 255.0)


def _dct_matrix(n: int, device) -> torch.Tensor:
    """Orthonormal DCT-II matrix (rows = frequencies): diagonalises the Neumann Laplacian."""
    k = torch.arange(n, device=device, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, device=device, dtype=torch.float64).view(1, -1)
    matrix = torch.cos(torch.pi * (i + 0.5) * k / n) * (2.0 / n) ** 0.5
    matrix[0] /= 2.0 ** 0.5
    return matrix.float()


def screened_poisson(data: torch.Tensor, grad_x: torch.Tensor, grad_y: torch.Tensor,
                     gradient_weights: Sequence[float]) -> torch.Tensor:
    """Exact minimiser of  sum_c g_c^2 |grad x_c - (gx_c, gy_c)|^2 + |x_c - data_c|^2  per channel, with forward
    differences and free (Neumann) borders: (I + g^2 L) x = data + g^2 div*, solved in the DCT basis (two small
    matrix products per side, any device). `grad_x` [C,H,W-1], `grad_y` [C,H-1,W]."""
    channels, h, w = data.shape
    weights = torch.tensor(gradient_weights, device=data.device, dtype=torch.float32).view(-1, 1, 1) ** 2
    # G^T applied to the target gradients (negative divergence with the forward-difference adjoint)
    adjoint = torch.zeros_like(data)
    adjoint[:, :, :-1] -= grad_x
    adjoint[:, :, 1:] += grad_x
    adjoint[:, :-1, :] -= grad_y
    adjoint[:, 1:, :] += grad_y
    rhs = data + weights * adjoint
    dct_h, dct_w = _dct_matrix(h, data.device), _dct_matrix(w, data.device)
    eig_h = 2.0 - 2.0 * torch.cos(torch.pi * torch.arange(h, device=data.device) / h)
    eig_w = 2.0 - 2.0 * torch.cos(torch.pi * torch.arange(w, device=data.device) / w)
    spectrum = dct_h @ rhs @ dct_w.t()
    spectrum = spectrum / (1.0 + weights * (eig_h.view(1, h, 1) + eig_w.view(1, 1, w)))
    return dct_h.t() @ spectrum @ dct_w


def error_weights(error_a: torch.Tensor, error_b: torch.Tensor, weight_b: float,
                  coverage_a: Optional[torch.Tensor] = None, coverage_b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-pixel weight [H,W] of pass B: the temporal weights (1-w, w) each divided by its pass's patch error
    (inverse-error weighting), normalised. Where a pass matched its guides worse it counts less, smoothly, instead of
    the reference's one weight per frame; equal errors give w, and w = 0 or 1 stays exact (a single pass). Measured
    on bench/propagator_bench.py (11 frames, same passes): +0.31 dB on man, +0.08 on car, +0.23 on man:3, +0.58 on
    car:3 over the per-frame weight; no extra search, a few element-wise operations per frame."""
    share_a = (1.0 - weight_b) * error_b.float().clamp(min=1e-6)  # errors are SSDs on 0..255: 1e-6 is nothing
    share_b = weight_b * error_a.float().clamp(min=1e-6)
    if coverage_a is not None and coverage_b is not None:
        share_a = share_a * coverage_a.float().clamp(min=MIN_COVERAGE)
        share_b = share_b * coverage_b.float().clamp(min=MIN_COVERAGE)
    return share_b / (share_a + share_b)


def blend_frame(forward: PassFrame, backward: PassFrame, weight_b: float, previous_selection: Optional[torch.Tensor],
                flow: Optional[torch.Tensor], settings: PropagationSettings) -> tuple:
    """Temporal-aware blending of one in-between frame (reference §3.3). Returns (image [3,H,W], selection [H,W]
    bool, True = taken from the backward pass). `weight_b` = the backward pass's weight; `previous_selection` is the
    previous frame's mask, carried along `flow` (laying the previous frame onto this one) and OR-ed in."""
    weight_a = 1.0 - weight_b
    coverages = (forward.coverage, backward.coverage) if settings.coverage_weights else (None, None)
    if weight_b <= 0.0:
        selection = torch.zeros_like(forward.error, dtype=torch.bool)
    elif weight_a <= 0.0:
        selection = torch.ones_like(forward.error, dtype=torch.bool)
    elif coverages[0] is not None and coverages[1] is not None:
        selection = (weight_b * forward.error * coverages[1].clamp(min=MIN_COVERAGE)
                     >= weight_a * backward.error * coverages[0].clamp(min=MIN_COVERAGE))
    else:
        selection = weight_b * forward.error >= weight_a * backward.error
    if previous_selection is not None:
        carried = flow_warp(previous_selection.float()[None, None], flow, mode="nearest")[0, 0] > 0.5
        selection = selection | carried
    composite = torch.where(selection[None], backward.image, forward.image)
    pixel_weight_b = error_weights(forward.error, backward.error, weight_b, *coverages)
    if not settings.histogram_blend:
        blended = forward.image * (1.0 - pixel_weight_b) + backward.image * pixel_weight_b
        return blended, selection
    lab_a, lab_b = rgb_to_lab255(forward.image), rgb_to_lab255(backward.image)
    blended_lab = histogram_blend(lab_a, lab_b, rgb_to_lab255(composite), pixel_weight_b)
    if settings.poisson:
        grad_x = torch.where(selection[None, :, :-1], lab_b[:, :, 1:] - lab_b[:, :, :-1],
                             lab_a[:, :, 1:] - lab_a[:, :, :-1])
        grad_y = torch.where(selection[None, :-1, :], lab_b[:, 1:, :] - lab_b[:, :-1, :],
                             lab_a[:, 1:, :] - lab_a[:, :-1, :])
        blended_lab = screened_poisson(blended_lab, grad_x.clamp(-POISSON_GRADIENT_CLIP, POISSON_GRADIENT_CLIP),
                                       grad_y.clamp(-POISSON_GRADIENT_CLIP, POISSON_GRADIENT_CLIP),
                                       POISSON_GRADIENT_WEIGHTS).clamp(0.0, 255.0)
    return lab255_to_rgb(blended_lab), selection


def blend_weight(offset: int, interval: int) -> float:
    """The backward pass's weight for the frame `offset` (1..interval-1) after key a: the reference's
    (offset-1)/(interval-1), which is 0 for the first in-between frame."""
    return (offset - 1) / (interval - 1)


# ---- the whole clip -------------------------------------------------------------------------------------------
def check_inputs(frames: torch.Tensor, key_indices: Sequence[int], key_styles: torch.Tensor, flows) -> None:
    """Every mismatch the propagation would trip over later, reported before any work."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected an IMAGE batch [N,H,W,3], got shape {tuple(frames.shape)}")
    if key_styles.ndim != 4 or key_styles.shape[-1] != 3:
        raise ValueError(f"key frame images: expected an IMAGE batch [K,H,W,3], got {tuple(key_styles.shape)}")
    count = frames.shape[0]
    if len(key_indices) != key_styles.shape[0]:
        raise ValueError(f"key frames: {len(key_indices)} key frame indices but {key_styles.shape[0]} key frame "
                         f"images; render exactly one image per selected key frame, in index order")
    if len(key_indices) == 0:
        raise ValueError("key frames: no key frame given; at least one rendered key frame is needed")
    bad = [i for i in key_indices if not 0 <= int(i) < count]
    if bad:
        raise ValueError(f"key frames: indices {bad} are outside the clip of {count} frames (0..{count - 1}); "
                         f"pick the key frames from these same frames")
    if any(b <= a for a, b in zip(key_indices, key_indices[1:])):
        raise ValueError(f"key frames: indices must be strictly increasing, got {list(key_indices)}")
    if tuple(key_styles.shape[1:3]) != tuple(frames.shape[1:3]):
        raise ValueError(f"key frame images are {tuple(key_styles.shape[2:0:-1])} (WxH) but the frames are "
                         f"{tuple(frames.shape[2:0:-1])}; resize the key frames to the video's size")
    flow_shape = (getattr(flows, "num_frames", None), getattr(flows, "height", None), getattr(flows, "width", None))
    if flow_shape != (count, frames.shape[1], frames.shape[2]):
        raise ValueError(f"flow: computed for {flow_shape[0]} frames of {flow_shape[2]}x{flow_shape[1]}, but the "
                         f"video has {count} frames of {frames.shape[2]}x{frames.shape[1]}; compute the flow from "
                         f"these same frames")


class PassJob(NamedTuple):
    """One pass: `kind` "forward"/"backward" (the two passes of `interval`, forward first) or "single" (frames
    outside a shot's keys); it starts at key frame `key` (its position `slot` among the keys) and synthesises
    `targets` in order, each from the one before it."""
    kind: str
    slot: int
    key: int
    targets: range
    interval: Optional[tuple]


def propagation_plan(num_frames: int, key_indices: Sequence[int], cuts: Sequence[int] = ()) -> list:
    """Every pass the clip needs, shot by shot: inside a shot, both passes of each interval between consecutive
    keys, and a single pass from its first key back to the shot's start and from its last key on to its end. No
    pass starts or walks across a cut (the first frame of a shot), so no guide, flow pair or blend mixes shots.
    Without cuts the whole clip is one shot. Passes with no target are left out."""
    key_indices = [int(i) for i in key_indices]
    bounds = [0, *(int(c) for c in cuts), num_frames]
    jobs = []
    for start, stop in zip(bounds, bounds[1:]):
        slots = [slot for slot, key in enumerate(key_indices) if start <= key < stop]
        if not slots:
            raise ValueError(f"shot of frames {start}..{stop - 1} has no key frame; every shot needs one (the Key "
                             f"Frame Picker's split_at_cuts keys both sides of every cut)")
        first, last = key_indices[slots[0]], key_indices[slots[-1]]
        jobs.append(PassJob("single", slots[0], first, range(first - 1, start - 1, -1), None))
        for slot in slots[:-1]:
            a, b = key_indices[slot], key_indices[slot + 1]
            jobs += [PassJob("forward", slot, a, range(a + 1, b), (a, b)),
                     PassJob("backward", slot + 1, b, range(b - 1, a, -1), (a, b))]
        jobs.append(PassJob("single", slots[-1], last, range(last + 1, stop), None))
    return [job for job in jobs if len(job.targets)]


def pass_frame_count(num_frames: int, key_indices: Sequence[int], cuts: Sequence[int] = ()) -> int:
    """How many single-pass syntheses the clip needs (two per in-between frame, one outside the keys)."""
    return sum(len(job.targets) for job in propagation_plan(num_frames, key_indices, cuts))


def cpu_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


PARALLEL_PASSES_MAX_PIXELS = 1280 * 720


def default_workers(height: int, width: int, device: torch.device) -> int:
    """Passes side by side on the CPU up to 720p frames, one thread each; above, one pass at a time with its
    operations threaded. A 1080p pass holds about 1 GiB and the allocator keeps each worker's high-water mark, so
    two side by side peaked at 4.3 GiB where one peaks at 2.7 GiB; its tensors are big enough to split well over
    threads (a 5-frame interval took 44 s against 47 s with two passes side by side, 2 cores, quiet)."""
    if device.type != "cpu" or height * width > PARALLEL_PASSES_MAX_PIXELS:
        return 1
    return cpu_workers()


def pass_threads(height: int, width: int):
    """The thread setting a lone pass of this frame size runs with on the CPU: one thread where passes would run
    side by side (see `single_threaded_ops`), the process's setting above 720p (see `default_workers`)."""
    parallel = default_workers(height, width, torch.device("cpu")) > 1
    return single_threaded_ops() if parallel else nullcontext()


@contextmanager
def single_threaded_ops():
    """One intra-op thread for the calling thread while passes run side by side. PatchMatch is thousands of small
    tensor operations: split across threads, each ends in a barrier, and on a busy machine every barrier waits for a
    descheduled thread (13x slower with two other busy processes on 2 cores). Whole passes in parallel share none."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _InlineRunner:
    """One worker: each pass runs in the calling thread as it is submitted."""

    @staticmethod
    def submit(fn, *args) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as error:  # noqa: BLE001 - handed to whoever reads the result, as a pool would
            future.set_exception(error)
        return future


@contextmanager
def _pass_runner(workers: int):
    if workers <= 1:
        yield _InlineRunner()
        return
    with single_threaded_ops():
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rerender-pass",
                                  initializer=torch.set_num_threads, initargs=(1,))
        try:
            yield pool
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class _Stopped(Exception):
    """Raised in a pass once another pass has failed or been interrupted, so that all of them stop."""


def propagate_video(frames: torch.Tensor, key_indices: Sequence[int], key_styles: torch.Tensor, flows,
                    settings: PropagationSettings = PropagationSettings(), device=None,
                    on_frame: Optional[Callable[[int], None]] = None, workers: Optional[int] = None,
                    cuts: Sequence[int] = ()) -> torch.Tensor:
    """The full video [N,H,W,3] (CPU, 0..1): key frames copied unchanged, the others propagated and blended,
    each shot (frames between `cuts`, see `propagation_plan`) from its own key frames only.
    `on_frame(done)` runs before every single-pass synthesis with the number already done (progress and
    interruption: it may raise, and then all work stops); there are `pass_frame_count` of them, called one at a
    time and in order, from whichever thread runs that synthesis.

    Passes are independent: on the CPU up to `workers` of them (default: `default_workers`) run side by side,
    each single-threaded, and the result does not depend on `workers`. Memory holds the passes in flight and one
    interval's forward pass waiting for its backward pass. On a GPU passes run one after another."""
    key_indices = [int(i) for i in key_indices]
    check_inputs(frames, key_indices, key_styles, flows)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if workers is None:
        workers = default_workers(frames.shape[1], frames.shape[2], device)
    output = frames.detach().to("cpu", torch.float32).clone()
    for index, style in zip(key_indices, key_styles):
        output[index] = style.to("cpu", torch.float32)

    progress_lock, stop = threading.Lock(), threading.Event()
    done = 0

    def before_synthesis(_index: int) -> None:
        nonlocal done
        with progress_lock:
            if stop.is_set():
                raise _Stopped
            if on_frame is not None:
                on_frame(done)
            done += 1

    def store(index: int, image: torch.Tensor) -> None:
        output[index] = image.clamp(0.0, 1.0).permute(1, 2, 0).cpu()

    # a forward pass is followed by its backward pass
    pending = iter(propagation_plan(frames.shape[0], key_indices, cuts))

    def run(job: PassJob) -> dict:
        return dict(run_pass(frames, job.key, key_styles[job.slot], job.targets, flows, settings, device,
                             before_synthesis))

    with _pass_runner(workers) as runner:
        in_flight = deque()

        def submit_next() -> None:
            job = next(pending, None)
            if job is not None:
                in_flight.append((job, runner.submit(run, job)))

        try:
            for _ in range(max(workers, 1)):
                submit_next()
            forward = None
            while in_flight:
                (kind, _, _, _, interval), future = in_flight.popleft()
                passes = future.result()
                submit_next()
                if kind == "single":
                    for index, result in passes.items():
                        store(index, result.image)
                elif kind == "forward":
                    forward = passes
                else:
                    _blend_interval(forward, passes, *interval, flows, settings, device, store)
        except BaseException:
            stop.set()
            raise
    return output


def _blend_interval(forward: dict, backward: dict, a: int, b: int, flows, settings: PropagationSettings, device,
                    store: Callable) -> None:
    selection = None
    for index in range(a + 1, b):
        flow = None if selection is None else flows.pair(index - 1, index, device=device)[0]
        image, selection = blend_frame(forward.pop(index), backward.pop(index), blend_weight(index - a, b - a),
                                       selection, flow, settings)
        store(index, image)
