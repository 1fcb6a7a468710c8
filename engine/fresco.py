"""Host-bound orchestration of FRESCO's key frame translation (reference §4.1-4.7) on any host sampler.

The key frames are rendered in batches with shared anchors (`rerender.fresco.geometry.plan_batches`). Per batch:
  precomputation - cyclic flows of the batch from the pack's flow stage (with FRESCO's photometric test); unique-
                   region masks, trajectories and grids are made on first use per token grid;
  reference pass - one model evaluation at the smallest noise level of the schedule, without ControlNet: the
                   FRESCO layers' self-attention Q/K (spatial-guided attention) and the decoder up-block inputs
                   (Gram references of the spatial loss) are recorded;
  sampling       - ONE call of the host's sampler over the batch (`engine.sampling`): before every evaluation the
                   anchor slots are overwritten with the previous batch's latents of the same evaluation and this
                   batch's first and last slot are recorded; the FRESCO layers run FRESCO-guided attention
                   (attn1_replace) and the up-block inputs are optimised (output_block_patch) in their steps; x̂0 is
                   background-smoothed in image space in its steps, and the smoothed x̂0 enters the running sampler
                   as its own prediction would (`x0_edit_rule = "sampler"`): with ddpm, the reference's DDPM
                   posterior mean of the smoothed x̂0 (pipe_FRESCO.step), the state moved by β_t/(1-ᾱ_t)·δ.
Everything lives on a clone of the model made for the run; the model passed in is never changed.
"""
import dataclasses
import logging
from typing import Callable, Dict, List, Optional, Tuple

import comfy.model_management
import comfy.sample
import comfy.samplers
import torch
from comfy.ldm.modules.attention import BasicTransformerBlock, optimized_attention, optimized_attention_masked
from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample

from ..rerender.fresco import attention as fa
from ..rerender.fresco import geometry as fresco
from ..rerender.fresco import optimize as fo
from ..rerender.rerender_a_video import keyframe_constraints as constraints
from ..rerender.evaluation_plan import Evaluation
from .control_hints import conditioning_for_frames
from .rerender_a_video import CountingVAE, RenderStats, Schedule, check_render_inputs
from .sampling import SteeringHooks, schedule_refusal, steered_sampler

NODE_NAME = "FRESCO Key Frames"
MiB = 2 ** 20
LayerKey = Tuple[str, int, int]


@dataclasses.dataclass(frozen=True)
class FrescoSettings:
    """Every knob of a run. Periods are (start, end) fractions of the full schedule, steps T·start <= i <= T·end
    (start >= end: off); the defaults are the reference's steps of its 20-step schedule."""
    seed: int = 0
    steps: int = 15
    cfg: float = 7.5
    sampler_name: str = "ddpm"
    scheduler: str = "ddim_uniform"
    denoise: float = 0.75
    batch_size: int = 8
    cross_frame_period: Tuple[float, float] = (0.0, 1.0)     # every step
    spatial_guided_steps: int = 1                             # the first executed step
    temporal_guided_period: Tuple[float, float] = (0.0, 0.6)  # t >= 350 of 1000: steps 0..12 of 20
    optimization_period: Tuple[float, float] = (0.0, 0.7)     # timesteps[:15]: steps 0..14 of 20
    spatial_loss: bool = True
    temporal_loss: bool = True
    iterations: int = fo.ITERATIONS
    learning_rate: float = fo.LEARNING_RATE
    loss_form: str = fo.DEFAULT_FORM                          # "code" (official) or "paper" (Eq. 5/6)
    smoothing_period: Tuple[float, float] = (0.8, 0.85)       # steps 16 and 17 of 20


PERIODS = (("cross-frame attention", "cross_frame_period"), ("temporal-guided attention", "temporal_guided_period"),
           ("feature optimisation", "optimization_period"), ("background smoothing", "smoothing_period"))


def validate_settings(s: FrescoSettings) -> Optional[str]:
    """What is wrong with the widget values alone (refused at queue time), else None."""
    for label, field in PERIODS:
        try:
            constraints.validate_period(f"{NODE_NAME}: {label} start/end", *getattr(s, field))
        except ValueError as error:
            return str(error)
    if s.batch_size < fresco.MIN_BATCH_SIZE:
        return (f"{NODE_NAME}: `batch_size` must be at least {fresco.MIN_BATCH_SIZE} (two shared anchors and one new "
                f"key frame per batch), got {s.batch_size}.")
    if s.spatial_guided_steps < 0 or s.iterations < 0:
        return f"{NODE_NAME}: `spatial_guided_steps` and `iterations` must be >= 0."
    if s.learning_rate <= 0:
        return f"{NODE_NAME}: `learning_rate` must be positive, got {s.learning_rate}."
    if s.loss_form not in fo.LOSS_FORMS:
        return f"{NODE_NAME}: `loss_form` must be one of {', '.join(fo.LOSS_FORMS)}, got {s.loss_form!r}."
    return schedule_refusal(s.steps, s.denoise, s.sampler_name, s.scheduler, NODE_NAME)


def plan_shot_batches(keyframes, batch_size: int) -> List[Tuple[int, fresco.KeyFrameBatch]]:
    """(shot number, batch) in rendering order: FRESCO's batches planned within each shot, so that no batch, anchor
    or flow pair reaches across a cut (each shot's first key is its own global anchor). A shot with a single key
    (a one-frame shot) is a batch of its own."""
    shots = keyframes.shot_keys() if hasattr(keyframes, "shot_keys") else [tuple(keyframes.indices)]
    planned = []
    for shot, keys in enumerate(shots):
        batches = fresco.plan_batches(keys, batch_size) if len(keys) > 1 else [fresco.KeyFrameBatch(tuple(keys))]
        planned += [(shot, batch) for batch in batches]
    return planned


# ------------------------------------------------------------------------------------------------- model layout
def _decoder_levels(unet) -> List[int]:
    """Resolution level of every output block (0 = coarsest), counted by the upsamplers before it."""
    levels, level = [], 0
    for block in unet.output_blocks:
        levels.append(level)
        if any(isinstance(m, Upsample) for m in block.modules()):
            level += 1
    return levels


def fresco_layers(model) -> List[LayerKey]:
    """The self-attention layers FRESCO guides: the decoder's two finest levels (SD1.5's up_blocks.2 and .3, the
    6 layers at 1/16 and 1/8 of the image; on SDXL, whose finest level has no attention, its 640-channel layers)."""
    unet = model.get_model_object("diffusion_model")
    levels = _decoder_levels(unet)
    attended = []
    for number, block in enumerate(unet.output_blocks):
        for spatial in (m for m in block.modules() if hasattr(m, "transformer_blocks")):
            for index, transformer in enumerate(spatial.transformer_blocks):
                if isinstance(transformer, BasicTransformerBlock) and not transformer.disable_self_attn:
                    attended.append((levels[number], ("output", number, index)))
    finest = max(levels)
    return [key for level, key in attended if level >= finest - 1]


def up_block_inputs(model) -> List[int]:
    """Output block numbers whose input is a decoder up-block's input (the first block of each level)."""
    levels = _decoder_levels(model.get_model_object("diffusion_model"))
    return [number for number, level in enumerate(levels) if number == 0 or levels[number - 1] != level]


def _layer(extra_options) -> LayerKey:
    block = extra_options["block"]
    return block[0], block[1], extra_options.get("block_index", 0)


def _without_control(conditioning):
    return [[tensor, {k: v for k, v in options.items() if k != "control"}] for tensor, options in conditioning]


# ------------------------------------------------------------------------------------------------ batch geometry
@dataclasses.dataclass(frozen=True)
class Components:
    """Which FRESCO components act at the evaluation being run."""
    cross_frame: bool = False
    spatial: bool = False
    temporal: bool = False
    optimize: bool = False


class BatchGeometry:
    """What a batch's attention and optimisation read: flows, masks, trajectories, references; freed with it."""

    def __init__(self, batch: fresco.KeyFrameBatch, flows: Optional[fresco.CyclicFlows], images: torch.Tensor,
                 latent_size: Tuple[int, int], background: Optional[torch.Tensor]):
        self.batch, self.flows, self.images, self.background = batch, flows, images, background
        self.frames = len(batch.frames)
        self.latent_size = latent_size
        self._unique: Dict[Tuple[int, int], torch.Tensor] = {}
        self._trajectories: Dict[Tuple[int, int], fresco.Trajectories] = {}
        self.reference_qk: Dict[Tuple[LayerKey, int], Tuple[torch.Tensor, torch.Tensor]] = {}
        self.gram: Dict[Tuple[int, int], fo.GramReference] = {}

    def grid(self, tokens: int) -> Tuple[int, int]:
        h, w = self.latent_size
        for level in range(8):
            size = (-(-h // 2 ** level), -(-w // 2 ** level))
            if size[0] * size[1] == tokens:
                return size
        raise ValueError(f"{NODE_NAME}: an attention layer has {tokens} tokens, no downsampling of the "
                         f"{w}x{h} latent; another patch changed the model's layout.")

    def unique_index(self, size) -> torch.Tensor:
        if size not in self._unique:
            mask = fresco.unique_region_masks(self.flows, [size])[size]
            self._unique[size] = fa.unique_token_index(mask)
        return self._unique[size]

    def trajectories(self, size) -> fresco.Trajectories:
        if size not in self._trajectories:
            self._trajectories[size] = fresco.trajectories(self.flows, self.images, size)
        return self._trajectories[size]

    def reference(self, layer: LayerKey, branches) -> Tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.reference_qk.get((layer, b)) for b in branches]
        fallback = next((p for p in pairs if p is not None), None)
        if fallback is None:
            raise RuntimeError(f"{NODE_NAME}: no intra-frame reference recorded for layer {layer}.")
        pairs = [fallback if p is None else p for p in pairs]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    def gram_reference(self, block: int, branches) -> fo.BranchGramReference:
        references = [self.gram.get((block, b)) for b in branches]
        fallback = next((r for r in references if r is not None), None)
        if fallback is None:
            raise RuntimeError(f"{NODE_NAME}: no Gram reference recorded for output block {block}.")
        return fo.BranchGramReference([fallback if r is None else r for r in references])

    def drop_attention_reference(self) -> None:
        self.reference_qk.clear()

    def cache_bytes(self) -> int:
        tensors = [*self._unique.values(), *(t for pair in self.reference_qk.values() for t in pair), self.images]
        if self.background is not None:
            tensors.append(self.background)
        own = sum(t.numel() * t.element_size() for t in tensors)
        return own + (0 if self.flows is None else self.flows.nbytes()) + sum(
            t.nbytes() for t in self._trajectories.values())

    def gram_bytes(self) -> int:
        return sum(r.nbytes() for r in self.gram.values())


# ----------------------------------------------------------------------------------------------------- patches
class FrescoPatches:
    """The attn1_replace (FRESCO-guided attention) and output_block_patch (feature optimisation) of a run.

    `phase`: None (plain model), "reference" (record), "sample"; `components` says what acts at the current
    evaluation. FRESCO's own attention runs through the host's optimized attention; a replacement another pack
    installed on these layers runs whenever FRESCO's attention is off for the call."""

    def __init__(self, settings: FrescoSettings, up_inputs, previous_replace: Dict):
        self.settings, self.up_inputs, self.previous_replace = settings, frozenset(up_inputs), previous_replace
        self.geometry: Optional[BatchGeometry] = None
        self.phase: Optional[str] = None
        self.components = Components()
        self.record_attention = self.record_features = False
        self.losses: Dict[str, List[Tuple[float, float]]] = {"spatial": [], "temporal": []}
        self.peak_gram_bytes = 0

    def attention(self, q, k, v, extra_options):
        layer = _layer(extra_options)
        geometry, c = self.geometry, self.components
        branches = list(extra_options.get("cond_or_uncond") or [0])
        if self.phase == "reference" and self.record_attention:
            for branch, q_c, k_c in zip(branches, q.chunk(len(branches)), k.chunk(len(branches))):
                geometry.reference_qk[(layer, branch)] = (q_c.detach().clone(), k_c.detach().clone())
        if self.phase != "sample" or not (c.cross_frame or c.spatial or c.temporal):
            previous = self.previous_replace.get(layer) or self.previous_replace.get(layer[:2])
            if previous is not None:
                return previous(q, k, v, extra_options)
            return optimized_attention(q, k, v, extra_options["n_heads"],
                                       attn_precision=extra_options.get("attn_precision"),
                                       transformer_options=extra_options)
        if q.shape[0] != len(branches) * geometry.frames:
            raise RuntimeError(f"{NODE_NAME}: an attention call holds {q.shape[0]} samples for {len(branches)} "
                               f"CFG branches of {geometry.frames} frames; another patch changed the batch layout.")
        size = geometry.grid(q.shape[1])

        def attend(q_, k_, v_, heads, mask=None):
            function = optimized_attention if mask is None else optimized_attention_masked
            return function(q_, k_, v_, heads, mask, attn_precision=extra_options.get("attn_precision"),
                            transformer_options=extra_options)

        reference_q = reference_k = None
        if c.spatial:
            reference_q, reference_k = geometry.reference(layer, branches)
        return fa.fresco_attention(q, k, v, extra_options["n_heads"], geometry.frames,
                                   unique_index=geometry.unique_index(size) if c.cross_frame else None,
                                   reference_q=reference_q, reference_k=reference_k,
                                   trajectories=geometry.trajectories(size) if c.temporal else None,
                                   attention=attend)

    def up_block_input(self, h, hsp, transformer_options):
        block = transformer_options.get("block")
        if self.geometry is None or block is None or block[0] != "output" or block[1] not in self.up_inputs:
            return h, hsp
        branches = list(transformer_options.get("cond_or_uncond") or [0])
        geometry, s = self.geometry, self.settings
        if self.phase == "reference" and self.record_features:
            for branch, chunk in zip(branches, h.chunk(len(branches))):
                geometry.gram[(block[1], branch)] = fo.GramReference(
                    chunk, distance=fo.LOSS_FORMS[s.loss_form].gram_distance)
            self.peak_gram_bytes = max(self.peak_gram_bytes, geometry.gram_bytes())
        elif self.phase == "sample" and self.components.optimize:
            gram = geometry.gram_reference(block[1], branches) if s.spatial_loss else None
            flows = geometry.flows if s.temporal_loss else None
            optimized, report = fo.optimize_feature(h, gram, flows, s.iterations, s.learning_rate, s.loss_form)
            for name, before, after in (("spatial", report.spatial_before, report.spatial_after),
                                        ("temporal", report.temporal_before, report.temporal_after)):
                if before is not None:
                    self.losses[name].append((before, after))
            if geometry.background is not None:
                optimized = fresco.smooth_background(optimized, geometry.flows, geometry.background)
            h = optimized
        return h, hsp


# ------------------------------------------------------------------------------------------------------- hooks
class FrescoPass(SteeringHooks):
    """One batch's sampling: shared anchors before each evaluation, the components of its step, x̂0 smoothing
    (taken by the sampler as its own prediction, as the reference's step takes the smoothed x̂0)."""
    x0_edit_rule = "sampler"

    def __init__(self, renderer: "FrescoRenderer", batch: fresco.KeyFrameBatch, number: int):
        self.renderer, self.batch, self.number = renderer, batch, number

    def before(self, evaluation: Evaluation, state: torch.Tensor) -> Optional[torch.Tensor]:
        comfy.model_management.throw_exception_if_processing_interrupted()
        r = self.renderer
        r.patches.components = r.components(evaluation.step)
        if r.last_spatial_step is not None and evaluation.step > r.last_spatial_step:
            r.patches.geometry.drop_attention_reference()  # spatial-guided attention is over for this batch
        if not (self.batch.anchors or self.batch.record):
            return None
        return r.anchors.apply(self.batch, evaluation.key.index, state)

    def after(self, evaluation: Evaluation, state: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        r = self.renderer
        if not evaluation.starts_step:
            return denoised
        edited = denoised
        if evaluation.step in r.smoothing_steps and r.patches.geometry.background is not None:
            edited = r.smooth_x0(denoised)
        r.step_done(self.number, evaluation.step, edited)
        return edited


@dataclasses.dataclass
class FrescoStats(RenderStats):
    batches: int = 0
    cache_peak_bytes: int = 0
    gram_peak_bytes: int = 0
    anchor_misses: int = 0


class FrescoRenderer:
    """One run of the FRESCO key frame node. Construction validates every input (errors before any sampling)."""

    def __init__(self, model, positive, negative, vae, frames: torch.Tensor, keyframes, flow, mask,
                 settings: FrescoSettings, on_step: Optional[Callable[[int, int, torch.Tensor, int, int], None]] = None,
                 on_batch: Optional[Callable[[int, int, tuple], None]] = None):
        self.model, self.positive, self.negative, self.frames = model, positive, negative, frames
        self.keyframes, self.flow, self.mask, self.settings = keyframes, flow, mask, settings
        self.on_step, self.on_batch = on_step, on_batch
        self.stats = FrescoStats()
        self.vae = CountingVAE(vae, self.stats)
        self._validate(vae)
        self.schedule = Schedule.from_host(model, settings)
        total, first = self.schedule.total_steps, self.schedule.first_step
        self.cross_steps = constraints.period_steps(*settings.cross_frame_period, total)
        self.temporal_steps = constraints.period_steps(*settings.temporal_guided_period, total)
        self.optimization_steps = constraints.period_steps(*settings.optimization_period, total)
        self.smoothing_steps = constraints.period_steps(*settings.smoothing_period, total)
        self.spatial_steps = frozenset(range(first, min(first + settings.spatial_guided_steps, total)))
        self.last_spatial_step = max(self.spatial_steps, default=None)
        self.batches = plan_shot_batches(keyframes, settings.batch_size)
        self._check_flow_needed()
        self._report_periods()
        self.device = model.load_device
        self.anchors = fresco.AnchorLatents()
        self.patches: Optional[FrescoPatches] = None
        self._plans: dict = {}
        self._done = 0
        self.total_units = len(self.batches) * (len(self.schedule.executed) - 1)

    # ------------------------------------------------------------------------------------------------ validation
    def _validate(self, vae) -> None:
        frames, s = self.frames, self.settings
        problem = validate_settings(s)
        if problem:
            raise ValueError(problem)
        self.vae_factor = check_render_inputs(NODE_NAME, frames, self.keyframes, self.flow, self.model, vae,
                                              self.positive, self.negative)
        try:
            fresco.validate_batching(self.keyframes.indices, s.batch_size)
            if self.mask is not None:
                fresco.background_from_foreground(self.mask, frames.shape[0], (8, 8))
        except ValueError as error:
            raise ValueError(f"{NODE_NAME}: {error}") from None

    def _executed(self, steps) -> List[int]:
        return self.schedule.executed_steps(steps)

    def _check_flow_needed(self) -> None:
        needs = [label for label, steps in (("cross-frame attention", self.cross_steps),
                                            ("temporal-guided attention", self.temporal_steps),
                                            ("background smoothing", self.smoothing_steps if self.mask is not None
                                             else ()))
                 if self._executed(steps)]
        if self._executed(self.optimization_steps) and (self.settings.temporal_loss or self.mask is not None):
            needs.append("feature optimisation's temporal loss / smoothing")
        if self.flow is None and needs:
            raise ValueError(f"{NODE_NAME}: {', '.join(needs)} need the clip's `flow`; connect Flow Estimation's "
                             f"output, or switch them off.")

    def _report_periods(self) -> None:
        s, total = self.settings, self.schedule.total_steps
        periods = {label: (getattr(s, field)[0], steps) for (label, field), steps in zip(
            PERIODS, (self.cross_steps, self.temporal_steps, self.optimization_steps, self.smoothing_steps))}
        for line, inert in constraints.hidden_period_report(periods, self.schedule.first_step, total):
            (logging.warning if inert else logging.info)("%s: %s", NODE_NAME, line)
            self.stats.report.append(line)
        if self.mask is None:
            self.stats.report.append("background smoothing: off (no foreground `mask` connected).")

    def components(self, step: int) -> Components:
        s = self.settings
        optimize = step in self.optimization_steps and (
            ((s.spatial_loss or s.temporal_loss) and s.iterations > 0) or self.mask is not None)
        return Components(step in self.cross_steps, step in self.spatial_steps, step in self.temporal_steps, optimize)

    # ------------------------------------------------------------------------------------------------------- run
    def run(self):
        self.patches = FrescoPatches(self.settings, up_block_inputs(self.model), dict(
            self.model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})))
        patched = self.model.clone()
        layers = fresco_layers(self.model)
        self.stats.report.append(f"FRESCO-guided attention on {len(layers)} decoder self-attention layers (output "
                                 f"blocks {sorted({number for _, number, _ in layers})}); feature optimisation on "
                                 f"{len(self.patches.up_inputs)} up-block inputs")
        for name, number, index in layers:
            patched.set_model_attn1_replace(self.patches.attention, name, number, index)
        patched.set_model_output_block_patch(self.patches.up_block_input)
        results: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        try:
            for number, (shot, batch) in enumerate(self.batches):
                comfy.model_management.throw_exception_if_processing_interrupted()
                if number and shot != self.batches[number - 1][0]:
                    self.stats.anchor_misses += self.anchors.misses
                    self.anchors.clear()  # a new shot: nothing is shared with the previous one
                if self.on_batch is not None:
                    self.on_batch(number, len(self.batches), batch.frames)
                latents = self._render_batch(patched, number, batch)
                new = list(batch.new_slots)
                images = self.vae.decode(latents[new])
                for slot, image, latent in zip(new, images, latents[new]):
                    results[batch.frames[slot]] = (image[None], latent[None])
        finally:
            self.patches.geometry, self.patches.phase = None, None
            self.stats.anchor_misses += self.anchors.misses
            self.anchors.clear()
        self._summarise()
        keys = list(self.keyframes.indices)
        return (torch.cat([results[k][0] for k in keys]), torch.cat([results[k][1] for k in keys]), self.stats)

    def _render_batch(self, patched, number: int, batch: fresco.KeyFrameBatch) -> torch.Tensor:
        frames = list(batch.frames)
        latent = torch.cat([self.vae.encode(self.frames[i:i + 1]) for i in frames])  # as VAE Encode per frame
        geometry = self._geometry(batch, tuple(latent.shape[-2:]))
        self.patches.geometry = geometry
        n = len(self.frames)
        memo = {}
        conditioning = (conditioning_for_frames(self.positive, frames, n, memo),
                        conditioning_for_frames(self.negative, frames, n, memo))
        noise = comfy.sample.prepare_noise(latent[:1], self.settings.seed).repeat(len(frames), 1, 1, 1)
        self._reference_pass(patched, latent, noise, conditioning)
        self.stats.cache_peak_bytes = max(self.stats.cache_peak_bytes,
                                          geometry.cache_bytes() + self.anchors.nbytes())
        hooks = FrescoPass(self, batch, number)
        sampler = steered_sampler(self.settings.sampler_name, hooks, self.schedule.full, self.schedule.first_step,
                                  plans=self._plans)
        self.patches.phase = "sample"
        try:
            out = comfy.sample.sample_custom(patched, noise, self.settings.cfg, sampler,
                                             self.schedule.executed.clone(), *conditioning, latent, disable_pbar=True,
                                             seed=self.settings.seed)
        finally:
            self.patches.phase, self.patches.components = None, Components()
        self.stats.cache_peak_bytes = max(self.stats.cache_peak_bytes,
                                          geometry.cache_bytes() + self.anchors.nbytes())
        self.anchors.finish_batch()
        self.stats.batches += 1
        return out

    def _geometry(self, batch: fresco.KeyFrameBatch, latent_size) -> BatchGeometry:
        frames = list(batch.frames)
        images = self.frames[frames].movedim(-1, 1).to(self.device, torch.float32)
        flows = None
        if self.flow is not None:
            flows = fresco.cyclic_flows(self.flow.pair, frames, images=images, device=self.device)
        background = None
        if self.mask is not None:
            mask = self.mask if self.mask.shape[0] == 1 else self.mask[frames]
            background = fresco.background_from_foreground(mask.to(self.device), len(frames), images.shape[-2:])
        return BatchGeometry(batch, flows, images, latent_size, background)

    def _reference_pass(self, patched, latent, noise, conditioning) -> None:
        """One model evaluation of the batch at the schedule's smallest noise level, ControlNet removed (§4.4.4)."""
        s = self.settings
        record_attention = bool(self.spatial_steps)
        record_features = s.spatial_loss and s.iterations > 0 and bool(self._executed(self.optimization_steps))
        if not (record_attention or record_features):
            return
        sigmas = self.schedule.full
        smallest = sigmas[sigmas > 0].min().reshape(1)
        reference_sigmas = torch.cat([smallest, smallest.new_zeros(1)])
        self.patches.phase, self.patches.record_attention = "reference", record_attention
        self.patches.record_features = record_features
        try:
            comfy.sample.sample_custom(patched, noise, s.cfg, comfy.samplers.sampler_object("euler"),
                                       reference_sigmas, *(_without_control(c) for c in conditioning), latent,
                                       disable_pbar=True, seed=s.seed)
        finally:
            self.patches.phase = None
            self.patches.record_attention = self.patches.record_features = False
        self.stats.gram_peak_bytes = max(self.stats.gram_peak_bytes, self.patches.geometry.gram_bytes())

    def smooth_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """Background smoothing of x̂0 in image space (§4.7), as a latent edit: x̂0 + E(smooth(D(x̂0))) - E(D(x̂0)),
        so pixels the smoothing leaves alone do not take the VAE's round-trip error (the reference re-encodes
        the whole x̂0)."""
        geometry, model = self.patches.geometry, self.model.model
        decoded = self.vae.decode(model.process_latent_out(x0).to(comfy.model_management.intermediate_device()))
        smoothed = fresco.smooth_background(decoded.movedim(-1, 1).to(self.device, torch.float32), geometry.flows,
                                            geometry.background).clamp(0.0, 1.0).movedim(1, -1)
        delta = self.vae.encode(smoothed.to(decoded)) - self.vae.encode(decoded)
        return x0 + model.process_latent_in(delta.to(x0.device)).to(x0) - model.process_latent_in(
            torch.zeros_like(delta)).to(x0)

    def step_done(self, batch_number: int, step: int, x0: torch.Tensor) -> None:
        self._done += 1
        if self.on_step is not None:
            self.on_step(batch_number, step, x0, self._done, self.total_units)

    def _summarise(self) -> None:
        s, stats = self.settings, self.stats
        stats.gram_peak_bytes = max(stats.gram_peak_bytes, self.patches.peak_gram_bytes)
        shots = self.batches[-1][0] + 1
        stats.report.insert(0, f"{len(self.keyframes.indices)} key frames"
                               f"{f' in {shots} shots' if shots > 1 else ''} in {stats.batches} batches of at most "
                               f"{s.batch_size}; cache peak {stats.cache_peak_bytes / MiB:.1f} MiB (flows, masks, "
                               f"trajectories, attention reference, anchors), Gram references "
                               f"{stats.gram_peak_bytes / MiB:.1f} MiB")
        for name, pairs in self.patches.losses.items():
            if pairs:
                before = sum(p[0] for p in pairs) / len(pairs)
                after = sum(p[1] for p in pairs) / len(pairs)
                stats.report.append(f"feature optimisation, {name} loss: {before:.4g} -> {after:.4g} (mean over "
                                    f"{len(pairs)} layer-steps)")
        if stats.anchor_misses:
            stats.report.append(f"shared anchors left free at {stats.anchor_misses} evaluations (no recorded latent).")
