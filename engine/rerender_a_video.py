"""Host-bound orchestration of Rerender's key frame translation (reference §1.3-1.9b) on any host sampler.

Per run and per shot (the key frame selection's shots; one without cuts): the shot's anchor (its first key frame)
is rendered once with plain attention while its attention inputs and x̂0 per model evaluation are cached; every
later key frame of the shot, in order, gets
  rough pass  - cross-frame attention, AdaIN and shape-aware x̂0 fusion,
  pixel reference from the warped anchor / previous outputs, fidelity encode E*, then
  final pass  - the same plus the pre-UNet blend toward the noised reference in the pixel-fusion steps;
the final pass also refreshes the "previous key frame" attention cache. A new shot starts from a new anchor with
empty caches, so no constraint reads a frame of another shot.

Each pass is ONE call of the host's sampler over the whole schedule (`engine.sampling`): the blend and the x̂0
edits change the state the model is evaluated at from inside that call, so no step is skipped, multistep history
is kept and every sampler takes an edit δ as the reference's DDIM does (state moved by exactly δ). Evaluations
before the first blend are identical in both passes (same seed, same constraints), so the final pass replays the
rough pass's model outputs there instead of calling the model: about 1.6x the cost of one pass with the default
periods.
"""
import dataclasses
import logging
import time
from typing import Callable, Dict, List, Optional, Tuple

import comfy.model_management
import comfy.sample
import comfy.samplers
import torch

from ..rerender.rerender_a_video import keyframe_constraints as constraints
from ..rerender.adain import adain, channel_stats
from ..rerender.rerender_a_video.cross_frame_attention import CrossFrameAttention, Mode
from ..rerender.evaluation_plan import Evaluation, EvaluationPlan
from ..rerender.fidelity import fidelity_encode
from .control_hints import check_control_hints, conditioning_for_frames
from .cross_frame_attention import find_cross_frame_attention
from .vae import check_vae_size
from .sampling import SteeringHooks, schedule_refusal, steered_sampler

NODE_NAME = "Key Frame Sampler"


@dataclasses.dataclass(frozen=True)
class KeyframeSettings:
    """Every knob of a run; periods are (start, end) fractions of the full schedule (start >= end: off)."""
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
    x0_misses: int = 0
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


def check_render_inputs(node: str, frames, keyframes, flow, model, vae, positive, negative) -> int:
    """The checks every key frame renderer makes before sampling, so a wrong wire fails at once with a message that
    says which: the frames batch, key frames of another clip, a flow of another clip, per-frame hints of another
    length, a VAE of another model family or a size it would crop. Returns the VAE's spatial factor."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"{node}: `frames` must be a non-empty IMAGE batch [N,H,W,3].")
    n = frames.shape[0]
    if getattr(keyframes, "num_frames", None) != n:
        raise ValueError(f"{node}: `keyframes` were picked for {getattr(keyframes, 'num_frames', '?')} "
                         f"frames but `frames` has {n}; pick the key frames from the same clip.")
    if flow is not None and not flow.matches_clip(frames, keyframes.indices):
        raise ValueError(f"{node}: `flow` was estimated on another clip ({flow.num_frames} frames of "
                         f"{flow.width}x{flow.height}, different pictures at the key frames) than `frames` ({n} of "
                         f"{frames.shape[2]}x{frames.shape[1]}); compute the flow on these frames.")
    check_control_hints({"positive": positive, "negative": negative}, n, node)
    model_channels = model.get_model_object("latent_format").latent_channels
    if vae.latent_channels != model_channels:
        raise ValueError(f"{node}: the VAE makes {vae.latent_channels}-channel latents but the model "
                         f"expects {model_channels}; use the VAE that belongs to the model.")
    return check_vae_size(frames, vae, node, "frames")


class KeyframePass(SteeringHooks):
    """What one pass does at each model evaluation (`engine.sampling` hooks).

    before: tell cross-frame attention which evaluation runs; in a blend step, blend the state toward the noised
    reference, with the previous step's edited x̂0 (the reference's rule, whatever evaluations a multi-evaluation
    sampler makes in between). after: at each step's own evaluation, record the anchor's x̂0 (`record`) or edit the key frame's:
    AdaIN to the anchor's statistics, then shape-aware fusion with the warped anchor x̂0 (reference update_x0),
    each against the anchor's evaluation with the same index and σ. Rough passes with a blend keep their model
    outputs up to the first blend step; the final pass replays them there."""

    def __init__(self, renderer: "KeyframeRenderer", info: "StepInfo", anchor_x0: Dict[int, tuple],
                 record: bool = False, fusion_field=None, blend: Optional[Callable] = None,
                 replay: Optional[Dict[int, torch.Tensor]] = None, keep_for_replay: bool = False):
        self.renderer, self.info, self.anchor_x0, self.record = renderer, info, anchor_x0, record
        self.fusion_field, self.blend, self.replayed = fusion_field, blend, replay
        self.kept: Optional[Dict[int, torch.Tensor]] = {} if keep_for_replay else None
        self.replay_until, self.last_x0 = 0, None
        self.adain_steps, self.fusion_steps = renderer.adain_steps, renderer.shape_steps
        self.blend_steps = frozenset(renderer.blend_steps) if blend is not None else frozenset()

    def start(self, plan: EvaluationPlan) -> None:
        super().start(plan)
        blends = self.renderer.blend_steps
        first = plan.first_evaluation_of_step(blends[0]) if blends else None
        self.replay_until = len(plan) if first is None else first
        self.renderer.note_plan(plan)

    def before(self, evaluation: Evaluation, state: torch.Tensor) -> Optional[torch.Tensor]:
        if self.renderer.attention is not None:
            self.renderer.attention.evaluation = evaluation
        if evaluation.starts_step and evaluation.step in self.blend_steps:
            return self.blend(state, torch.tensor(evaluation.key.sigma), self.last_x0)
        return None

    def replay(self, evaluation: Evaluation) -> Optional[torch.Tensor]:
        if self.replayed is not None and evaluation.key.index < self.replay_until:
            return self.replayed[evaluation.key.index]
        return None

    def records_previous(self, evaluation: Evaluation) -> bool:
        """A rough pass followed by a final pass leaves the entries the final pass recomputes to the final pass."""
        return self.kept is None or evaluation.key.index < self.replay_until

    def after(self, evaluation: Evaluation, state: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        index = evaluation.key.index
        if self.kept is not None and index < self.replay_until:
            self.kept[index] = denoised
        edited = denoised
        if evaluation.starts_step:
            edited = self._edit(evaluation, denoised)
            if self.replayed is None or index >= self.replay_until:
                self.renderer.step_done(self.info, evaluation.step, edited)
            self.last_x0 = edited  # the step's edited x̂0, not a later correction's (Heun's at σ_{i+1})
        return edited

    def _edit(self, evaluation: Evaluation, x0: torch.Tensor) -> torch.Tensor:
        step, key = evaluation.step, evaluation.key
        if step not in self.adain_steps and step not in self.fusion_steps:
            return x0
        if self.record:
            self.anchor_x0[key.index] = (key.sigma, x0.detach().clone())
            return x0
        entry = self.anchor_x0.get(key.index)
        if entry is None or abs(entry[0] - key.sigma) > 1e-4 * max(key.sigma, 1e-8):
            self.renderer.stats.x0_misses += 1
            return x0
        anchor = entry[1]
        edited = x0
        if step in self.adain_steps:
            edited = adain(edited, *channel_stats(anchor))
        if step in self.fusion_steps and self.fusion_field is not None:
            edited = constraints.fuse_x0(edited, anchor, *self.fusion_field)
        return edited


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
                 settings: KeyframeSettings, on_step: Optional[Callable[[StepInfo], None]] = None,
                 on_key_frame: Optional[Callable[[int, int, int], None]] = None):
        self.model, self.positive, self.negative = model, positive, negative
        self.frames, self.keyframes, self.flow, self.settings = frames, keyframes, flow, settings
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
        self._plans: Dict[tuple, EvaluationPlan] = {}
        self._plan_checked = False

    # ------------------------------------------------------------------------------------------------ validation
    def _validate(self, vae) -> None:
        problem = validate_settings(self.settings)
        if problem:
            raise ValueError(problem)
        factor = check_render_inputs(NODE_NAME, self.frames, self.keyframes, self.flow, self.model, vae,
                                     self.positive, self.negative)
        self.latent_shape = (1, vae.latent_channels, self.frames.shape[1] // factor, self.frames.shape[2] // factor)

    def _check_flow_needed(self) -> None:
        uses_flow = self.schedule.executed_steps(self.shape_steps) or self.blend_steps
        if self.flow is None and uses_flow and any(len(keys) > 1 for keys in self.keyframes.shot_keys()):
            raise ValueError(f"{NODE_NAME}: shape-aware or pixel-aware fusion is on but no `flow` is connected; "
                             f"connect the flow of these frames, or set those periods' start >= end.")

    def _report_hidden_periods(self) -> None:
        """Constraint periods the denoise start hides, as a warning (inert) or a note (weakened). The default
        shape-aware period (0, 0.1) is the reference's, which is inert below denoise 0.85 at its own defaults
        (ALGORITHMS.md 1.3): it is kept as the code has it and not reported, so that the shipped settings never
        advise changing themselves; a shape-aware period the user set is reported as any other."""
        s, total = self.settings, self.schedule.total_steps
        periods = {"shape-aware fusion": (s.shape_period[0], self.shape_steps),
                   "pixel-aware fusion": (s.pixel_period[0], self.pixel_steps),
                   "AdaIN": (s.adain_period[0], self.adain_steps)}
        if s.shape_period == KeyframeSettings().shape_period:
            del periods["shape-aware fusion"]
        if self.attention is not None:
            periods["cross-frame attention"] = (self.attention.start, constraints.period_steps(
                self.attention.start, self.attention.end, total))
        for line, inert in constraints.hidden_period_report(periods, self.schedule.first_step, total):
            logging.log(logging.WARNING if inert else logging.INFO, "%s: %s", NODE_NAME, line)
            self.stats.report.append(line)

    def note_plan(self, plan: EvaluationPlan) -> None:
        """Once per run: report constraint steps at which this sampler never evaluates the model at the step's own
        state (none for the host's samplers with their usual schedules)."""
        if self._plan_checked:
            return
        self._plan_checked = True
        for name, steps in (("shape-aware fusion", self.shape_steps), ("pixel-aware fusion", self.pixel_steps),
                            ("AdaIN", self.adain_steps)):
            missing = plan.steps_without_start(self.schedule.executed_steps(steps))
            if missing:
                self.stats.report.append(f"{name}: {self.settings.sampler_name} makes no model evaluation at the "
                                         f"state entering steps {missing}, so it cannot act there.")

    def _count_units(self) -> int:
        executed = len(self.schedule.executed) - 1
        keys, anchors = len(self.keyframes.indices), len(self.keyframes.shot_keys())
        final = executed - (self.blend_steps[0] - self.schedule.first_step) if self.blend_steps else 0
        color = 0 if self.settings.color_preserve else self.schedule.total_steps
        return color * anchors + executed * keys + final * (keys - anchors)

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
                self._note_cache_size()
                if self.attention.misses:
                    self.stats.report.append(f"cross-frame attention fell back to plain attention in "
                                             f"{self.attention.misses} calls: the anchor has no evaluation at "
                                             f"that σ.")
                self.attention.end_run()
            if self.stats.x0_misses:
                self.stats.report.append(f"AdaIN / shape-aware fusion skipped {self.stats.x0_misses} evaluations: "
                                         f"the anchor has no x̂0 at that σ.")

    def _render(self):
        images, latents = [], []
        for keys in self.keyframes.shot_keys():
            self._render_shot(keys, images, latents)
        return torch.cat(images), torch.cat(latents), self.stats

    def _render_shot(self, keys: tuple, images: list, latents: list) -> None:
        """One shot's key frames, appended to `images`/`latents`: its own anchor (and colour reference), and no
        cache, x̂0 or previous output carried over from another shot."""
        anchor = keys[0]
        colour_reference = None if self.settings.color_preserve else self._colour_reference(anchor)
        anchor_x0: Dict[int, tuple] = {}
        if self.attention is not None:
            self.attention.new_anchor()
        self._announce(len(images), anchor)
        anchor_latent = self._render_anchor(anchor, len(keys) > 1, colour_reference, anchor_x0)
        anchor_image = self.vae.decode(anchor_latent)
        images.append(anchor_image)
        latents.append(anchor_latent)
        previous_index, previous_image = anchor, anchor_image
        for index in keys[1:]:
            number = len(images)
            self._announce(number, index)
            latent = self._render_key_frame(number, index, anchor, previous_index, anchor_image, previous_image,
                                            colour_reference, anchor_x0)
            image = self.vae.decode(latent)
            if self.attention is not None:
                self._note_cache_size()
            images.append(image)
            latents.append(latent)
            previous_index, previous_image = index, image

    def _announce(self, number: int, index: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if self.on_key_frame is not None:
            self.on_key_frame(number, index, len(self.keyframes.indices))

    def _note_cache_size(self) -> None:
        self.stats.attention_cache_peak_bytes = max(self.stats.attention_cache_peak_bytes, self.attention.nbytes())

    def step_done(self, info: "StepInfo", step: int, x0: torch.Tensor) -> None:
        self._done += 1
        if self.on_step is not None:
            self.on_step(dataclasses.replace(info, step=step, x0=x0, done=self._done, total=self.total_units))

    # ----------------------------------------------------------------------------------------------------- frames
    def _conditioning(self, index: int):
        """positive/negative with every upstream ControlNet seeing this frame's own hint."""
        memo = {}
        n = len(self.frames)
        return (conditioning_for_frames(self.positive, [index], n, memo),
                conditioning_for_frames(self.negative, [index], n, memo))

    def _encode_frame(self, index: int, colour_reference: Optional[torch.Tensor]) -> torch.Tensor:
        frame = self.frames[index:index + 1]
        if colour_reference is not None:
            frame = _nhwc(constraints.match_colours(_nchw(frame), _nchw(colour_reference)))
        return self.vae.encode(frame)

    def _colour_reference(self, anchor_index: int) -> torch.Tensor:
        """colour_preserve off (reference §1.8): the anchor rendered from pure noise sets the palette that every
        key frame's input is matched to."""
        empty = comfy.sample.fix_empty_latent_channels(self.model, torch.zeros(self.latent_shape))
        hooks = KeyframePass(self, StepInfo(0, anchor_index, "colour", 0, None, 0, 0), {})
        hooks.adain_steps = hooks.fusion_steps = frozenset()
        latent = self._sample(self.model, empty, self._conditioning(anchor_index), hooks, self.schedule.full,
                              first_step=0)
        return self.vae.decode(latent)

    def _render_anchor(self, index: int, record: bool, colour_reference, anchor_x0) -> torch.Tensor:
        """`record`: keep the anchor's x̂0 for the shot's later key frames."""
        latent = self._encode_frame(index, colour_reference)
        hooks = KeyframePass(self, StepInfo(0, index, "anchor", 0, None, 0, 0), anchor_x0, record=record)
        if self.attention is not None:
            self.attention.mode = Mode.ANCHOR
        out = self._sample(self.model, latent, self._conditioning(index), hooks, self.schedule.executed)
        if self.attention is not None:
            self.attention.commit_anchor()
            self._note_cache_size()
        return out

    def _render_key_frame(self, number, index, anchor_index, previous_index, anchor_image, previous_image,
                          colour_reference, anchor_x0) -> torch.Tensor:
        """Rough pass, then (with pixel-aware fusion) the final pass, which replays the rough pass's model outputs
        up to the first blend step."""
        latent = self._encode_frame(index, colour_reference)
        conditioning = self._conditioning(index)
        fusion_field = None
        if self.schedule.executed_steps(self.shape_steps):
            flow, occlusion = self.flow.pair(anchor_index, index)
            fusion_field = tuple(t.to(self.device) for t in
                                 constraints.latent_warp_field(flow, occlusion, tuple(latent.shape[-2:])))
        info = StepInfo(number, index, "single" if not self.blend_steps else "rough", 0, None, 0, 0)
        rough_pass = KeyframePass(self, info, anchor_x0, fusion_field=fusion_field,
                                  keep_for_replay=bool(self.blend_steps))
        if self.attention is not None:
            self.attention.mode = Mode.KEY_FRAME
            self.attention.records_previous = rough_pass.records_previous
        rough = self._sample(self.model, latent, conditioning, rough_pass, self.schedule.executed)
        if not self.blend_steps:
            return rough

        target, mask = self._blend_target(index, anchor_index, previous_index, anchor_image, previous_image, rough,
                                          tuple(latent.shape[-2:]))
        final_pass = KeyframePass(self, dataclasses.replace(info, pass_name="final"), anchor_x0,
                                  fusion_field=fusion_field, blend=self._blend_function(target, mask, latent),
                                  replay=rough_pass.kept)
        if self.attention is not None:
            self.attention.records_previous = final_pass.records_previous
        return self._sample(self.model, latent, conditioning, final_pass, self.schedule.executed)

    # ------------------------------------------------------------------------------------ pixel-aware fusion (§1.6)
    def _blend_target(self, index, anchor_index, previous_index, anchor_image, previous_image, rough_latent,
                      latent_size):
        """x_trg = E*(R) in the model's latent space and the latent validity mask M."""
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
        (edited) prediction, the frame's own latent before the first call; fresh noise from a seeded generator, as
        the reference's q_sample."""
        s = self.settings
        weight, noise_keep = constraints.blend_weights(mask, s.mask_strength, s.inner_strength, s.smooth_boundary)
        generator = torch.Generator(device="cpu").manual_seed(s.seed + 1)
        first_signal = self.model.model.process_latent_in(latent.to(self.device))

        def blend(x, sigma, last_x0):
            sigma = sigma.to(x.device, x.dtype)
            signal_x0 = first_signal.to(x) if last_x0 is None else last_x0
            signal = self.model_sampling.noise_scaling(sigma, torch.zeros_like(x), signal_x0)
            fresh = torch.randn(x.shape, generator=generator).to(x)
            noised_reference = self.model_sampling.noise_scaling(sigma, fresh, target.to(x))
            return constraints.blend_toward_reference(x, signal, noised_reference, weight, noise_keep)

        return blend

    # ---------------------------------------------------------------------------------------------------- sampling
    def _sample(self, model, latent, conditioning, hooks: KeyframePass, sigmas, first_step=None):
        """One host sampling run of a single frame over `sigmas`, seeded as the reference does (same noise for
        every frame), with `hooks` at every model evaluation."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        first = self.schedule.first_step if first_step is None else first_step
        schedule = self.schedule.full
        sampler = steered_sampler(self.settings.sampler_name, hooks, schedule, first, plans=self._plans)
        noise = comfy.sample.prepare_noise(latent, self.settings.seed)
        positive, negative = conditioning
        try:
            return comfy.sample.sample_custom(model, noise, self.settings.cfg, sampler, sigmas.clone(), positive,
                                              negative, latent, disable_pbar=True, seed=self.settings.seed)
        finally:
            if self.attention is not None:
                self.attention.evaluation = None


def validate_settings(s: KeyframeSettings) -> Optional[str]:
    """What is wrong with the widget values alone (the node refuses them at queue time), else None."""
    for name, period in (("shape-aware fusion", s.shape_period), ("pixel-aware fusion", s.pixel_period),
                         ("AdaIN", s.adain_period)):
        try:
            constraints.validate_period(f"{NODE_NAME}: {name} start/end", *period)
        except ValueError as error:
            return str(error)
    for name, value in (("mask_strength", s.mask_strength), ("inner_strength", s.inner_strength)):
        if not 0.0 <= value <= 1.0:
            return f"{NODE_NAME}: `{name}` must be in [0, 1], got {value}."
    return schedule_refusal(s.steps, s.denoise, s.sampler_name, s.scheduler, NODE_NAME)
