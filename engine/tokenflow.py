"""Host-bound TokenFlow (reference §5) on the host's samplers, attention patch points and ControlNet.

Sampling runs the host's own sampler over the whole clip; the model call of each step (a CFGGuider subclass's
predict_noise) is TokenFlow's step:
  key frame pass  - one random key frame per chunk, denoised jointly: every self-attention of the edit branches
                    attends over the keys/values of all key frames; their attention outputs are stored per layer;
  propagation     - per chunk, every frame's self-attention output is the key frames' stored output gathered along
                    the nearest-neighbour field of the source video's features (chunk's own key frame and the
                    previous chunk's, sigmoid-blended); attention itself is not computed.
The source branch (the inverted latent of the step, with the inversion prompt) runs before the edit branches of
each pass as its own model call: its normed self-attention inputs give the NN fields and, for the PnP periods,
its self-attention Q/K and one decoder res block's residual branch replace the edit branches' (plug-and-play
injection; the edit keeps its own skip path, as the reference's register_conv_injection).
Memory: the stored key frame outputs (all layers, ≤ 3 branches) plus one chunk of work.

Patch points: an attn1_patch (reads the normed tokens; when propagating it leaves the host's Q/K/V projections no
tokens), an attn1_replace on every self-attention layer (calls any replacement already installed there, or the
host's optimized attention, for the attention it still computes), an attn1_output_patch (stores the key frames'
projected outputs, puts the propagated ones in place) and a forward_timestep_embed_patch for the injected res
block. All live on a clone made for the run.
"""
from typing import Dict, List, Optional, Tuple

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import torch
from comfy.ldm.modules.attention import BasicTransformerBlock, optimized_attention
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, Upsample

from ..rerender import tokenflow as tf
from ..rerender.tokenflow import LayerKey, TokenFlowAttention, TokenFlowSettings, first_step
from .control_hints import check_control_hints, conditioning_for_frames
from .inversion import check_invertible, editing_sigmas, start_noise

NODE_NAME = "TokenFlow Sampler"
# Deterministic samplers that call the model only at the schedule's own levels (the inversion has a source latent
# for exactly those); the others (ancestral/SDE noise, or intermediate levels as heun/dpm_2) are refused by name.
SUPPORTED_SAMPLERS = tuple(name for name in ("ddim", "euler", "lms", "dpmpp_2m", "ipndm", "ipndm_v", "deis",
                                             "uni_pc", "uni_pc_bh2", "res_multistep")
                           if name in comfy.samplers.KSampler.SAMPLERS)


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


def patched_model(model, controller: TokenFlowAttention):
    patched = model.clone()
    patched.set_model_attn1_patch(controller.attention_inputs)
    for name, number, index in sorted(controller.layers):
        patched.set_model_attn1_replace(controller.attention, name, number, index)
    # first among the output patches, so any already on the model see the propagated output as they would the
    # attention's
    patched.set_model_attn1_output_patch(controller.attention_output)
    patches = patched.model_options["transformer_options"]["patches"]
    patches["attn1_output_patch"] = patches["attn1_output_patch"][-1:] + patches["attn1_output_patch"][:-1]
    if controller.residual_block is not None:
        patched.set_model_patch((ResBlock, residual_injection(controller)), "forward_timestep_embed_patch")
    return patched


def skip_path(block: ResBlock, x: torch.Tensor) -> torch.Tensor:
    """The host ResBlock's skip path on its input (its output is skip_path + the residual branch)."""
    return block.skip_connection(block.x_upd(x) if block.updown else x)


def residual_injection(controller: TokenFlowAttention):
    """The forward_timestep_embed_patch that hands each ResBlock to the controller's residual-branch injection."""
    def patch(layer, x, emb, context, transformer_options, output_shape, time_context, num_video_frames,
              image_only_indicator):
        return controller.res_block(transformer_options.get("block"), lambda: layer(x, emb),
                                    lambda: skip_path(layer, x))
    return patch


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
        total = len(inversion.sigmas) - 1 + first_step(settings)
        self.attention_steps = tf.injection_steps(settings.pnp_attention, total)
        self.residual_steps = tf.injection_steps(settings.pnp_residual, total)
        self.step_offset = first_step(settings)
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
                controller.chunk_weights = (None if index == 0 else
                                            tf.blend_weights(frames, index, s.chunk_size).to(x.device))
                out[frames] = self._pass("prop", frames, x, source, timestep, model_options, seed, True)
                controller.fields.clear()
        finally:
            controller.key_store.clear()
            controller.normed.clear()
            controller.fields.clear()
        return out


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
    existing = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    controller = TokenFlowAttention(residual, attention_layers, self_attention_layers(model), dict(existing),
                                    optimized_attention)
    patched = patched_model(model, controller)
    guider = TokenFlowGuider(patched, controller, inversion, settings, positive, negative)
    noise = start_noise(model, inversion.state(0), float(sigmas[0]))
    sampler = comfy.samplers.sampler_object(settings.sampler_name)
    samples = guider.sample(noise, torch.zeros_like(noise), sampler, sigmas.to(noise.device), callback=callback,
                            disable_pbar=True, seed=settings.seed)
    return samples.to(comfy.model_management.intermediate_device()).float(), guider.peak_store_bytes


