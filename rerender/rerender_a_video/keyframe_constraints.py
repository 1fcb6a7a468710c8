"""Math of Rerender's key frame constraints (reference §1.3, §1.5-1.8), free of the host.

Everything here works on the sampler's own variables in the k-diffusion form the host uses: a noisy latent is
x = a(σ)·x̂0 + σ·ε (a = 1 for EPS/v models; the host's `noise_scaling` gives a for others), x̂0 is the model's
"denoised" prediction. The reference's DDIM quantities map onto it exactly after dividing by sqrt(ᾱ):
`x_t - dir` (= sqrt(ᾱ)·x̂0) is the *signal part* and `dir` (= sqrt(1-ᾱ)·ε) the *noise part*, so its blend
`w·q_sample(x_trg) + (1-w)·(x_t - dir) + r·dir` keeps its form with signal = the last x̂0 the sampler received
(scaled by a(σ)) and noise = x - signal. That holds for any sampler, which is what lets the constraints run with
every host sampler, not only DDIM.

Step periods are fractions of the FULL schedule (the one an SDEdit start cuts the head off), as in the reference.
Latent/pixel scale and channel count are read from tensor shapes, never assumed.
"""
from typing import Dict, Iterable, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..fidelity import latent_scale
from ..warp import downsample_mask_max, flow_warp, resize_flow, soften_occlusion

PERIOD_TOLERANCE = 1e-6
FLAT_TOLERANCE = 1e-6


# ---------------------------------------------------------------------------------------------------- step periods

def validate_period(name: str, start: float, end: float) -> None:
    """A period is two fractions of the schedule in [0, 1]; start >= end switches it off (the reference webUI's
    (1, 0))."""
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ValueError(f"{name}: the period ({start}, {end}) must lie in [0, 1] (fractions of the schedule); "
                         f"use start >= end to switch it off.")


def period_steps(start: float, end: float, total_steps: int, exclusive: bool = False) -> frozenset:
    """Indices i in [0, total_steps) of the full schedule where a constraint is active.

    The reference's rules: T·start <= i <= T·end, or with `exclusive` (pixel-aware fusion) T·start < i < T·end.
    With T = 20: (0, 0.1) -> {0, 1, 2}; (0.5, 0.8) exclusive -> {11..15}; (0.8, 1) -> {16..19}.
    start >= end is off (the reference webUI switches constraints off with (1, 0))."""
    if start >= end:
        return frozenset()
    lo, hi = total_steps * start, total_steps * end
    if exclusive:
        return frozenset(i for i in range(total_steps) if lo + PERIOD_TOLERANCE < i < hi - PERIOD_TOLERANCE)
    return frozenset(i for i in range(total_steps) if lo - PERIOD_TOLERANCE <= i <= hi + PERIOD_TOLERANCE)


def hidden_period_report(periods: Dict[str, Tuple[float, Iterable[int]]], first_step: int,
                         total_steps: int) -> List[Tuple[str, bool]]:
    """(message, inert) per constraint that the SDEdit start `first_step` really hides: all its steps come before
    it (inert), or its period was set to start later than step 0 and starts before it (weakened). `periods` maps a
    name to (period start fraction, active steps). A period starting at 0 that runs on past the start (cross-frame
    attention's default (0, 1)) simply acts at every executed step and is not reported. The reference drops
    hidden steps silently (§1.3)."""
    lines = []
    for name, (start, steps) in periods.items():
        steps = sorted(steps)
        hidden = [i for i in steps if i < first_step]
        if not hidden:
            continue
        inert = len(hidden) == len(steps)
        if not inert and start <= 0.0:
            continue
        what = "has no effect" if inert else f"runs only at steps {steps[len(hidden)]}..{steps[-1]}"
        lines.append((f"{name}: steps {hidden[0]}..{hidden[-1]} of the {total_steps}-step schedule come before the "
                      f"denoise start (step {first_step}), so it {what}"
                      + ("; raise denoise or move the period later." if inert else "."), inert))
    return lines


# ---------------------------------------------------------------------------------- shape-aware x̂0 fusion (§1.5)

def latent_warp_field(flow: torch.Tensor, occlusion: torch.Tensor, latent_size: Tuple[int, int]) -> tuple:
    """Latent flow and validity mask for x̂0 fusion from a pixel flow [1,2,H,W] and occlusion [1,1,H,W].

    Flow: resized bilinearly to the latent grid with its vectors scaled (the reference's /8 + interpolate 1/8).
    Mask: 1 - maxpool_f(soft occlusion): a cell is as valid as its worst pixel. f is read from the shapes."""
    factor = latent_scale(tuple(flow.shape[-2:]), tuple(latent_size))
    latent_flow = resize_flow(flow, tuple(latent_size))
    latent_mask = 1.0 - downsample_mask_max(soften_occlusion(occlusion), factor)
    return latent_flow, latent_mask


def fuse_x0(x0: torch.Tensor, anchor_x0: torch.Tensor, latent_flow: torch.Tensor,
            latent_mask: torch.Tensor) -> torch.Tensor:
    """x̂0 <- M·warp_nearest(x̂0_anchor) + (1-M)·x̂0: the anchor's prediction laid onto this frame where valid."""
    warped = flow_warp(anchor_x0.to(x0.dtype), latent_flow.to(x0.device), mode="nearest")
    mask = latent_mask.to(x0.device, x0.dtype)
    return mask * warped + (1.0 - mask) * x0


# ---------------------------------------------------------------------------- pixel-aware fusion (§1.6 steps 1-3)

def pixel_reference(rough: torch.Tensor, anchor_output: torch.Tensor, previous_output: torch.Tensor,
                    anchor_flow: torch.Tensor, anchor_occlusion: torch.Tensor,
                    previous_flow: torch.Tensor, previous_occlusion: torch.Tensor) -> torch.Tensor:
    """R = (1-B0)·W0 + B0·[(1-Bp)·Wp + Bp·rough] (paper Eq. 10), images [1,C,H,W].

    W0 / Wp: the translated anchor / previous key frame warped onto this frame (bilinear); B0 / Bp their soft
    occlusions. The anchor has priority, then the previous key frame, then this frame's rough translation."""
    anchor_soft = soften_occlusion(anchor_occlusion).to(rough.dtype)
    previous_soft = soften_occlusion(previous_occlusion).to(rough.dtype)
    warped_anchor = flow_warp(anchor_output, anchor_flow)
    warped_previous = flow_warp(previous_output, previous_flow)
    fallback = (1.0 - previous_soft) * warped_previous + previous_soft * rough
    return (1.0 - anchor_soft) * warped_anchor + anchor_soft * fallback


def inpaint_mask(anchor_occlusion: torch.Tensor, previous_occlusion: torch.Tensor,
                 latent_size: Tuple[int, int]) -> torch.Tensor:
    """Latent mask M [1,1,h,w] of where the pixel reference is trustworthy: pixels occluded in BOTH the anchor and
    the previous key frame are not (they came from the rough pass); softened, then 1 - maxpool_f(1 - V)."""
    both_occluded = torch.minimum(anchor_occlusion.float(), previous_occlusion.float())
    valid = 1.0 - soften_occlusion(both_occluded)
    factor = latent_scale(tuple(valid.shape[-2:]), tuple(latent_size))
    return 1.0 - downsample_mask_max(1.0 - valid, factor)


# ------------------------------------------------------------------------------ blended inpainting (§1.6 steps 5-6)

def flat_region(mask: torch.Tensor) -> torch.Tensor:
    """1 where `mask` [N,1,h,w] has zero 3x3 gradient (kernels [-1,0,1] x 3 and transpose, replicate padding),
    0 on the soft band between valid and invalid cells."""
    kernel_x = torch.tensor([[-1.0, 0.0, 1.0]] * 3, device=mask.device)
    kernels = torch.stack((kernel_x, kernel_x.t()))[:, None]
    gradients = F.conv2d(F.pad(mask.float(), (1, 1, 1, 1), mode="replicate"), kernels)
    return (gradients.abs() <= FLAT_TOLERANCE).all(dim=1, keepdim=True).to(mask.dtype)


def blend_weights(mask: torch.Tensor, strength: float, inner_strength: float,
                  smooth_boundary: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-cell weight w of the reference and r of the noise part.

    w = M·mask_strength; r = max(1-w, sqrt(1-w²)·inner_strength), roughly variance-preserving and damped by the
    "detail level"; with `smooth_boundary`, r falls back to the linear 1-w on the soft band (not flat_region)."""
    weight = mask.float() * strength
    noise_keep = torch.maximum(1.0 - weight, (1.0 - weight.square()).clamp_min(0.0).sqrt() * inner_strength)
    if smooth_boundary:
        flat = flat_region(mask)
        noise_keep = (1.0 - weight) * (1.0 - flat) + noise_keep * flat
    return weight, noise_keep


def blend_toward_reference(x: torch.Tensor, signal: torch.Tensor, noised_reference: torch.Tensor,
                           weight: torch.Tensor, noise_keep: torch.Tensor) -> torch.Tensor:
    """x <- w·x_ref + (1-w)·signal + r·(x - signal), the reference's pre-UNet blend in sigma form.

    `signal` is a(σ)·x̂0 of the previous evaluation, `noised_reference` = a(σ)·x_trg + σ·fresh noise.
    w = 0 leaves x unchanged (then r = 1); w = 1 replaces it by the noised reference."""
    weight, noise_keep = weight.to(x.device, x.dtype), noise_keep.to(x.device, x.dtype)
    noise = x - signal
    return weight * noised_reference + (1.0 - weight) * signal + noise_keep * noise


# ------------------------------------------------------------------------------ colour correction (§1.8, optional)

def _match_cumulative(source: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Histogram matching of one channel (skimage.exposure.match_histograms' rule: quantile interpolation)."""
    values, inverse, counts = np.unique(source.ravel(), return_inverse=True, return_counts=True)
    template_values, template_counts = np.unique(template.ravel(), return_counts=True)
    quantiles = np.cumsum(counts) / source.size
    template_quantiles = np.cumsum(template_counts) / template.size
    return np.interp(quantiles, template_quantiles, template_values)[inverse].reshape(source.shape)


def _luminance(rgb: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.3, 0.59, 0.11], device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    return (rgb * weights).sum(dim=1, keepdim=True)


def set_luminosity(colour: torch.Tensor, luminance_source: torch.Tensor) -> torch.Tensor:
    """W3C "luminosity" blend: the hue and saturation of `colour` with the luminance of `luminance_source`
    ([N,3,H,W] in 0..1), with the standard ClipColor so the result stays in gamut."""
    shifted = colour + (_luminance(luminance_source) - _luminance(colour))
    lum = _luminance(shifted)
    low, high = shifted.amin(dim=1, keepdim=True), shifted.amax(dim=1, keepdim=True)
    below = lum + (shifted - lum) * lum / (lum - low).clamp_min(1e-8)
    above = lum + (shifted - lum) * (1.0 - lum) / (high - lum).clamp_min(1e-8)
    out = torch.where(low < 0.0, below, shifted)
    return torch.where(high > 1.0, above, out).clamp(0.0, 1.0)


def match_colours(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The reference's input colour correction when colour is not preserved: per-channel LAB histogram matching
    of `images` [N,3,H,W] to `reference` [1,3,H,W] (0..1), then the original luminosity laid back on."""
    from kornia.color import lab_to_rgb, rgb_to_lab
    lab = rgb_to_lab(images.float()).cpu().numpy()
    reference_lab = rgb_to_lab(reference.float()).cpu().numpy()[0]
    matched = np.stack([np.stack([_match_cumulative(frame[c], reference_lab[c]) for c in range(3)])
                        for frame in lab]).astype(np.float32)
    matched_rgb = lab_to_rgb(torch.from_numpy(matched)).clamp(0.0, 1.0).to(images.device, images.dtype)
    return set_luminosity(matched_rgb, images)

