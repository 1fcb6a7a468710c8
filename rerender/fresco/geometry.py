"""FRESCO key frame translation (reference §4.3, §4.4, §4.7), free of the host: batching with shared anchors,
per-batch flow geometry (cyclic flows, unique-region masks, trajectories) and background smoothing.

The attention guidance lives in `attention`, the feature optimisation in `optimize`.

Flow conventions follow `warp` / `flow`: within a batch of N frames, pair k is (frame k -> frame k+1 mod N), the
last one (N-1 -> 0) being the wrap pair. `backward[k]` lies on frame k+1's grid and lays frame k onto it
(`flow_warp(x[k], backward[k]) ~ x[k+1]`); `forward[k]` lies on frame k's grid and lays frame k+1 onto it. The
occlusions mark, with 1, pixels of the grid a flow lies on that have no reliable source.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..flow import PHOTOMETRIC_THRESHOLD, photometric_occlusion
from ..warp import flow_warp, resize_flow

MIN_BATCH_SIZE = 3
MIN_NEW_KEYS_IN_LAST_BATCH = 3  # the reference's short-last-batch rule
SMOOTHING_OCCLUSION_DILATION = 13  # §4.7: occlusions dilated by a 13x13 box at full image resolution
FOREGROUND_DILATION = 7  # §4.4.5: the reference grows its saliency map by a 7x7 box


# ------------------------------------------------------------------------------------ batching with shared anchors

@dataclass(frozen=True)
class AnchorSlot:
    """Slot `slot` of a batch takes, at every step, the latent recorded at slot `source_slot` of batch
    `source_batch` (before that batch's model call of the same step)."""
    slot: int
    source_batch: int
    source_slot: int


@dataclass(frozen=True)
class KeyFrameBatch:
    """One batch rendered jointly. `frames`: clip frame indices in batch order (anchors first); `anchors`: the
    slots overwritten with recorded latents; `record`: the slots whose latents the next batch reads (record them
    at every step); the other slots are this batch's new key frames, its results."""
    frames: Tuple[int, ...]
    anchors: Tuple[AnchorSlot, ...] = ()
    record: Tuple[int, ...] = ()

    @property
    def new_slots(self) -> Tuple[int, ...]:
        anchored = {anchor.slot for anchor in self.anchors}
        return tuple(slot for slot in range(len(self.frames)) if slot not in anchored)


def validate_batching(keyframes: Sequence[int], batch_size: int) -> None:
    if batch_size < MIN_BATCH_SIZE:
        raise ValueError(f"batch_size: FRESCO needs at least {MIN_BATCH_SIZE} key frames per batch (two shared "
                         f"anchors and one new key frame), got {batch_size}; raise batch_size.")
    keys = list(keyframes)
    if len(keys) < 2:
        raise ValueError(f"keyframes: FRESCO renders key frames jointly and needs at least 2, got {len(keys)}; "
                         f"pick more key frames (a smaller interval) or render the frame with KSampler.")
    for a, b in zip(keys, keys[1:]):
        if b <= a:
            raise ValueError(f"keyframes: the indices must be strictly increasing, but {b} follows {a}.")
    if keys[0] < 0:
        raise ValueError(f"keyframes: index {keys[0]} is negative.")


def plan_batches(keyframes: Sequence[int], batch_size: int) -> List[KeyFrameBatch]:
    """FRESCO's batches (§4.3): batch 1 = the first `batch_size` keys; every later batch = the global first key and
    the previous batch's last key (the shared anchors) + `batch_size - 2` new keys. When the last batch would have
    fewer than 3 new keys, keys move to it from the end of the previous batch (as many as that batch has), and a
    batch emptied that way is dropped; the previous batch then ends earlier, so the anchors follow it. As in the
    reference, a last batch can thereby hold up to 5 frames when batch_size < 5, and with batch_size 3 and 4 keys
    batch 1 keeps only the first key, which then fills both anchor slots."""
    validate_batching(keyframes, batch_size)
    keys = [int(k) for k in keyframes]
    groups = [keys[:batch_size]]
    groups += [keys[i:i + batch_size - 2] for i in range(batch_size, len(keys), batch_size - 2)]
    if len(groups) > 1 and len(groups[-1]) < MIN_NEW_KEYS_IN_LAST_BATCH:
        moved = min(MIN_NEW_KEYS_IN_LAST_BATCH - len(groups[-1]), len(groups[-2]))
        groups[-1] = groups[-2][len(groups[-2]) - moved:] + groups[-1]
        groups[-2] = groups[-2][:len(groups[-2]) - moved]
        if not groups[-2]:
            del groups[-2]

    batches = []
    for index, group in enumerate(groups):
        if index == 0:
            frames, anchors = tuple(group), ()
        else:
            previous = batches[-1]
            frames = (keys[0], previous.frames[-1], *group)
            anchors = (AnchorSlot(0, index - 1, 0), AnchorSlot(1, index - 1, len(previous.frames) - 1))
        record = (0, len(frames) - 1) if index + 1 < len(groups) else ()
        batches.append(KeyFrameBatch(frames, anchors, tuple(sorted(set(record)))))
    return batches


class AnchorLatents:
    """The shared-anchor latents between consecutive batches, keyed by the step of the full schedule (never by
    call order). Before each model call of batch b at step i: `apply(batch, step, x)`, which overwrites b's anchor
    slots with what batch b-1 recorded at step i and records b's `record` slots for batch b+1 (after the
    overwrite, so slot 0 carries batch 1's first key all the way). `x` is [N, ...] (the batch's latents, one
    chunk); returns a new tensor. Recorded latents are stored detached, on their own device."""

    def __init__(self):
        self._previous: Dict[int, Dict[int, torch.Tensor]] = {}  # step -> {slot: latent} of the previous batch
        self._current: Dict[int, Dict[int, torch.Tensor]] = {}
        self.misses = 0

    def apply(self, batch: KeyFrameBatch, step: int, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(batch.frames):
            raise ValueError(f"shared anchors: {x.shape[0]} latents for a batch of {len(batch.frames)} frames.")
        if batch.anchors:
            recorded = self._previous.get(step)
            if recorded is None:
                self.misses += 1  # a noise level the previous batch never visited: leave the anchors free
            else:
                x = x.clone()
                for anchor in batch.anchors:
                    x[anchor.slot] = recorded[anchor.source_slot].to(x.device, x.dtype)
        if batch.record:
            self._current[step] = {slot: x[slot].detach().clone() for slot in batch.record}
        return x

    def finish_batch(self) -> None:
        """After a batch: what it recorded becomes what the next batch reads."""
        self._previous, self._current = self._current, {}

    def clear(self) -> None:
        self._previous.clear()
        self._current.clear()
        self.misses = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in (self._previous, self._current)
                   for slots in store.values() for t in slots.values())


# ---------------------------------------------------------------------------------------- per-batch flow geometry

@dataclass
class CyclicFlows:
    """Flows and occlusions of the N cyclic pairs of a batch (module docstring for the conventions), [N,2,H,W]
    and [N,1,H,W] float (occlusion 0/1). `resized(size)` gives them on a feature grid, memoised."""
    backward: torch.Tensor
    backward_occlusion: torch.Tensor
    forward: torch.Tensor
    forward_occlusion: torch.Tensor
    _resized: Dict[Tuple[int, int], "CyclicFlows"] = field(default_factory=dict, repr=False)

    @property
    def frames(self) -> int:
        return self.backward.shape[0]

    @property
    def size(self) -> Tuple[int, int]:
        return tuple(self.backward.shape[-2:])

    def resized(self, size: Tuple[int, int]) -> "CyclicFlows":
        """On an (h, w) grid: flows resized with their vectors scaled, occlusions max-pooled (conservative, as the
        reference does for the feature losses and smoothing)."""
        size = tuple(int(s) for s in size)
        if size == self.size:
            return self
        if size not in self._resized:
            self._resized[size] = CyclicFlows(resize_flow(self.backward, size),
                                              F.adaptive_max_pool2d(self.backward_occlusion, size),
                                              resize_flow(self.forward, size),
                                              F.adaptive_max_pool2d(self.forward_occlusion, size))
        return self._resized[size]

    def nbytes(self) -> int:
        tensors = [self.backward, self.backward_occlusion, self.forward, self.forward_occlusion]
        own = sum(t.numel() * t.element_size() for t in tensors)
        return own + sum(flows.nbytes() for flows in self._resized.values())


def cyclic_flows(pair: Callable[[int, int], Tuple[torch.Tensor, torch.Tensor]], frames: Sequence[int],
                 images: Optional[torch.Tensor] = None, photometric_threshold: Optional[float] = PHOTOMETRIC_THRESHOLD,
                 device=None) -> CyclicFlows:
    """Flows of the cyclic pairs of a batch from the flow stage (§4.4.1). `pair(src, dst)` -> (flow laying frame
    src onto frame dst, occlusion of dst's pixels), as `flow.VideoFlow.pair`; `frames` are the batch's clip frame
    indices. With `images` ([N,3,H,W] 0..1, the batch's frames) FRESCO's photometric test is added to the
    forward-backward check: a pixel whose warped colour differs by more than `photometric_threshold` (mean RGB)
    is occluded too."""
    frames = list(frames)
    n = len(frames)
    backward, backward_occlusion, forward, forward_occlusion = [], [], [], []
    for k in range(n):
        src, dst = frames[k], frames[(k + 1) % n]
        flow, occlusion = pair(src, dst)
        backward.append(flow.to(device, torch.float32))
        backward_occlusion.append(occlusion.to(device, torch.float32))
        flow, occlusion = pair(dst, src)
        forward.append(flow.to(device, torch.float32))
        forward_occlusion.append(occlusion.to(device, torch.float32))
    flows = CyclicFlows(torch.cat(backward), torch.cat(backward_occlusion), torch.cat(forward),
                        torch.cat(forward_occlusion))
    if images is not None and photometric_threshold is not None:
        images = images.to(flows.backward.device, torch.float32)
        if images.shape[0] != n or tuple(images.shape[-2:]) != flows.size:
            raise ValueError(f"images: {tuple(images.shape)} do not match the batch's {n} frames of flow at "
                             f"{flows.size}; pass the batch's own frames.")
        following = images.roll(-1, dims=0)  # frame k+1 (mod N) at row k
        flows.backward_occlusion = torch.maximum(flows.backward_occlusion, photometric_occlusion(
            following, images, flows.backward, photometric_threshold).float())
        flows.forward_occlusion = torch.maximum(flows.forward_occlusion, photometric_occlusion(
            images, following, flows.forward, photometric_threshold).float())
    return flows


def unique_region_masks(flows: CyclicFlows,
                        resolutions: Sequence[Tuple[int, int]]) -> Dict[Tuple[int, int], torch.Tensor]:
    """Tokens of efficient cross-frame attention per (h, w) token grid (§4.4.2), [N, h*w] bool: all of frame 0,
    and for frame k >= 1 the tokens not visible in frame k-1 (bilinear-downsampled backward occlusion of pair
    (k-1 -> k) above 0.5). The wrap pair is not used."""
    masks = {}
    for size in resolutions:
        size = (int(size[0]), int(size[1]))
        occlusion = F.interpolate(flows.backward_occlusion[:-1], size=size, mode="bilinear", align_corners=False)
        first = torch.ones(1, size[0] * size[1], dtype=torch.bool, device=occlusion.device)
        masks[size] = torch.cat([first, (occlusion > 0.5).flatten(1)])
    return masks


@dataclass
class Trajectories:
    """Token trajectories through a batch on one (h, w) grid (§4.4.3). `forward[k, j]`: the token of frame k on
    track j (track j starts at token j of frame 0); `backward[k, t]`: the track of token t of frame k (each row of
    both is a permutation); `allowed[j, a, b]`: frames a and b of track j may attend to each other (False across a
    break, where the track lost its link and continued through a filler token)."""
    forward: torch.Tensor
    backward: torch.Tensor
    allowed: torch.Tensor
    size: Tuple[int, int]

    @property
    def frames(self) -> int:
        return self.forward.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.forward, self.backward, self.allowed))


def _link_tokens(flow: torch.Tensor, occluded: torch.Tensor, source_colour: torch.Tensor,
                 target_colour: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One pair on a token grid: for each target token, its source token (a permutation) and whether that is a real
    link. A target token links to round(p + flow(p)) when in bounds and not occluded; when several claim one source,
    the one closest in colour (MSE) wins (lowest index on ties); targets left unlinked take the unclaimed sources in
    ascending order. `flow` [2,h,w], `occluded` [h,w] bool, colours [3,h,w]."""
    h, w = flow.shape[-2:]
    tokens = h * w
    ys, xs = torch.meshgrid(torch.arange(h, device=flow.device), torch.arange(w, device=flow.device), indexing="ij")
    sx = torch.round(xs + flow[0]).long().flatten()
    sy = torch.round(ys + flow[1]).long().flatten()
    valid = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h) & ~occluded.flatten()
    source = torch.where(valid, sy * w + sx, 0)
    index = torch.arange(tokens, device=flow.device)
    cost = (target_colour.flatten(1) - source_colour.flatten(1)[:, source]).pow(2).mean(0)
    cost = torch.where(valid, cost, torch.inf)
    best = torch.full((tokens,), torch.inf, device=flow.device).scatter_reduce(0, source, cost, "amin")
    candidate = valid & (cost == best[source])
    winner = torch.full((tokens,), tokens, device=flow.device).scatter_reduce(
        0, source, torch.where(candidate, index, tokens), "amin")
    linked = candidate & (winner[source] == index)
    claimed = torch.zeros(tokens, dtype=torch.bool, device=flow.device)
    claimed[source[linked]] = True
    source = torch.where(linked, source, -1)
    source[~linked] = (~claimed).nonzero().squeeze(1)
    return source, linked


def trajectories(flows: CyclicFlows, images: torch.Tensor, size: Tuple[int, int]) -> Trajectories:
    """Trajectories on an (h, w) token grid from the consecutive pairs of a batch (the wrap pair is not used):
    flows bilinear-downsampled with their vectors, occlusion bilinear-downsampled and thresholded at 0.5, colours of
    `images` ([N,3,H,W], the batch's frames) bilinear-downsampled for the collision test. Vectorised per pair."""
    size = (int(size[0]), int(size[1]))
    n = flows.frames
    device = flows.backward.device
    flow = resize_flow(flows.backward[:-1], size)
    occluded = F.interpolate(flows.backward_occlusion[:-1], size=size, mode="bilinear", align_corners=False) > 0.5
    colour = F.interpolate(images.to(device, torch.float32), size=size, mode="bilinear", align_corners=False)
    tokens = size[0] * size[1]
    identity = torch.arange(tokens, device=device)
    forward, segment = [identity], [torch.zeros(tokens, dtype=torch.long, device=device)]
    for k in range(n - 1):
        source, linked = _link_tokens(flow[k], occluded[k, 0], colour[k], colour[k + 1])
        following = torch.argsort(source)  # frame-k token -> the frame-(k+1) token that continues it
        forward.append(following[forward[-1]])
        segment.append(segment[-1] + (~linked[forward[-1]]).long())
    forward = torch.stack(forward)
    segment = torch.stack(segment, dim=1)  # [tracks, N]
    return Trajectories(forward, torch.argsort(forward, dim=1), segment[:, :, None] == segment[:, None, :], size)


# ------------------------------------------------------------------------------------------ background smoothing

def background_from_foreground(mask: torch.Tensor, frames: int, size: Tuple[int, int],
                               dilation: int = FOREGROUND_DILATION) -> torch.Tensor:
    """[N,1,H,W] background weight (1 = background) from a MASK ([1 or N, H', W'], 1 = foreground): resized
    bilinearly to `size`, the foreground grown by a `dilation` x `dilation` max filter (1 = none) so that its
    rim is not smoothed into the background, as the reference grows its saliency map."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"mask: expected a MASK batch [N,H,W], got {tuple(mask.shape)}.")
    if mask.shape[0] not in (1, frames):
        raise ValueError(f"mask: {mask.shape[0]} masks for {frames} frames; give one mask per frame or one for all.")
    foreground = F.interpolate(mask[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)
    if dilation > 1:
        foreground = F.max_pool2d(foreground, dilation, stride=1, padding=dilation // 2)
    return (1.0 - foreground.clamp(0.0, 1.0)).expand(frames, -1, -1, -1)


def smooth_background(x: torch.Tensor, flows: CyclicFlows, background: torch.Tensor) -> torch.Tensor:
    """Background smoothing (§4.7) of `x` [chunks*N, C, h, w] (features, or images at the flows' resolution):
    within each chunk, sequentially for k = 0..N-2, x[k+1] <- (1-m) x[k+1] + m warp(x[k]) with
    m = (1 - occ_bwd[k]) bg[k+1] warp(bg[k]), so the static background flows from frame 0 through the batch;
    then the last frame is blended with frame 0 through the wrap pair. `background` [N,1,H',W'] (1 = background)
    is resized bilinearly; occlusions are max-pooled to x, and at full resolution dilated by a 13x13 box."""
    n = flows.frames
    if x.shape[0] % n:
        raise ValueError(f"background smoothing: {x.shape[0]} samples are not whole chunks of the batch's {n} frames.")
    size = tuple(x.shape[-2:])
    geometry = flows.resized(size)
    backward_occlusion, forward_occlusion = geometry.backward_occlusion, geometry.forward_occlusion
    if size == flows.size:
        pad = SMOOTHING_OCCLUSION_DILATION // 2
        backward_occlusion = F.max_pool2d(backward_occlusion, SMOOTHING_OCCLUSION_DILATION, stride=1, padding=pad)
        forward_occlusion = F.max_pool2d(forward_occlusion, SMOOTHING_OCCLUSION_DILATION, stride=1, padding=pad)
    bg = F.interpolate(background.float().to(x.device), size=size, mode="bilinear", align_corners=False)
    chunks = x.reshape(-1, n, *x.shape[1:]).float().clone()
    for k in range(n - 1):
        flow = geometry.backward[k:k + 1]
        weight = (1 - backward_occlusion[k]) * bg[k + 1] * flow_warp(bg[k:k + 1], flow)[0]
        chunks[:, k + 1] = torch.lerp(chunks[:, k + 1], flow_warp(chunks[:, k], flow), weight)
    flow = geometry.forward[n - 1:n]
    weight = (1 - forward_occlusion[n - 1]) * bg[n - 1] * flow_warp(bg[:1], flow)[0]
    chunks[:, n - 1] = torch.lerp(chunks[:, n - 1], flow_warp(chunks[:, 0], flow), weight)
    return chunks.reshape(x.shape).to(x.dtype)
