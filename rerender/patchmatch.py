"""Guided patch-based synthesis (EbSynth, reference §3.1) in pure torch: any device, no compiled code.

EbSynth synthesises a target image from a source style image so that every target patch resembles a source patch
in the style *and* in a set of guide channels (colour, edges, ...), each with a weight. It alternates PatchMatch
(nearest-neighbour field search) with voting (each pixel = mean of the overlapping source patches), coarse to fine
over a pyramid, with a uniformity term that penalises over-used source patches. The reference calls it with patch
5, 12 search-vote and 6 PatchMatch iterations, uniformity 3500, stop threshold 5, and uses its per-pixel patch error.

Here everything runs in parallel over pixels, the way EbSynth's CUDA backend does: propagation is a jump flood
(neighbours at distance 4, 2, 1), random search tries one candidate per radius, the stop threshold freezes pixels
whose vote stopped changing (only the still-moving ones are searched: the main saving on a CPU). Differences from
EbSynth, each measured on the propagation bench:
- during the search, patches are compared through `descriptor_size` PCA components of the weighted 5x5xC patch
  (one basis per synthesis, from the source). 8 dims were both faster and closer to the ground truth than 16, 48 or
  the exact distance (~+1 dB on a 10-frame pass: fewer dims favour coherent, structure-following matches); some
  target pixels may compare through more components than others (`short_descriptor`: the propagator gives 24 to
  content new to the key, 8 to the rest). The error map reported is the exact weighted SSD of the final field;
- a guide may say where its target is known (`Guide.reliable`); a target patch centred elsewhere is compared
  without it (EbSynth has one weight per guide for the whole image, so a guide filled in where the flow failed
  still pulls the match there);
- given an `initial_field` (the propagator's previous frame carried along the flow), the search is warm-started:
  half and full resolution only, from that field, with a capped random-search radius (except at the pixels marked
  `wide_search`, where the field carried is made up) and at most 3 PatchMatch iterations a round by default
  (the pixels marked `thorough_search` then go on for all of them: the propagator marks content new to the key);
- where a target patch is compared without some guides, the guides it keeps take their weight, so that the guides
  as a whole pull as hard against the style term as elsewhere;
- patches may be centred anywhere, repeating edge pixels in the source as in the target, so identical images give
  the identity field up to the border; the uniformity term is normalised by the coverage a uniform use gives at
  each position, so border patches do not look unused.
Values are handled on a 0..255 scale internally so that EbSynth's uniformity and stop threshold keep their meaning.
"""
import ctypes
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

EBSYNTH_SEARCH_VOTE_ITERS = 12  # as the reference calls EbSynth
EBSYNTH_PATCHMATCH_ITERS = 6
EBSYNTH_UNIFORMITY = 3500.0
EBSYNTH_STOP_THRESHOLD = 5
EBSYNTH_PATCH_SIZE = 5
PROPAGATION_JUMPS = (4, 2, 1)  # EbSynth CUDA's parallel propagation distances
DEFAULT_DESCRIPTOR_SIZE = 8
# A warm start searches at half resolution, then full: on the bench's man clip the full level alone lost 0.08-0.10 dB
# against the cold pyramid search, the two levels none, for ~25% more time than the full level alone.
WARM_LEVELS = 2
# ... with at most 3 PatchMatch iterations a round: it starts next to the answer, and the 4th to 6th found nothing
# more (within 0.01 dB of 6 on man, man:3, car:5 and car:zoom3; 1.5-1.6x less time per frame on man and car:5).
WARM_PATCHMATCH_ITERS = 3


@dataclass(frozen=True)
class Guide:
    """One guide pair: `source` [C,Hs,Ws] aligned with the style, `target` [C,Ht,Wt]; values in 0..1. The weight is
    split evenly over the channels (EbSynth's convention). `reliable` ([Ht,Wt] bool, optional): where the target
    guide is known; a target patch centred elsewhere is matched without this guide (its term is dropped, not fed
    a made-up value), e.g. a guide carried along the flow where the flow failed. The error map still counts it, so
    the propagator's blend keeps trusting such a pass less there."""
    source: torch.Tensor
    target: torch.Tensor
    weight: float
    reliable: Optional[torch.Tensor] = None


@dataclass
class Synthesis:
    image: torch.Tensor  # [C,Ht,Wt] 0..1, the synthesised style
    error: torch.Tensor  # [Ht,Wt] weighted SSD of each target patch to its source patch (0..255 units, as EbSynth)
    nnf: torch.Tensor    # [2,Ht,Wt] int64 (x, y) centre of the source patch chosen for every target pixel


def _glibc_malloc_trim() -> Optional[Callable[[int], int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # musl and other C libraries without it
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


_MALLOC_TRIM = _glibc_malloc_trim()


def release_freed_memory() -> None:
    """Hand the pages freed so far back to the system. glibc keeps freed blocks below its adaptive mmap threshold
    (up to 32 MiB: a 1080p plane is 8-25 MiB) in each thread's arena, so without this every arena stays at its
    high-water mark while the next allocation grows another. Called after each synthesis and before its error map:
    a 1080p interval with two passes side by side peaked at 4547 MiB without, 4081 MiB with. Costs microseconds."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def max_pyramid_levels(source_hw: tuple, target_hw: tuple, patch_size: int) -> int:
    """EbSynth's automatic depth: as many halvings as keep the smaller side of both images >= 2*patch+1."""
    smallest = min(min(source_hw), min(target_hw))
    levels = 1
    while int(smallest * 2.0 ** -levels) >= 2 * patch_size + 1:
        levels += 1
    return levels


def synthesize(style: torch.Tensor, guides: Sequence[Guide], *, style_weight: float = 1.0,
               patch_size: int = EBSYNTH_PATCH_SIZE, pyramid_levels: Optional[int] = None,
               search_vote_iters: int = EBSYNTH_SEARCH_VOTE_ITERS, patchmatch_iters: int = EBSYNTH_PATCHMATCH_ITERS,
               uniformity: float = EBSYNTH_UNIFORMITY, stop_threshold: float = EBSYNTH_STOP_THRESHOLD,
               descriptor_size: int = DEFAULT_DESCRIPTOR_SIZE, seed: int = 0, uniform_share: float = 1.0,
               initial_field: Optional[torch.Tensor] = None, search_radius: Optional[int] = None,
               warm_patchmatch_iters: int = WARM_PATCHMATCH_ITERS,
               wide_search: Optional[torch.Tensor] = None, short_descriptor: Optional[torch.Tensor] = None,
               short_descriptor_size: int = DEFAULT_DESCRIPTOR_SIZE,
               thorough_search: Optional[torch.Tensor] = None) -> Synthesis:
    """Synthesise the target of `guides` in the style of `style` ([C,Hs,Ws], 0..1), coarse to fine.
    `uniform_share`: the share of the source's pixels that a uniform use of it is expected to spread over (1: all;
    for a source that is an atlas of several copies of one image at different scales, the share of one copy, so
    that the uniformity term does not push the matches out of the copy at the right scale).
    `initial_field` ([2,Ht,Wt] int64 (x, y), e.g. the previous frame's field carried along the flow): a warm
    start; the search then runs over the finest `WARM_LEVELS` levels only, from that field (scaled down) instead of
    over the whole pyramid from a random field, with at most `warm_patchmatch_iters` PatchMatch iterations a round.
    `search_radius`: the largest radius of PatchMatch's random search (None: half the source's larger side);
    `wide_search` ([Ht,Wt] bool, optional): the target pixels whose random search still reaches over the whole
    source, e.g. where the warm start's field was made up; `short_descriptor` ([Ht,Wt] bool, optional): the target
    pixels compared through only the first `short_descriptor_size` of the `descriptor_size` components, as a search
    with that many would compare them (the components are the leading principal directions); `thorough_search`
    ([Ht,Wt] bool, optional): from a warm start, the target pixels that go on searching for all `patchmatch_iters`
    a round, once every pixel has had `warm_patchmatch_iters`."""
    _check_inputs(style, guides, patch_size)
    device = style.device
    source_hw = tuple(style.shape[-2:])
    target_hw = tuple(guides[0].target.shape[-2:])
    levels = max_pyramid_levels(source_hw, target_hw, patch_size)
    if pyramid_levels is not None:
        levels = max(1, min(int(pyramid_levels), levels))

    style_channels = style.shape[0]
    channel_weights = [style_weight / style_channels] * style_channels
    for guide in guides:
        channel_weights += [guide.weight / guide.source.shape[0]] * guide.source.shape[0]
    feature_scale = torch.tensor(channel_weights, device=device, dtype=torch.float32).sqrt().view(-1, 1, 1)
    source_features = torch.cat([style.float()] + [g.source.float().to(device) for g in guides]) * 255.0
    target_guides = torch.cat([g.target.float().to(device) for g in guides]) * 255.0

    # Random draws come from a CPU generator on every device, so a seed gives the same search on the GPU as on the CPU.
    generator = torch.Generator()
    generator.manual_seed(seed)
    basis = _pca_basis(source_features * feature_scale, patch_size, descriptor_size, generator)
    dropped = _dropped_guides(guides, style_channels, device)
    nnf = None
    for name, mask in (("wide_search", wide_search), ("short_descriptor", short_descriptor),
                       ("thorough_search", thorough_search)):
        if mask is not None and tuple(mask.shape) != target_hw:
            raise ValueError(f"{name}: expected shape {target_hw}, got {tuple(mask.shape)}")
    if initial_field is not None:
        if tuple(initial_field.shape) != (2, *target_hw):
            raise ValueError(f"initial_field: expected shape (2, {target_hw[0]}, {target_hw[1]}), got "
                             f"{tuple(initial_field.shape)}")
        levels = min(levels, WARM_LEVELS)
        thorough_iters = max(0, patchmatch_iters - warm_patchmatch_iters) if thorough_search is not None else 0
        patchmatch_iters = min(patchmatch_iters, warm_patchmatch_iters)
    else:
        thorough_iters = 0
    for level in range(levels):
        factor = 2.0 ** -(levels - 1 - level)
        level_source_hw = _level_size(source_hw, factor)
        level_target_hw = _level_size(target_hw, factor)
        solver = _LevelSolver(_resize(source_features, level_source_hw), _resize(target_guides, level_target_hw),
                              feature_scale, style_channels, basis, uniformity, generator, uniform_share,
                              search_radius, _level_dropped(dropped, level_target_hw),
                              _level_mask(wide_search, level_target_hw),
                              _level_mask(short_descriptor, level_target_hw), short_descriptor_size)
        if level > 0:
            nnf = solver.upscale_field(nnf)
        elif initial_field is not None:
            nnf = _downscale_field(initial_field.to(device, torch.int64), level_target_hw, source_hw,
                                   level_source_hw)
        else:
            nnf = solver.random_field()
        nnf, image = solver.solve(nnf, search_vote_iters, patchmatch_iters, stop_threshold,
                                  _level_mask(thorough_search, level_target_hw), thorough_iters)
    del solver  # its search state (descriptors, occupancy) is not needed for the error map: free it first
    release_freed_memory()
    error = patch_error(source_features * feature_scale, torch.cat((image, target_guides)) * feature_scale, nnf,
                        patch_size)  # the finest level's features are the full-size ones
    return Synthesis(image=(image / 255.0).clamp(0.0, 1.0), error=error, nnf=nnf)


def patch_error(source_features: torch.Tensor, target_features: torch.Tensor, nnf: torch.Tensor,
                patch_size: int = EBSYNTH_PATCH_SIZE, band_rows: int = 64) -> torch.Tensor:
    """Exact SSD between every target patch and the source patch the field points at: [C,Hs,Ws], [C,Ht,Wt] features
    (already weighted), `nnf` [2,Ht,Wt] source centres. Patches reaching over the border repeat the edge pixels.
    Target rows are done `band_rows` at a time, so the temporaries are a band's, not the image's (at 1080p the
    whole image's would be ~500 MiB)."""
    radius = patch_size // 2
    channels, height, width = target_features.shape
    source_height, source_width = source_features.shape[-2:]
    lanes = -(-channels // 8) * 8  # pixel rows padded to whole vector lanes: gathers and sums run ~2x faster
    widen = (0, 0, 0, 0, 0, lanes - channels)
    source_rows = torch.zeros(source_height * source_width, lanes, device=source_features.device)
    source_rows[:, :channels] = source_features.permute(1, 2, 0).reshape(-1, channels)
    error = torch.zeros(height, width, device=target_features.device)
    ones = torch.ones(lanes, device=target_features.device)
    for top in range(0, height, band_rows):
        rows = min(band_rows, height - top)
        # the band's target rows with `radius` more on each side (edge rows repeated), columns padded the same way
        around = torch.arange(top - radius, top + rows + radius, device=target_features.device).clamp_(0, height - 1)
        target = F.pad(F.pad(target_features.index_select(1, around), widen)[None], (radius, radius, 0, 0),
                       mode="replicate")[0].permute(1, 2, 0).contiguous()  # [rows+2r, Wt+2r, lanes]
        band_nnf = nnf[:, top:top + rows]
        band_error = error[top:top + rows].view(-1)
        difference = torch.empty(rows, width, lanes, device=target_features.device)
        for dy in range(-radius, radius + 1):
            row_start = (band_nnf[1] + dy).clamp(0, source_height - 1) * source_width
            for dx in range(-radius, radius + 1):
                index = (row_start + (band_nnf[0] + dx).clamp(0, source_width - 1)).view(-1)
                sampled = source_rows.index_select(0, index).view(rows, width, lanes)
                shifted = target[radius + dy:radius + dy + rows, radius + dx:radius + dx + width]
                torch.sub(shifted, sampled, out=difference)
                band_error.addmv_(difference.view(-1, lanes).square_(), ones)
    return error


def _check_inputs(style: torch.Tensor, guides: Sequence[Guide], patch_size: int) -> None:
    if style.dim() != 3:
        raise ValueError(f"style must be [C,H,W], got shape {tuple(style.shape)}")
    if not guides:
        raise ValueError("at least one guide is needed to tell where the target's patches come from")
    if patch_size < 3 or patch_size % 2 == 0:
        raise ValueError(f"patch_size must be odd and at least 3, got {patch_size}")
    target_hw = tuple(guides[0].target.shape[-2:])
    for number, guide in enumerate(guides):
        if tuple(guide.source.shape[-2:]) != tuple(style.shape[-2:]):
            raise ValueError(f"guide {number}: source is {tuple(guide.source.shape[-2:])}, the style is "
                             f"{tuple(style.shape[-2:])}; source guides must be aligned with the style")
        if tuple(guide.target.shape[-2:]) != target_hw or guide.target.shape[0] != guide.source.shape[0]:
            raise ValueError(f"guide {number}: target {tuple(guide.target.shape)} does not match the first guide's "
                             f"size {target_hw} or its own source's channel count {guide.source.shape[0]}")
        if guide.reliable is not None and tuple(guide.reliable.shape) != target_hw:
            raise ValueError(f"guide {number}: reliable is {tuple(guide.reliable.shape)}, expected the target's size "
                             f"{target_hw}")
    if min(min(style.shape[-2:]), min(target_hw)) < 2 * patch_size + 1:
        raise ValueError(f"images must be at least {2 * patch_size + 1} pixels on each side for patch size "
                         f"{patch_size}")


def _dropped_guides(guides: Sequence[Guide], style_channels: int, device) -> Optional[tuple]:
    """Which guide terms each target pixel drops: (code [Ht,Wt] int64, channel masks [n,C] float), code k = the
    pixel drops the channels that row k of the masks zeroes (row 0: none). None when every guide is known
    everywhere. Each guide with a `reliable` map is one bit of the code. The guides a row keeps are scaled up to
    the weight of all of them (sqrt, as the features are): without it, a patch matched without the temporal and
    positional guides leans on the style term, which only repeats the vote it starts from (+0.05 dB on car:5)."""
    partial = [(number, g) for number, g in enumerate(guides)
               if g.reliable is not None and not bool(g.reliable.all())]
    if not partial:
        return None
    first_channel = [style_channels]
    for guide in guides:
        first_channel.append(first_channel[-1] + guide.source.shape[0])
    code = torch.zeros(guides[0].target.shape[-2:], dtype=torch.int64, device=device)
    for bit, (_, guide) in enumerate(partial):
        code |= (~guide.reliable.to(device, torch.bool)).long() << bit
    masks = torch.ones(1 << len(partial), first_channel[-1], device=device)
    for combination in range(1 << len(partial)):
        left_out = {number for bit, (number, _) in enumerate(partial) if combination >> bit & 1}
        for number in left_out:
            masks[combination, first_channel[number]:first_channel[number + 1]] = 0.0
        kept = sum(g.weight for number, g in enumerate(guides) if number not in left_out)
        if kept > 0:
            guide_masks = masks[combination, style_channels:]
            guide_masks[guide_masks > 0] = (sum(g.weight for g in guides) / kept) ** 0.5
    return code, masks


def _level_dropped(dropped: Optional[tuple], hw: tuple) -> Optional[tuple]:
    """`_dropped_guides` at a pyramid level: each pixel takes the code of the full-size pixel nearest its centre."""
    if dropped is None:
        return None
    code, masks = dropped
    if tuple(code.shape) != tuple(hw):
        code = F.interpolate(code[None, None].float(), size=hw, mode="nearest")[0, 0].long()
    return code, masks


def _level_mask(mask: Optional[torch.Tensor], hw: tuple) -> Optional[torch.Tensor]:
    """A [H,W] bool mask at a pyramid level (each pixel takes the full-size pixel nearest its centre), flat."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(hw):
        mask = F.interpolate(mask[None, None].float(), size=hw, mode="nearest")[0, 0] > 0.5
    return mask.reshape(-1)


def _pca_basis(features: torch.Tensor, patch_size: int, size: int, generator: torch.Generator,
               count: int = 4096) -> torch.Tensor:
    """The `size` strongest principal directions of the (weighted) source patches, as conv filters [k,C,p,p].
    Patch spectra are nearly scale-invariant, so one basis from the full-resolution source serves every level."""
    channels, h, w = features.shape
    r = patch_size // 2
    ys = torch.randint(r, h - r, (count,), generator=generator).to(features.device)
    xs = torch.randint(r, w - r, (count,), generator=generator).to(features.device)
    offsets = torch.arange(-r, r + 1, device=features.device)
    rows = (ys.view(-1, 1, 1) + offsets.view(1, -1, 1)).expand(-1, -1, patch_size)
    cols = (xs.view(-1, 1, 1) + offsets.view(1, 1, -1)).expand(-1, patch_size, -1)
    samples = features[:, rows, cols].permute(1, 0, 2, 3).reshape(count, -1)  # [count, C*p*p]
    centred = (samples - samples.mean(0, keepdim=True)).double()
    # In float64: float32 eigh (LAPACK) rounds differently with the thread count, and the search amplifies that
    # into a different result (0.02 dB on the bench's man clip between 1 and 2 torch threads).
    _, vectors = torch.linalg.eigh(centred.t() @ centred)  # ascending eigenvalues
    size = min(size, vectors.shape[1])
    return vectors[:, -size:].flip(1).t().reshape(size, channels, patch_size, patch_size).float()


def _downscale_field(field: torch.Tensor, target_hw: tuple, full_source_hw: tuple, source_hw: tuple) -> torch.Tensor:
    """A full-resolution field ([2,H,W] x, y) at a pyramid level: each pixel takes the match of the full-size pixel
    at the top-left of its block, scaled down with the source."""
    rows = torch.arange(target_hw[0], device=field.device) * field.shape[1] // target_hw[0]
    cols = torch.arange(target_hw[1], device=field.device) * field.shape[2] // target_hw[1]
    picked = field[:, rows][:, :, cols]
    return torch.stack(((picked[0] * source_hw[1] // full_source_hw[1]).clamp(0, source_hw[1] - 1),
                        (picked[1] * source_hw[0] // full_source_hw[0]).clamp(0, source_hw[0] - 1)))


def _level_size(hw: tuple, factor: float) -> tuple:
    return int(hw[0] * factor), int(hw[1] * factor)


def _resize(image: torch.Tensor, hw: tuple) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(hw):
        return image
    return F.interpolate(image[None], size=hw, mode="bilinear", antialias=True, align_corners=False)[0]


class _LevelSolver:
    """Search and vote at one pyramid level.

    Fields are flat (x, y) int64 tensors over target pixels; one flat index y*Ws+x addresses both the source
    descriptors and the occupancy. Patches reaching over the border repeat the edge pixels, in the source as in
    the target (EbSynth keeps source centres `radius` away from the border instead, so it cannot reproduce a
    target's border exactly even from an identical source)."""

    def __init__(self, source_features, target_guides, feature_scale, style_channels, basis, uniformity, generator,
                 uniform_share=1.0, search_radius=None, dropped=None, wide_search=None, short_descriptor=None,
                 short_descriptor_size=DEFAULT_DESCRIPTOR_SIZE):
        patch_size = basis.shape[-1]
        self.patch_size, self.radius = patch_size, patch_size // 2
        self.generator = generator
        self.style_channels = style_channels
        self.device = source_features.device
        self.source_hw = tuple(source_features.shape[-2:])
        self.target_hw = tuple(target_guides.shape[-2:])
        # Weighted features are made only to project them (held through the search, ~170 MiB at 1080p).
        self.style_scale = feature_scale[:style_channels]
        # Source style as rows with one zero row after the end, for gathering in the vote.
        source_style = source_features[:style_channels]
        self.style_rows = torch.cat((source_style.reshape(style_channels, -1).t(),
                                     torch.zeros(1, style_channels, device=self.device)))
        as_filters = lambda b: b.contiguous(memory_format=torch.channels_last)  # noqa: E731 (fast CPU conv)
        self.style_basis = as_filters(basis[:, :style_channels])
        # A target pixel that drops guides (code k) compares through the basis with their channels zeroed: the
        # difference of the projections is then the projection of the difference over the guides it keeps. The
        # source table holds one block of descriptors per code that occurs; `row_offset` points at a pixel's.
        codes = [0] if dropped is None else dropped[0].unique().tolist()
        bases = [basis if c == 0 else basis * dropped[1][c].view(1, -1, 1, 1) for c in codes]
        weighted_source = source_features * feature_scale
        self.source_descriptors = torch.cat([self._project(weighted_source, as_filters(b)) for b in bases])
        del weighted_source
        weighted_guides = target_guides * feature_scale[style_channels:]
        if codes == [0]:
            self.row_offset = None
            self.target_guide_descriptors = self._project(weighted_guides, as_filters(basis[:, style_channels:]))
        else:
            pixel_codes = dropped[0].reshape(-1)
            self.row_offset = torch.empty_like(pixel_codes)
            self.target_guide_descriptors = torch.empty(pixel_codes.numel(), basis.shape[0], device=self.device)
            for slot, (c, b) in enumerate(zip(codes, bases)):
                pixels = (pixel_codes == c).nonzero().view(-1)
                self.row_offset[pixels] = slot * self.source_hw[0] * self.source_hw[1]
                self.target_guide_descriptors[pixels] = self._project(
                    weighted_guides, as_filters(b[:, style_channels:])).index_select(0, pixels)
        # How many target patches overlap each target pixel (fewer at the border): the vote's denominator.
        ones = torch.ones(1, 1, *self.target_hw, device=self.device)
        self.vote_count = (F.avg_pool2d(ones, patch_size, stride=1, padding=self.radius, count_include_pad=True)
                           * patch_size ** 2)[0, 0].reshape(-1, 1)
        target_pixels = self.target_hw[0] * self.target_hw[1]
        source_pixels = self.source_hw[0] * self.source_hw[1] * uniform_share
        # EbSynth: occupancy = (patch sum of Omega / patch area) / omegaBest, omegaBest = |A|/|B| * patch area,
        # Omega = how many target patches cover a source pixel; patch sum of Omega = hits * (box*box) kernel.
        # Here omegaBest is the patch sum that uniform use (every source patch used |A|/|B| times) gives at each
        # position: the same as EbSynth's inside, but it does not make border patches look unused and attractive.
        self.uniformity = uniformity
        uniform_use = self._box_box(torch.ones(1, 1, *self.source_hw, device=self.device))
        self.occupancy_weight = uniformity * source_pixels / (target_pixels * uniform_use)
        span = torch.arange(-2 * self.radius, 2 * self.radius + 1, device=self.device)
        self.kernel_dy, self.kernel_dx = [v.reshape(-1) for v in torch.meshgrid(span, span, indexing="ij")]
        self.kernel = ((patch_size - self.kernel_dy.abs()) * (patch_size - self.kernel_dx.abs())).float()
        largest = max(self.source_hw) // 2 - 1
        capped = largest if search_radius is None else min(search_radius, largest)
        self.radii = [1 << k for k in range(32) if (1 << k) <= capped]
        # the radii beyond the cap, tried only at the `wide_search` pixels
        self.wide_radii = [1 << k for k in range(32) if capped < (1 << k) <= largest]
        self.wide_search = wide_search.to(self.device) if wide_search is not None and self.wide_radii else None
        self.short_size = short_descriptor_size
        self.short_descriptor = (short_descriptor.to(self.device) if short_descriptor is not None
                                 and short_descriptor_size < basis.shape[0] else None)

    # ---- fields ---------------------------------------------------------------------------------------------
    def random_field(self) -> torch.Tensor:
        h, w = self.target_hw
        xs = torch.randint(0, self.source_hw[1], (h, w), generator=self.generator).to(self.device)
        ys = torch.randint(0, self.source_hw[0], (h, w), generator=self.generator).to(self.device)
        return torch.stack((xs, ys))

    def upscale_field(self, coarse: torch.Tensor) -> torch.Tensor:
        """EbSynth's nnfUpscale: each coarse match covers a 2x2 block, offset by the pixel's position in it."""
        h, w = self.target_hw
        ys = torch.arange(h, device=self.device)
        xs = torch.arange(w, device=self.device)
        coarse_y = (ys // 2).clamp(max=coarse.shape[1] - 1)
        coarse_x = (xs // 2).clamp(max=coarse.shape[2] - 1)
        picked = coarse[:, coarse_y][:, :, coarse_x] * 2
        return torch.stack(((picked[0] + (xs % 2).view(1, w)).clamp(0, self.source_hw[1] - 1),
                            (picked[1] + (ys % 2).view(h, 1)).clamp(0, self.source_hw[0] - 1)))

    # ---- descriptors ----------------------------------------------------------------------------------------
    def _project(self, features: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """Descriptors of every pixel's patch (edges repeated) as rows [H*W, k]."""
        padded = F.pad(features[None], (self.radius,) * 4, mode="replicate")
        projected = F.conv2d(padded.contiguous(memory_format=torch.channels_last), basis)
        return projected.permute(0, 2, 3, 1).reshape(-1, basis.shape[0]).contiguous()

    def _target_descriptors(self, target_style: torch.Tensor) -> torch.Tensor:
        return self._project(target_style * self.style_scale, self.style_basis) + self.target_guide_descriptors

    # ---- costs ----------------------------------------------------------------------------------------------
    def _flat(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return ys * self.source_hw[1] + xs

    def _distance(self, target_rows: torch.Tensor, source_index: torch.Tensor, row_offset: Optional[torch.Tensor],
                  short: Optional[torch.Tensor]) -> torch.Tensor:
        """Squared descriptor distance of each target row to its source candidate; the rows marked `short` over
        the first `short_size` components only."""
        if row_offset is not None:
            source_index = source_index + row_offset
        squares = self.source_descriptors.index_select(0, source_index).sub_(target_rows).square_()
        if short is not None:
            squares[:, self.short_size:] *= ~short.view(-1, 1)
        return squares.sum(1)

    def _full_occupancy(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Uniformity cost of every source patch given the whole field: hits filtered by the 9x9 box*box kernel."""
        h, w = self.source_hw
        if self.uniformity <= 0:
            return torch.zeros(h * w, device=self.device)
        hits = torch.bincount(self._flat(xs, ys), minlength=h * w).float().view(1, 1, h, w)
        return self._box_box(hits) * self.occupancy_weight

    def _box_box(self, image: torch.Tensor) -> torch.Tensor:
        """[1,1,H,W] -> [H*W]: image filtered by box*box (zero outside), the kernel `_move_occupancy` applies."""
        size = self.patch_size
        twice = F.avg_pool2d(F.avg_pool2d(F.pad(image, (2 * self.radius,) * 4), size, stride=1), size, stride=1)
        return (twice * size ** 4).reshape(-1)

    def _move_occupancy(self, occupancy, old_x, old_y, new_x, new_y) -> None:
        """Incremental update of the occupancy for matches that moved from old to new (in place)."""
        h, w = self.source_hw
        xs = torch.cat((old_x, new_x)).view(-1, 1) + self.kernel_dx
        ys = torch.cat((old_y, new_y)).view(-1, 1) + self.kernel_dy
        inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
        sign = torch.ones(2 * old_x.numel(), 1, device=self.device)
        sign[:old_x.numel()] = -1.0
        index = (ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)).view(-1)
        weights = (sign * self.kernel * inside).view(-1) * self.occupancy_weight[index]
        occupancy.index_add_(0, index, weights)

    # ---- search ---------------------------------------------------------------------------------------------
    def solve(self, nnf: torch.Tensor, search_vote_iters: int, patchmatch_iters: int, stop_threshold: float,
              thorough: Optional[torch.Tensor] = None, thorough_iters: int = 0):
        """Search-vote rounds from `nnf` ([2,Ht,Wt]); returns the final field and its vote (0..255 style).
        Round 1 searches every pixel; later rounds only those within a patch of a pixel whose vote moved by at
        least `stop_threshold` in the previous round (EbSynth CUDA's stop mask); none left = converged. The active
        pixels marked `thorough` ([Ht,Wt] bool) then search `thorough_iters` more PatchMatch iterations a round."""
        thorough = thorough.reshape(-1).to(self.device) if thorough is not None and thorough_iters > 0 else None
        xs, ys = nnf[0].reshape(-1).clone(), nnf[1].reshape(-1).clone()
        style = self._vote_full(xs, ys)
        occupancy = self._full_occupancy(xs, ys)
        active = torch.arange(xs.numel(), device=self.device)
        for vote_iter in range(search_vote_iters):
            if active.numel() == 0 or patchmatch_iters == 0:
                break
            before_x, before_y = xs.clone(), ys.clone()
            descriptors = self._target_descriptors(style)  # of the target patches in the current vote
            self._patchmatch(descriptors, xs, ys, active, patchmatch_iters, occupancy)
            if thorough is not None:
                longer = active[thorough.index_select(0, active)]
                if longer.numel() > 0:
                    self._patchmatch(descriptors, xs, ys, longer, thorough_iters, occupancy)
            changed = ((xs != before_x) | (ys != before_y)).view(1, 1, *self.target_hw).float()
            touched = self._dilate(changed)
            new_style = self._vote(xs, ys, touched, style)
            moved = ((new_style - style).abs().amax(0) >= stop_threshold).float()[None, None]
            active = self._dilate(moved)
            style = new_style
        return torch.stack((xs, ys)).view(2, *self.target_hw), style

    def _dilate(self, mask: torch.Tensor) -> torch.Tensor:
        """Flat indices of the pixels within a patch radius of a set pixel of `mask` ([1,1,H,W] float)."""
        grown = F.max_pool2d(mask, self.patch_size, stride=1, padding=self.radius)
        return grown.view(-1).nonzero().view(-1)

    def _patchmatch(self, descriptors, xs, ys, active, iters, occupancy):
        """Parallel PatchMatch on the active pixels; `xs`, `ys` (the whole field) and `occupancy` change in place.

        Each iteration: jump-flood propagation (neighbours at 4, 2, 1 pixels in the four directions offer their
        match shifted back; only offers that differ from the current match are evaluated, which once the field is
        coherent is a small minority), then random search with one candidate per radius 1, 2, 4, ... around the
        match found so far. Matches and occupancy are published after every propagation jump and after the random
        search, so neighbours see each other's improvements (EbSynth CUDA's schedule). `descriptors`: every target
        patch's, [Ht*Wt, k]."""
        h, w = self.target_hw
        source_h, source_w = self.source_hw
        rows = descriptors if active.numel() == descriptors.shape[0] else descriptors.index_select(0, active)
        px, py = active % w, active // w

        def offers():
            """Per jump and direction: neighbour index, whether it exists, shift. Made as they are used: kept for
            the whole search they would take 108 bytes a pixel (220 MiB at 1080p)."""
            for jump in PROPAGATION_JUMPS:
                for ox, oy in ((-jump, 0), (jump, 0), (0, -jump), (0, jump)):
                    nx, ny = px + ox, py + oy
                    inside = (nx >= 0) & (nx < w) & (ny >= 0) & (ny < h)
                    yield ny.clamp_(0, h - 1) * w + nx.clamp_(0, w - 1), inside, ox, oy
        offsets = None if self.row_offset is None else self.row_offset.index_select(0, active)
        wide = None if self.wide_search is None else self.wide_search.index_select(0, active).nonzero().view(-1)
        state = {"x": xs[active], "y": ys[active]}
        state["index"] = self._flat(state["x"], state["y"])
        short = None if self.short_descriptor is None else self.short_descriptor.index_select(0, active)
        state["error"] = self._distance(rows, state["index"], offsets, short)
        state["cost"] = state["error"] + occupancy[state["index"]]

        def consider(which, candidates):
            """Evaluate `candidates` for the active entries `which` (None = all); keep the better ones."""
            sub_rows = rows if which is None else rows.index_select(0, which)
            def entries(per_entry):
                return per_entry if which is None or per_entry is None else per_entry.index_select(0, which)
            error = self._distance(sub_rows, candidates, entries(offsets), entries(short))
            cost = error + occupancy[candidates]
            current = state["cost"] if which is None else state["cost"][which]
            better = (cost < current).nonzero().view(-1)
            target = better if which is None else which[better]
            state["index"][target] = candidates[better]
            state["error"][target] = error[better]
            state["cost"][target] = cost[better]

        def random_search(which, centre_x, centre_y, radius):
            """One random candidate within `radius` of each centre, for the active entries `which` (None = all)."""
            step = torch.randint(-radius, radius + 1, (2, centre_x.numel()), generator=self.generator).to(self.device)
            consider(which, (centre_y + step[1]).clamp_(0, source_h - 1) * source_w
                     + (centre_x + step[0]).clamp_(0, source_w - 1))

        def publish():
            """Write the active matches into the field and re-price the source patches they moved between."""
            new_x, new_y = state["index"] % source_w, state["index"] // source_w
            if self.uniformity > 0:
                moved = ((new_x != state["x"]) | (new_y != state["y"])).nonzero().view(-1)
                if moved.numel() * self.kernel.numel() > occupancy.numel():
                    xs[active], ys[active] = new_x, new_y
                    occupancy.copy_(self._full_occupancy(xs, ys))
                elif moved.numel() > 0:
                    self._move_occupancy(occupancy, state["x"][moved], state["y"][moved], new_x[moved],
                                         new_y[moved])
                state["cost"] = state["error"] + occupancy[state["index"]]
            xs[active], ys[active] = new_x, new_y
            state["x"], state["y"] = new_x, new_y

        for _ in range(iters):
            for number, (neighbour, inside, ox, oy) in enumerate(offers()):
                cand_x = (xs[neighbour] - ox).clamp_(0, source_w - 1)
                cand_y = (ys[neighbour] - oy).clamp_(0, source_h - 1)
                candidates = cand_y * source_w + cand_x
                which = (inside & (candidates != state["index"])).nonzero().view(-1)
                if which.numel() > 0:
                    consider(which, candidates[which])
                if number % 4 == 3:  # after each jump's four directions
                    publish()
            centre_x, centre_y = state["x"], state["y"]
            for radius in self.radii:
                random_search(None, centre_x, centre_y, radius)
            if wide is not None and wide.numel() > 0:
                wide_x, wide_y = centre_x[wide], centre_y[wide]
                for radius in self.wide_radii:
                    random_search(wide, wide_x, wide_y, radius)
            publish()

    # ---- vote -----------------------------------------------------------------------------------------------
    def _vote_full(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """EbSynth's plain vote: each target pixel averages the source pixels that the overlapping patches put on
        it; patches centred outside the target do not exist."""
        h, w = self.target_hw
        r = self.radius
        padded_x = F.pad(xs.view(h, w), (r,) * 4, value=-1)
        padded_y = F.pad(ys.view(h, w), (r,) * 4)
        total = torch.zeros(h * w, self.style_channels, device=self.device)
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                # pixel p takes, from the patch centred at p + (dx, dy), the source pixel at offset -(dx, dy)
                centre_x = padded_x[r + dy:r + dy + h, r + dx:r + dx + w]
                centre_y = padded_y[r + dy:r + dy + h, r + dx:r + dx + w]
                total += self.style_rows.index_select(0, self._vote_index(centre_x, centre_y, dx, dy).reshape(-1))
        return (total / self.vote_count).t().reshape(self.style_channels, h, w)

    def _vote_index(self, centre_x, centre_y, dx, dy, inside=None):
        """Row of `style_rows` that a patch centred at `centre` puts at offset -(dx, dy); the zero row where the
        patch does not exist (centre_x < 0 or not `inside`)."""
        sh, sw = self.source_hw
        index = (centre_y - dy).clamp(0, sh - 1) * sw + (centre_x - dx).clamp(0, sw - 1)
        exists = centre_x >= 0 if inside is None else inside
        return torch.where(exists, index, self.style_rows.shape[0] - 1)

    def _vote(self, xs, ys, pixels, style) -> torch.Tensor:
        """The vote recomputed only at `pixels` (flat target indices); elsewhere `style` is still right."""
        h, w = self.target_hw
        if pixels.numel() * 4 > h * w:
            return self._vote_full(xs, ys)
        r = self.radius
        px, py = pixels % w, pixels // w
        total = torch.zeros(pixels.numel(), self.style_channels, device=self.device)
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                cx, cy = px + dx, py + dy
                inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
                centre = cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1)
                total += self.style_rows.index_select(0, self._vote_index(xs[centre], ys[centre], dx, dy, inside))
        updated = style.reshape(self.style_channels, -1).clone()
        updated[:, pixels] = (total / self.vote_count[pixels]).t()
        return updated.view_as(style)
