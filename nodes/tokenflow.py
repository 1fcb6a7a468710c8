"""TokenFlow sampler node (reference §5) on the host's samplers, attention patch points and ControlNet.

Sampling runs the host's own sampler over the whole clip; the model call of each step (a CFGGuider subclass's
predict_noise) is TokenFlow's step:
  key frame pass  - one random key frame per chunk, denoised jointly: every self-attention of the edit branches
                    attends over the keys/values of all key frames; their attention outputs are stored per layer;
  propagation     - per chunk, every frame's self-attention output is the key frames' stored output gathered along
                    the nearest-neighbour field of the source video's features (chunk's own key frame and the
                    previous chunk's, sigmoid-blended); attention itself is not computed.
The source branch (the inverted latent of the step, with the inversion prompt) runs before the edit branches of
each pass as its own model call: its normed self-attention inputs give the NN fields and, for the PnP periods,
its self-attention Q/K and one decoder res block's output replace the edit branches' (plug-and-play injection).
Memory: the stored key frame outputs (all layers, ≤ 3 branches) plus one chunk of work.

Patch points: an attn1_patch (reads the normed tokens), an attn1_replace on every self-attention layer (calls any
replacement already installed there, or the host's optimized attention, for the attention it still computes), and
a forward_timestep_embed_patch for the injected res block. All live on a clone made for the run.
"""
import dataclasses
import logging
from typing import Dict, List, Optional, Tuple

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy.ldm.modules.attention import BasicTransformerBlock, optimized_attention
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, Upsample
from comfy_api.latest import io

from ..rerender import tokenflow as tf
from .control_hints import check_control_hints, conditioning_for_frames
from .inversion import check_invertible, editing_sigmas, start_noise
from .types import Inversion
from .validation import outside_declared

CATEGORY = "Rerender"
NODE_NAME = "TokenFlow Sampler"
# Deterministic samplers that call the model only at the schedule's own levels (the inversion has a source latent
# for exactly those); the others (ancestral/SDE noise, or intermediate levels as heun/dpm_2) are refused by name.
SUPPORTED_SAMPLERS = tuple(name for name in ("ddim", "euler", "lms", "dpmpp_2m", "ipndm", "ipndm_v", "deis",
                                             "uni_pc", "uni_pc_bh2", "res_multistep")
                           if name in comfy.samplers.KSampler.SAMPLERS)
LayerKey = Tuple[str, int, int]


@dataclasses.dataclass(frozen=True)
class TokenFlowSettings:
    seed: int = 1
    steps: int = 50
    cfg: float = 7.5
    sampler_name: str = "ddim"
    scheduler: str = "ddim_uniform"
    denoise: float = 1.0
    pnp_attention: float = 0.5     # first fraction of the schedule with self-attention Q/K injection
    pnp_residual: float = 0.8      # first fraction with the res block injection
    extended_attention: bool = True
    propagation: bool = True
    chunk_size: int = 8


# ------------------------------------------------------------------------------------------------ model layout
def self_attention_layers(model) -> List[LayerKey]:
    """(block name, number, transformer index) of every self-attention of the UNet, in the host's naming."""
    unet = model.get_model_object("diffusion_model")
    layers = []
    groups = [("input", list(unet.input_blocks)), ("middle", [unet.middle_block]), ("output", list(unet.output_blocks))]
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for spatial in (m for m in block.modules() if hasattr(m, "transformer_blocks")):
                for index, transformer in enumerate(spatial.transformer_blocks):
                    if isinstance(transformer, BasicTransformerBlock) and not transformer.disable_self_attn:
                        layers.append((name, number, index))
    return layers


def pnp_layers(model) -> Tuple[Optional[int], frozenset]:
    """The reference's injection points, derived from the decoder's resolutions: the res block of the second
    decoder block at 1/4 of the latent resolution (SD's up_blocks[1].resnets[1]) and every decoder self-attention
    at 1/4 resolution and finer except the first block's (SD's up_blocks[1].attentions[1:], [2], [3]). Returns
    (output block number of the res block or None, Q/K layers)."""
    unet = model.get_model_object("diffusion_model")
    levels, level = [], 0
    for block in unet.output_blocks:
        levels.append(level)
        if any(isinstance(m, Upsample) for m in block.modules()):
            level += 1
    finest = levels[-1]
    eligible = [number for number, lvl in enumerate(levels) if finest - lvl <= 2]  # factor 2^(finest-lvl) <= 4
    first_level = [number for number in eligible if levels[number] == levels[eligible[0]]]
    residual = first_level[1] if len(first_level) > 1 else None
    if residual is not None and not any(isinstance(m, ResBlock) for m in unet.output_blocks[residual].children()):
        residual = None
    skipped = first_level[0]
    attention = frozenset(key for key in self_attention_layers(model)
                          if key[0] == "output" and key[1] in eligible and key[1] != skipped)
    return residual, attention


# -------------------------------------------------------------------------------------------- patch controller
class TokenFlowAttention:
    """What the patches do in each phase of a step, and the per-step stores (freed by `reset`).

    phase: None (plain model), "source_key"/"edit_key" (key frame pass), "source_prop"/"edit_prop" (propagation).
    Stores: key frame tokens/outputs per (layer, branch) with branch "normed"/"source"/0 (cond)/1 (uncond); the
    source's Q/K and res block output of the current pass; the NN fields of the current chunk."""

    def __init__(self, residual_block: Optional[int], pnp_attention_layers: frozenset, previous_replace: Dict):
        self.residual_block = residual_block
        self.pnp_attention_layers = pnp_attention_layers
        self.previous_replace = previous_replace
        self.reset()

    def reset(self) -> None:
        self.phase: Optional[str] = None
        self.extended = False
        self.inject_attention = False
        self.inject_residual = False
        self.store_key_outputs = False
        self.key_store: Dict[Tuple[LayerKey, object], torch.Tensor] = {}
        self.source_qk: Dict[LayerKey, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.source_residual: Optional[torch.Tensor] = None
        self.normed: Dict[LayerKey, torch.Tensor] = {}
        self.fields: Dict[LayerKey, List[torch.Tensor]] = {}
        self.chunk_keys: List[int] = []       # positions in the key frame list: own chunk's, previous chunk's
        self.chunk_weights: Optional[torch.Tensor] = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.key_store.values())

    # attn1_patch: the normed tokens of the source branch (the NN features)
    def read_normed(self, n, context_attn1, value_attn1, extra_options):
        if self.phase in ("source_key", "source_prop") and extra_options.get("block") is not None:
            self.normed[_layer(extra_options)] = n
        return n, context_attn1, value_attn1

    # attn1_replace
    def attention(self, q, k, v, extra_options):
        layer = _layer(extra_options)
        previous = self.previous_replace.get(layer) or self.previous_replace.get(layer[:2])

        def attend(q_, k_, v_):
            if previous is not None:
                return previous(q_, k_, v_, extra_options)
            return optimized_attention(q_, k_, v_, extra_options["n_heads"],
                                       attn_precision=extra_options.get("attn_precision"))

        phase = self.phase
        if phase == "source_key":
            out = attend(q, k, v)
            if self.inject_attention and layer in self.pnp_attention_layers:
                self.source_qk[layer] = (q, k)
            if self.store_key_outputs:
                self.key_store[(layer, "normed")] = self.normed.pop(layer)
                self.key_store[(layer, "source")] = out
            return out
        if phase == "edit_key":
            branches = extra_options["cond_or_uncond"]
            if self.inject_attention and layer in self.source_qk:
                q_source, k_source = self.source_qk[layer]
                q, k = q_source.repeat(len(branches), 1, 1), k_source.repeat(len(branches), 1, 1)
            outs = []
            for branch, q_c, k_c, v_c in zip(branches, q.chunk(len(branches)), k.chunk(len(branches)),
                                             v.chunk(len(branches))):
                out = tf.extended_attention(q_c, k_c, v_c, attend) if self.extended else attend(q_c, k_c, v_c)
                if self.store_key_outputs:
                    self.key_store[(layer, branch)] = out
                outs.append(out)
            return torch.cat(outs)
        if phase == "source_prop":
            normed = self.normed.pop(layer)
            key_normed = self.key_store[(layer, "normed")]
            self.fields[layer] = [tf.nearest_tokens(normed, key_normed[position]) for position in self.chunk_keys]
            return self._propagated(layer, "source")
        if phase == "edit_prop":
            return torch.cat([self._propagated(layer, branch) for branch in extra_options["cond_or_uncond"]])
        return attend(q, k, v)

    def _propagated(self, layer, branch):
        stored = self.key_store[(layer, branch)]
        return tf.propagate([stored[position] for position in self.chunk_keys], self.fields[layer],
                            self.chunk_weights)

    # forward_timestep_embed_patch on ResBlock: the source's res block output replaces the edit branches'
    def res_block(self, layer, x, emb, context, transformer_options, output_shape, time_context, num_video_frames,
                  image_only_indicator):
        out = layer(x, emb)
        if not self.inject_residual or transformer_options.get("block") != ("output", self.residual_block):
            return out
        if self.phase in ("source_key", "source_prop"):
            self.source_residual = out
        elif self.phase in ("edit_key", "edit_prop") and self.source_residual is not None:
            out = self.source_residual.repeat(out.shape[0] // self.source_residual.shape[0], 1, 1, 1).to(out)
        return out


def _layer(extra_options) -> LayerKey:
    block = extra_options["block"]
    return block[0], block[1], extra_options.get("block_index", 0)


def patched_model(model, controller: TokenFlowAttention, layers: List[LayerKey]):
    patched = model.clone()
    patched.set_model_attn1_patch(controller.read_normed)
    for name, number, index in layers:
        patched.set_model_attn1_replace(controller.attention, name, number, index)
    if controller.residual_block is not None:
        patched.set_model_patch((ResBlock, controller.res_block), "forward_timestep_embed_patch")
    return patched


# --------------------------------------------------------------------------------------------------- the guider
class TokenFlowGuider(comfy.samplers.CFGGuider):
    """CFG guider whose model call is TokenFlow's step over the whole clip (see the module doc)."""

    def __init__(self, model_patcher, controller: TokenFlowAttention, inversion, settings: TokenFlowSettings,
                 positive, negative):
        super().__init__(model_patcher)
        self.controller, self.inversion, self.settings = controller, inversion, settings
        self.set_conds(positive, negative)
        self.set_cfg(settings.cfg)
        self.raw = {"positive": positive, "negative": negative, "source": inversion.conditioning}
        total = len(inversion.sigmas) - 1 + _first_step(settings)
        self.attention_steps = tf.injection_steps(settings.pnp_attention, total)
        self.residual_steps = tf.injection_steps(settings.pnp_residual, total)
        self.step_offset = _first_step(settings)
        self._conds_cache: Dict[Tuple[int, ...], dict] = {}
        self.peak_store_bytes = 0

    def inner_sample(self, *args, **kwargs):
        try:
            return super().inner_sample(*args, **kwargs)
        finally:
            for conds in self._conds_cache.values():
                for entries in conds.values():
                    for entry in entries:
                        if entry.get("control") is not None:
                            entry["control"].cleanup()
            self._conds_cache.clear()
            self.controller.reset()

    def _step(self, timestep) -> int:
        sigma = float(timestep.reshape(-1)[0])
        distances = (self.inversion.sigmas - sigma).abs()
        step = int(distances.argmin())
        if distances[step] > 1e-4 * max(sigma, 1e-3):
            raise ValueError(f"{NODE_NAME}: the sampler evaluated the model at sigma {sigma:.5g}, which is not a "
                             f"level of the inverted schedule; use one of {', '.join(SUPPORTED_SAMPLERS)}.")
        return step

    def _conds(self, frames: List[int], x) -> dict:
        key = tuple(frames)
        if key not in self._conds_cache:
            if len(self._conds_cache) > len(tf.chunks(self.inversion.frame_count, self.settings.chunk_size)) + 1:
                self._drop_key_frame_conds()
            count = self.inversion.frame_count
            converted = {name: comfy.sampler_helpers.convert_cond(conditioning_for_frames(raw, frames, count))
                         for name, raw in self.raw.items()}
            noise = torch.zeros((len(frames),) + tuple(x.shape[1:]), device=x.device)
            self._conds_cache[key] = comfy.samplers.process_conds(self.inner_model, noise, converted, x.device,
                                                                  latent_image=torch.zeros_like(noise))
        return self._conds_cache[key]

    def _drop_key_frame_conds(self):
        chunk_keys = {tuple(c) for c in tf.chunks(self.inversion.frame_count, self.settings.chunk_size)}
        for key in [k for k in self._conds_cache if k not in chunk_keys]:
            for entries in self._conds_cache.pop(key).values():
                for entry in entries:
                    if entry.get("control") is not None:
                        entry["control"].cleanup()

    def _pass(self, kind, frames, x, source, timestep, model_options, seed, need_source):
        controller = self.controller
        conds = self._conds(frames, x)
        if need_source:
            controller.phase = f"source_{kind}"
            comfy.samplers.calc_cond_batch(self.inner_model, [conds["source"]], source[frames], timestep[:len(frames)],
                                           model_options)
        controller.phase = f"edit_{kind}"
        try:
            return comfy.samplers.sampling_function(self.inner_model, x[frames], timestep[:len(frames)],
                                                    conds["negative"], conds["positive"], self.cfg,
                                                    model_options=model_options, seed=seed)
        finally:
            controller.phase = None
            controller.source_qk.clear()
            controller.normed.clear()
            controller.source_residual = None

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        s, controller = self.settings, self.controller
        step = self._step(timestep)
        full_step = step + self.step_offset
        controller.inject_attention = full_step in self.attention_steps
        controller.inject_residual = full_step in self.residual_steps and controller.residual_block is not None
        pnp = controller.inject_attention or controller.inject_residual
        source = self.inversion.state(step, device=x.device, dtype=x.dtype)
        frame_chunks = tf.chunks(x.shape[0], s.chunk_size)
        out = torch.empty_like(x)
        if not s.propagation:
            controller.extended, controller.store_key_outputs = False, False
            for frames in frame_chunks:
                out[frames] = self._pass("key", frames, x, source, timestep, model_options, seed, pnp)
            return out
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + full_step)
        keys = tf.draw_key_frames(x.shape[0], s.chunk_size, generator)
        controller.extended, controller.store_key_outputs = s.extended_attention, True
        try:
            self._pass("key", keys, x, source, timestep, model_options, seed, True)
            self.peak_store_bytes = max(self.peak_store_bytes, controller.nbytes())
            controller.store_key_outputs = False
            for index, frames in enumerate(frame_chunks):
                controller.chunk_keys = [index] if index == 0 else [index, index - 1]
                controller.chunk_weights = None if index == 0 else tf.blend_weights(frames, index, s.chunk_size)
                out[frames] = self._pass("prop", frames, x, source, timestep, model_options, seed, True)
                controller.fields.clear()
        finally:
            controller.key_store.clear()
            controller.normed.clear()
            controller.fields.clear()
        return out


def _first_step(settings: TokenFlowSettings) -> int:
    """Steps of the full schedule (steps/denoise) before the executed part, as KSampler computes it."""
    if settings.denoise >= 0.9999:
        return 0
    return int(settings.steps / settings.denoise) - settings.steps


# ------------------------------------------------------------------------------------------------------- checks
def check_request(model, inversion, settings: TokenFlowSettings, positive, negative) -> torch.Tensor:
    """Every refusal before any work; returns the editing sigmas."""
    if settings.sampler_name not in SUPPORTED_SAMPLERS:
        raise ValueError(f"{NODE_NAME}: sampler '{settings.sampler_name}' is not supported (it adds noise or "
                         f"evaluates the model between the schedule's levels, where the inversion has no source "
                         f"latent); use one of {', '.join(SUPPORTED_SAMPLERS)}.")
    check_invertible(model, NODE_NAME)
    if inversion.frame_count < settings.chunk_size:
        raise ValueError(f"{NODE_NAME}: the clip has {inversion.frame_count} frames, fewer than one chunk "
                         f"({settings.chunk_size}); use a longer clip or a smaller chunk_size.")
    sigmas = editing_sigmas(model, settings.steps, settings.sampler_name, settings.scheduler, settings.denoise)
    inversion.check_schedule(sigmas, NODE_NAME, "set steps / denoise / sampler_name / scheduler as on the "
                                                "inversion node, or invert again for these.")
    check_control_hints({"positive": positive, "negative": negative}, inversion.frame_count, NODE_NAME)
    return sigmas


def sample_tokenflow(model, positive, negative, inversion, settings: TokenFlowSettings, callback=None):
    """Raw latents [N,C,h,w] of the edited clip, and the peak bytes of the stored key frame outputs."""
    sigmas = check_request(model, inversion, settings, positive, negative)
    residual, attention_layers = pnp_layers(model)
    layers = self_attention_layers(model)
    existing = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    controller = TokenFlowAttention(residual, attention_layers, dict(existing))
    patched = patched_model(model, controller, layers)
    guider = TokenFlowGuider(patched, controller, inversion, settings, positive, negative)
    noise = start_noise(model, inversion.state(0), float(sigmas[0]))
    sampler = comfy.samplers.sampler_object(settings.sampler_name)
    samples = guider.sample(noise, torch.zeros_like(noise), sampler, sigmas.to(noise.device), callback=callback,
                            disable_pbar=True, seed=settings.seed)
    return samples.to(comfy.model_management.intermediate_device()).float(), guider.peak_store_bytes


# --------------------------------------------------------------------------------------------------------- node
class TokenFlowSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = TokenFlowSettings()
        return io.Schema(
            node_id="Rerender_TokenFlowSampler",
            display_name=NODE_NAME,
            category=CATEGORY,
            description="TokenFlow: edits every frame of an inverted clip with the diffusion model, keeping them "
                        "consistent by denoising random key frames jointly (extended attention) and propagating "
                        "their self-attention outputs to all frames along the source video's own diffusion-feature "
                        "correspondences, with plug-and-play injection of the source's features.",
            inputs=[
                io.Model.Input("model", tooltip="The model the inversion was made with."),
                io.Conditioning.Input("positive", tooltip="The edit prompt; attach ControlNet upstream with one "
                                                          "hint per frame (each chunk gets its frames' hints)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt (the reference: \"ugly, blurry, low "
                                                          "res, unrealistic, unaesthetic\")."),
                Inversion.Input("inversion", tooltip="The clip inverted by Video Inversion (DDIM) for this "
                                                     "schedule."),
                io.Int.Input("seed", default=d.seed, min=0, max=0xffffffffffffffff, control_after_generate="fixed",
                             tooltip="Seed of the key frame draws (the starting noise is the inverted noise)."),
                io.Int.Input("steps", default=d.steps, min=1, max=10000,
                             tooltip="Steps; must equal the inversion's editing steps."),
                io.Float.Input("cfg", default=d.cfg, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (the reference: 7.5)."),
                io.Combo.Input("sampler_name", options=list(SUPPORTED_SAMPLERS), default=d.sampler_name,
                               tooltip="Deterministic host samplers that evaluate the model only at the schedule's "
                                       "levels (ddim reproduces the reference)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default=d.scheduler,
                               tooltip="Must equal the inversion's scheduler."),
                io.Float.Input("denoise", default=d.denoise, min=0.01, max=1.0, step=0.01,
                               tooltip="Must equal the inversion's denoise (below 1: SDEdit-style start)."),
                io.Float.Input("pnp_attention", default=d.pnp_attention, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule (from the first step) in which the source's "
                                       "self-attention Q and K replace the edit's in the decoder (0 = off)."),
                io.Float.Input("pnp_residual", default=d.pnp_residual, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule in which the source's decoder res block output "
                                       "replaces the edit's (0 = off)."),
                io.Boolean.Input("extended_attention", default=d.extended_attention,
                                 tooltip="Key frames attend jointly over all key frames' keys and values."),
                io.Boolean.Input("propagation", default=d.propagation,
                                 tooltip="Propagate the key frames' attention outputs to every frame (TokenFlow); "
                                         "off: every frame is denoised on its own (with PnP if on)."),
                io.Int.Input("chunk_size", default=d.chunk_size, min=1, max=64,
                             tooltip="Frames per chunk: one key frame per chunk; memory follows one chunk."),
            ],
            outputs=[io.Latent.Output("latent", display_name="LATENT", tooltip="Every frame's edited latent.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None, **kwargs):
        if sampler_name is not None and sampler_name not in SUPPORTED_SAMPLERS:
            return (f"{NODE_NAME}: sampler '{sampler_name}' is not supported; use one of "
                    f"{', '.join(SUPPORTED_SAMPLERS)}.")
        problem = outside_declared(cls, sampler_name=sampler_name, **kwargs)
        return True if problem is None else f"{NODE_NAME}: {problem}."

    @classmethod
    def execute(cls, model, positive, negative, inversion, seed, steps, cfg, sampler_name, scheduler, denoise,
                pnp_attention, pnp_residual, extended_attention, propagation, chunk_size) -> io.NodeOutput:
        settings = TokenFlowSettings(seed, steps, cfg, sampler_name, scheduler, denoise, pnp_attention,
                                     pnp_residual, extended_attention, propagation, chunk_size)
        callback = latent_preview.prepare_callback(model, len(inversion.sigmas) - 1)
        samples, store_bytes = sample_tokenflow(model, positive, negative, inversion, settings, callback)
        logging.info("%s: %d frames, key frame store peak %.1f MiB", NODE_NAME, samples.shape[0], store_bytes / 2**20)
        return io.NodeOutput({"samples": samples})


NODES = [TokenFlowSampler]
