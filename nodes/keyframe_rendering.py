"""Host-bound orchestration of Rerender's key frame translation (reference §1.3-1.9b) on any host sampler.

Per run: the anchor (the first selected key frame) is rendered once with plain attention while its attention
inputs and x̂0 per step are cached; every later key frame, in order, gets
  rough pass  - cross-frame attention, AdaIN and shape-aware x̂0 fusion (x̂0 edits: a post-CFG function),
  pixel reference from the warped anchor / previous outputs, fidelity encode E*, then
  final pass  - the same plus the pre-UNet blend toward the noised reference in the pixel-fusion steps;
the final pass also refreshes the "previous key frame" attention cache.

The blend changes the sampler's state x, which no model hook can do for every sampler, so sampling is split at the
blend steps (and after x̂0-edit steps, see X0Constraints): the host's own sampler function runs between the splits
and the state is changed at each boundary. Steps before the first blend are identical in both passes (same seed,
same constraints), so the final pass resumes from the rough pass's state there instead of recomputing them: the
result is the reference's two-pass algorithm at about 1.6x the cost of one pass with its default periods.
"""
import dataclasses
import logging
import time
from typing import Callable, Dict, List, Optional, Tuple

import comfy.model_management
import comfy.sample
import comfy.samplers
import torch

from ..rerender import keyframe_constraints as constraints
from ..rerender.adain import adain, channel_stats
from ..rerender.cross_frame_attention import CrossFrameAttention, Mode
from ..rerender.fidelity import fidelity_encode
from .cross_frame_attention import find_cross_frame_attention
from .fidelity_encode import check_vae_size

NODE_NAME = "Key Frame Sampler"


@dataclasses.dataclass(frozen=True)
class KeyframeSettings:
    """Every knob of a run; periods are (start, end) fractions of the full schedule (start == end: off)."""
    seed: int = 0
    steps: int = 15
    cfg: float = 7.5
    sampler_name: str = "ddim"
    scheduler: str = "ddim_uniform"
    denoise: float = 0.75
    shape_period: Tuple[float, float] = (0.0, 0.1)
    pixel_period: Tuple[float, float] = (0.5, 0.8)
    adain_period: Tuple[float, float] = (0.8, 1.0)
    mask_strength: float = 0.5
    inner_strength: float = 0.9
    smooth_boundary: bool = True
    fidelity_strength: float = 1.0
    fidelity_threshold: float = 0.25
    color_preserve: bool = True
    control_strength: float = 1.0


@dataclasses.dataclass
class StepInfo:
    """What a step callback gets: which key frame, which pass, which step of the full schedule, and progress."""
    key_frame: int
    frame_index: int
    pass_name: str
    step: int
    x0: torch.Tensor
    done: int
    total: int


@dataclasses.dataclass
class RenderStats:
    vae_encodes: int = 0
    vae_decodes: int = 0
    vae_seconds: float = 0.0
    attention_cache_peak_bytes: int = 0
    report: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The full sigma schedule (T+1 values) and the executed tail (steps+1 values) the host's KSampler would use."""
    full: torch.Tensor
    executed: torch.Tensor

    @property
    def total_steps(self) -> int:
        return len(self.full) - 1

    @property
    def first_step(self) -> int:
        return len(self.full) - len(self.executed)

    def executed_steps(self, steps) -> List[int]:
        return sorted(i for i in steps if i >= self.first_step)

    @classmethod
    def from_host(cls, model, settings: KeyframeSettings) -> "Schedule":
        ksampler = comfy.samplers.KSampler(model, steps=settings.steps, device=model.load_device,
                                           sampler=settings.sampler_name, scheduler=settings.scheduler,
                                           denoise=settings.denoise, model_options=model.model_options)
        full = ksampler.sigmas
        if settings.denoise < 0.9999:  # the same rule as KSampler.set_steps
            full = ksampler.calculate_sigmas(int(settings.steps / settings.denoise)).to(model.load_device)
        return cls(full, ksampler.sigmas)


class X0Constraints:
    """Post-CFG edit of the model's x̂0 (reference update_x0): AdaIN to the anchor's statistics, then shape-aware
    fusion with the warped anchor x̂0, at the steps of their periods. With `record`, stores the anchor's x̂0.

    The reference edits x̂0 but keeps the UNet's ε in its DDIM update; a host sampler only sees the edited x̂0 and
    re-derives ε from it, which would shrink each edit by σ_next/σ (to ~20-25% per step at the reference's early
    steps). `carry_into_state` restores the reference's update at the next step boundary: x += σ_now/σ_edit ·
    a(σ_edit)·(x̂0' - x̂0) - exact for DDIM/Euler, the same "edited signal, UNet's own noise" for other samplers."""

    def __init__(self, schedule: torch.Tensor, model_sampling, adain_steps, fusion_steps,
                 anchor_x0: Dict[int, torch.Tensor], record: bool = False,
                 fusion_field: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        self.schedule = schedule.detach().float().cpu()
        self.model_sampling = model_sampling
        self.adain_steps, self.fusion_steps = frozenset(adain_steps), frozenset(fusion_steps)
        self.anchor_x0, self.record, self.fusion_field = anchor_x0, record, fusion_field
        self.pending = None  # (x̂0' - x̂0, sigma) of the latest edit, not yet carried into the sampler's state

    def __call__(self, args):
        x0, sigma = args["denoised"], args["sigma"]
        step = constraints.step_at_sigma(self.schedule, sigma)
        if self.record:
            if step in self.adain_steps or step in self.fusion_steps:
                self.anchor_x0[step] = x0.detach().clone()
            return x0
        anchor = self.anchor_x0.get(step)
        if anchor is None:
            return x0
        edited = x0
        if step in self.adain_steps:
            edited = adain(edited, *channel_stats(anchor))
        if step in self.fusion_steps and self.fusion_field is not None:
            edited = constraints.fuse_x0(edited, anchor, *self.fusion_field)
        self.pending = (edited - x0, sigma)
        return edited

    def carry_into_state(self, x: torch.Tensor, sigma_now: torch.Tensor) -> torch.Tensor:
        if self.pending is None:
            return x
        delta, sigma_edit = self.pending
        self.pending = None
        sigma_edit = sigma_edit.flatten()[0]
        shift = self.model_sampling.noise_scaling(sigma_edit, torch.zeros_like(delta), delta)
        return x + shift * (sigma_now / sigma_edit)


class _DenoisedTracker:
    """The sampler's model function, remembering the last x̂0 it returned (the blend's signal part)."""

    def __init__(self, model):
        self.model, self.denoised = model, None

    def __call__(self, *args, **kwargs):
        self.denoised = self.model(*args, **kwargs)
        return self.denoised

    def __getattr__(self, name):
        return getattr(self.model, name)


def segmented_sampler(base: comfy.samplers.KSAMPLER, splits, on_boundary: Callable,
                      index_offset: int = 0) -> comfy.samplers.KSAMPLER:
    """`base` run piecewise: at each index in `splits` (into the sigmas the sampler gets) `on_boundary(index, x,
    last_x0)` may replace the state before the host's sampler function continues from there. Segment k's noise seed
    is offset by its start index (plus `index_offset`) so stochastic samplers never reuse a segment's noise, and the
    same step gets the same seed in every pass."""
    split_set = frozenset(splits)

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        tracked = _DenoisedTracker(model)
        last = len(sigmas) - 1
        edges = sorted({0, last, *(s for s in split_set if 0 <= s < last)})
        for start, stop in zip(edges, edges[1:]):
            if start in split_set:
                x = on_boundary(start, x, tracked.denoised)
            args = dict(extra_args or {})
            if args.get("seed") is not None:
                args["seed"] += index_offset + start
            shifted = None if callback is None else (lambda d, s=start: callback({**d, "i": d["i"] + s}))
            x = base.sampler_function(tracked, x, sigmas[start:stop + 1], extra_args=args, callback=shifted,
                                      disable=disable, **options)
        return x

    return comfy.samplers.KSAMPLER(sample, base.extra_options, base.inpaint_options)


class CountingVAE:
    """The VAE's encode/decode with call counts and time, so benchmarks can count the VAE's share apart."""

    def __init__(self, vae, stats: RenderStats):
        self.vae, self.stats = vae, stats

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.vae.encode(images)
        self.stats.vae_encodes += 1
        self.stats.vae_seconds += time.perf_counter() - start
        return out

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.vae.decode(latent)
        self.stats.vae_decodes += 1
        self.stats.vae_seconds += time.perf_counter() - start
        return out


def _nchw(images: torch.Tensor) -> torch.Tensor:
    return images.movedim(-1, 1)


def _nhwc(images: torch.Tensor) -> torch.Tensor:
    return images.movedim(1, -1)


class KeyframeRenderer:
    """One run of the key frame sampler. Construction validates every input (errors before any sampling)."""

    def __init__(self, model, positive, negative, vae, frames: torch.Tensor, keyframes, flow,
                 settings: KeyframeSettings, control_net=None, control_hints: Optional[torch.Tensor] = None,
                 on_step: Optional[Callable[[StepInfo], None]] = None,
                 on_key_frame: Optional[Callable[[int, int, int], None]] = None):
        self.model, self.positive, self.negative = model, positive, negative
        self.frames, self.keyframes, self.flow, self.settings = frames, keyframes, flow, settings
        self.control_net, self.control_hints = control_net, control_hints
        self.on_step, self.on_key_frame = on_step, on_key_frame
        self.stats = RenderStats()
        self.vae = CountingVAE(vae, self.stats)
        self.attention: Optional[CrossFrameAttention] = find_cross_frame_attention(model)
        self._validate(vae)
        self.schedule = Schedule.from_host(model, settings)
        total = self.schedule.total_steps
        self.shape_steps = constraints.period_steps(*settings.shape_period, total)
        self.pixel_steps = constraints.period_steps(*settings.pixel_period, total, exclusive=True)
        self.adain_steps = constraints.period_steps(*settings.adain_period, total)
        self.blend_steps = self.schedule.executed_steps(self.pixel_steps)
        self._report_hidden_periods()
        self._check_flow_needed()
        self.model_sampling = model.get_model_object("model_sampling")
        self.device = model.load_device
        self._done = 0
        self.total_units = self._count_units()

    # ------------------------------------------------------------------------------------------------ validation
    def _validate(self, vae) -> None:
        s, frames = self.settings, self.frames
        if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
            raise ValueError(f"{NODE_NAME}: `frames` must be a non-empty IMAGE batch [N,H,W,3].")
        n = frames.shape[0]
        if getattr(self.keyframes, "num_frames", None) != n:
            raise ValueError(f"{NODE_NAME}: `keyframes` were picked for {getattr(self.keyframes, 'num_frames', '?')} "
                             f"frames but `frames` has {n}; pick the key frames from the same clip.")
        for name, period in (("shape-aware fusion", s.shape_period), ("pixel-aware fusion", s.pixel_period),
                             ("AdaIN", s.adain_period)):
            constraints.validate_period(f"{NODE_NAME}: {name} start/end", *period)
        for name, value in (("mask_strength", s.mask_strength), ("inner_strength", s.inner_strength)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{NODE_NAME}: `{name}` must be in [0, 1], got {value}.")
        if s.steps < 1 or not 0.0 < s.denoise <= 1.0:
            raise ValueError(f"{NODE_NAME}: need steps >= 1 and 0 < denoise <= 1 (got {s.steps}, {s.denoise}).")
        if s.sampler_name not in comfy.samplers.KSampler.SAMPLERS:
            raise ValueError(f"{NODE_NAME}: unknown sampler {s.sampler_name!r}.")
        if s.scheduler not in comfy.samplers.KSampler.SCHEDULERS:
            raise ValueError(f"{NODE_NAME}: unknown scheduler {s.scheduler!r}.")
        if (self.control_net is None) != (self.control_hints is None):
            raise ValueError(f"{NODE_NAME}: connect both `control_net` and `control_hints` (one hint image per "
                             f"frame), or neither.")
        if self.control_hints is not None and self.control_hints.shape[0] != n:
            raise ValueError(f"{NODE_NAME}: `control_hints` has {self.control_hints.shape[0]} images for {n} "
                             f"frames; run the preprocessor on the same frames (one hint per frame).")
        flow_shape = None if self.flow is None else (self.flow.num_frames, self.flow.height, self.flow.width)
        if flow_shape is not None and flow_shape != (n, *frames.shape[1:3]):
            raise ValueError(f"{NODE_NAME}: `flow` covers {self.flow.num_frames} frames of "
                             f"{self.flow.width}x{self.flow.height} but `frames` is {n} of "
                             f"{frames.shape[2]}x{frames.shape[1]}; compute the flow on these frames.")
        model_channels = self.model.get_model_object("latent_format").latent_channels
        if vae.latent_channels != model_channels:
            raise ValueError(f"{NODE_NAME}: the VAE makes {vae.latent_channels}-channel latents but the model "
                             f"expects {model_channels}; use the VAE that belongs to the model.")
        factor = check_vae_size(frames, vae, NODE_NAME, "frames")
        self.latent_shape = (1, model_channels, frames.shape[1] // factor, frames.shape[2] // factor)

    def _check_flow_needed(self) -> None:
        uses_flow = self.schedule.executed_steps(self.shape_steps) or self.blend_steps
        if self.flow is None and uses_flow and len(self.keyframes.indices) > 1:
            raise ValueError(f"{NODE_NAME}: shape-aware or pixel-aware fusion is on but no `flow` is connected; "
                             f"connect the flow of these frames, or set those periods' start = end.")

    def _report_hidden_periods(self) -> None:
        periods = {"shape-aware fusion": self.shape_steps, "pixel-aware fusion": self.pixel_steps,
                   "AdaIN": self.adain_steps}
        if self.attention is not None:
            periods["cross-frame attention"] = constraints.period_steps(self.attention.start, self.attention.end,
                                                                        self.schedule.total_steps)
        for name, steps in periods.items():
            for line, inert in constraints.hidden_period_report({name: steps}, self.schedule.first_step,
                                                                self.schedule.total_steps):
                # the reference's shape-aware fusion is itself inert at its default denoise: a note, not a warning
                level = logging.INFO if name == "shape-aware fusion" or not inert else logging.WARNING
                logging.log(level, "%s: %s", NODE_NAME, line)
                self.stats.report.append(line)

    def _count_units(self) -> int:
        executed = len(self.schedule.executed) - 1
        keys = len(self.keyframes.indices)
        final = executed - (self.blend_steps[0] - self.schedule.first_step) if self.blend_steps else 0
        color = 0 if self.settings.color_preserve else self.schedule.total_steps
        return color + executed * keys + final * (keys - 1)

    # ------------------------------------------------------------------------------------------------------- run
    def run(self) -> Tuple[torch.Tensor, torch.Tensor, RenderStats]:
        """Render every key frame; returns (images [K,H,W,3], raw latents [K,C,h,w], stats). The attention caches
        are freed on return and on any exception or interrupt."""
        try:
            if self.attention is not None:
                self.attention.start_run(self.schedule.full)
            with torch.inference_mode():
                return self._render()
        finally:
            if self.attention is not None:
                self.stats.attention_cache_peak_bytes = max(self.stats.attention_cache_peak_bytes,
                                                            self.attention.nbytes())
                if self.attention.misses:
                    self.stats.report.append(f"cross-frame attention fell back to plain attention in "
                                             f"{self.attention.misses} calls at noise levels the anchor never "
                                             f"visited (an adaptive sampler).")
                self.attention.end_run()

    def _render(self):
        indices = self.keyframes.indices
        colour_reference = None if self.settings.color_preserve else self._colour_reference(indices[0])
        anchor_x0: Dict[int, torch.Tensor] = {}
        self._announce(0, indices[0])
        anchor_latent = self._render_anchor(indices[0], colour_reference, anchor_x0)
        anchor_image = self.vae.decode(anchor_latent)
        images, latents = [anchor_image], [anchor_latent]
        previous_index, previous_image = indices[0], anchor_image
        for number, index in enumerate(indices[1:], start=1):
            self._announce(number, index)
            latent = self._render_key_frame(number, index, previous_index, anchor_image, previous_image,
                                            colour_reference, anchor_x0)
            image = self.vae.decode(latent)
            if self.attention is not None:
                self._note_cache_size()
                self.attention.commit_previous()
            images.append(image)
            latents.append(latent)
            previous_index, previous_image = index, image
        return torch.cat(images), torch.cat(latents), self.stats

    def _announce(self, number: int, index: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if self.on_key_frame is not None:
            self.on_key_frame(number, index, len(self.keyframes.indices))

    def _note_cache_size(self) -> None:
        self.stats.attention_cache_peak_bytes = max(self.stats.attention_cache_peak_bytes, self.attention.nbytes())

    # ----------------------------------------------------------------------------------------------------- frames
    def _conditioning(self, index: int):
        """positive/negative with the ControlNet seeing this frame's own hint (the host's ControlNet apply)."""
        if self.control_net is None:
            return self.positive, self.negative
        import nodes
        hint = self.control_hints[index:index + 1]
        return nodes.ControlNetApplyAdvanced().apply_controlnet(
            self.positive, self.negative, self.control_net, hint, self.settings.control_strength, 0.0, 1.0,
            vae=self.vae.vae)

    def _encode_frame(self, index: int, colour_reference: Optional[torch.Tensor]) -> torch.Tensor:
        frame = self.frames[index:index + 1]
        if colour_reference is not None:
            frame = _nhwc(constraints.match_colours(_nchw(frame), _nchw(colour_reference)))
        return self.vae.encode(frame)

    def _colour_reference(self, anchor_index: int) -> torch.Tensor:
        """colour_preserve off (reference §1.8): the anchor rendered from pure noise sets the palette that every
        key frame's input is matched to."""
        empty = comfy.sample.fix_empty_latent_channels(self.model, torch.zeros(self.latent_shape))
        sampler = comfy.samplers.sampler_object(self.settings.sampler_name)
        latent = self._sample(self.model, empty, self._conditioning(anchor_index), sampler, self.schedule.full,
                              StepInfo(0, anchor_index, "colour", 0, None, 0, 0), step_base=0)
        return self.vae.decode(latent)

    def _render_anchor(self, index: int, colour_reference, anchor_x0) -> torch.Tensor:
        latent = self._encode_frame(index, colour_reference)
        model = self.model
        records = len(self.keyframes.indices) > 1 and self.schedule.executed_steps(self.shape_steps | self.adain_steps)
        if records:
            model = self._with_x0_constraints(X0Constraints(self.schedule.full, self.model_sampling, self.adain_steps,
                                                            self.shape_steps, anchor_x0, record=True))
        if self.attention is not None:
            self.attention.mode = Mode.ANCHOR
        sampler = comfy.samplers.sampler_object(self.settings.sampler_name)
        out = self._sample(model, latent, self._conditioning(index), sampler, self.schedule.executed,
                           StepInfo(0, index, "anchor", 0, None, 0, 0))
        if self.attention is not None:
            self.attention.commit_anchor()
            self._note_cache_size()
        return out

    def _render_key_frame(self, number, index, previous_index, anchor_image, previous_image, colour_reference,
                          anchor_x0) -> torch.Tensor:
        """Rough pass, then (with pixel-aware fusion) the final pass resumed from the rough pass's state at the
        first blend step. Sampling is split after every x̂0-edit step (to carry the edit into x) and at every blend
        step; without edits or blends it is the host's sampler run as is."""
        latent = self._encode_frame(index, colour_reference)
        conditioning = self._conditioning(index)
        fusion_field = None
        if self.schedule.executed_steps(self.shape_steps):
            flow, occlusion = self.flow.pair(self.keyframes.indices[0], index)
            fusion_field = tuple(t.to(self.device) for t in
                                 constraints.latent_warp_field(flow, occlusion, tuple(latent.shape[-2:])))
        first, executed = self.schedule.first_step, self.schedule.executed
        edit_steps = self.schedule.executed_steps(self.shape_steps | self.adain_steps)
        carry_at = {step + 1 - first for step in edit_steps if step + 1 < self.schedule.total_steps}

        def edited_model():
            if not edit_steps:
                return None, self.model
            edit = X0Constraints(self.schedule.full, self.model_sampling, self.adain_steps, self.shape_steps,
                                 anchor_x0, fusion_field=fusion_field)
            return edit, self._with_x0_constraints(edit)

        if self.attention is not None:
            self.attention.mode = Mode.KEY_FRAME  # the final pass overwrites what differs from the rough pass
        base = comfy.samplers.sampler_object(self.settings.sampler_name)
        info = StepInfo(number, index, "single" if not self.blend_steps else "rough", 0, None, 0, 0)
        resume_at = self.blend_steps[0] - first if self.blend_steps else None
        snapshot = {}
        edit, model = edited_model()
        boundaries = carry_at | ({resume_at} if self.blend_steps else set())
        sampler = base if not boundaries else segmented_sampler(
            base, boundaries, self._boundary(edit, executed, snapshot_at=resume_at, snapshot=snapshot))
        rough = self._sample(model, latent, conditioning, sampler, executed, info)
        if not self.blend_steps:
            return rough

        target, mask = self._blend_target(index, previous_index, anchor_image, previous_image, rough,
                                          tuple(latent.shape[-2:]))
        tail = executed[resume_at:]
        blend_at = {step - first - resume_at for step in self.blend_steps}
        edit, model = edited_model()
        sampler = segmented_sampler(base, blend_at | {c - resume_at for c in carry_at if c > resume_at},
                                    self._boundary(edit, tail, resume=snapshot, blend_at=blend_at,
                                                   blend=self._blend_function(target, mask, latent)),
                                    index_offset=resume_at)
        return self._sample(model, latent, conditioning, sampler, tail, dataclasses.replace(info, pass_name="final"),
                            step_base=first + resume_at)

    @staticmethod
    def _boundary(edit: Optional[X0Constraints], sigmas, snapshot_at=None, snapshot=None, resume=None,
                  blend_at=frozenset(), blend=None) -> Callable:
        """What happens where sampling is split: resume from a snapshot (index 0 of the final pass) or carry the
        last x̂0 edit into x; keep a snapshot; blend toward the reference."""
        def on_boundary(index, x, last_x0):
            if resume is not None and index == 0:
                x, last_x0 = resume["x"], resume["x0"]
            elif edit is not None:
                x = edit.carry_into_state(x, sigmas[index])
            if index == snapshot_at:
                snapshot.update(x=x.clone(), x0=None if last_x0 is None else last_x0.clone())
            if index in blend_at:
                x = blend(x, sigmas[index], last_x0)
            return x
        return on_boundary

    # ------------------------------------------------------------------------------------ pixel-aware fusion (§1.6)
    def _blend_target(self, index, previous_index, anchor_image, previous_image, rough_latent, latent_size):
        """x_trg = E*(R) in the model's latent space and the latent validity mask M."""
        anchor_index = self.keyframes.indices[0]
        rough_image = self.vae.decode(rough_latent)
        pixels = rough_image.device
        anchor_flow, anchor_occlusion = self.flow.pair(anchor_index, index, device=pixels)
        previous_flow, previous_occlusion = self.flow.pair(previous_index, index, device=pixels)
        reference = constraints.pixel_reference(_nchw(rough_image), _nchw(anchor_image).to(pixels),
                                                _nchw(previous_image).to(pixels), anchor_flow, anchor_occlusion,
                                                previous_flow, previous_occlusion)
        mask = constraints.inpaint_mask(anchor_occlusion, previous_occlusion, latent_size)
        encoded, _ = fidelity_encode(self.vae.encode, self.vae.decode, _nhwc(reference).clamp(0.0, 1.0),
                                     self.settings.fidelity_strength, self.settings.fidelity_threshold)
        latent_format_in = self.model.model.process_latent_in
        mask = mask.to(self.device)
        return latent_format_in(encoded.to(self.device)) * mask, mask

    def _blend_function(self, target, mask, latent) -> Callable:
        """x <- w·(a·x_trg + σ·noise) + (1-w)·a·x̂0 + r·(x - a·x̂0) before a blend step's model call; x̂0 is the last
        prediction (the frame's own latent before the first call); fresh noise from a seeded generator, as the
        reference's q_sample."""
        s = self.settings
        weight, noise_keep = constraints.blend_weights(mask, s.mask_strength, s.inner_strength, s.smooth_boundary)
        generator = torch.Generator(device="cpu").manual_seed(s.seed + 1)
        first_signal = self.model.model.process_latent_in(latent.to(self.device))

        def blend(x, sigma, last_x0):
            signal_x0 = first_signal if last_x0 is None else last_x0
            signal = self.model_sampling.noise_scaling(sigma, torch.zeros_like(x), signal_x0)
            fresh = torch.randn(x.shape, generator=generator).to(x)
            noised_reference = self.model_sampling.noise_scaling(sigma, fresh, target.to(x))
            return constraints.blend_toward_reference(x, signal, noised_reference, weight, noise_keep)

        return blend

    # ---------------------------------------------------------------------------------------------------- sampling
    def _with_x0_constraints(self, edit: X0Constraints):
        patched = self.model.clone()
        patched.set_model_sampler_post_cfg_function(edit)
        return patched

    def _sample(self, model, latent, conditioning, sampler, sigmas, info: StepInfo, step_base=None):
        """One host sampling run of a single frame, seeded as the reference does (same noise for every frame)."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        base = self.schedule.first_step if step_base is None else step_base
        noise = comfy.sample.prepare_noise(latent, self.settings.seed)

        def callback(i, x0, x, total):
            self._done += 1
            if self.on_step is not None:
                self.on_step(dataclasses.replace(info, step=base + i, x0=x0, done=self._done, total=self.total_units))

        positive, negative = conditioning
        return comfy.sample.sample_custom(model, noise, self.settings.cfg, sampler, sigmas, positive, negative, latent,
                                          callback=callback, disable_pbar=True, seed=self.settings.seed)
