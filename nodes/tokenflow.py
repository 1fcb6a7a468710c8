"""TokenFlow Sampler node: edits an inverted clip consistently (the engine: `engine.tokenflow`)."""
import logging

import comfy.samplers
import latent_preview
from comfy_api.latest import io

from ..engine.tokenflow import NODE_NAME, SUPPORTED_SAMPLERS, TokenFlowSettings, sample_tokenflow
from .types import Inversion
from .categories import TOKENFLOW as CATEGORY



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
            outputs=[io.Latent.Output("latent", display_name="latents", tooltip="Every frame's edited latent.")],
            hidden=[io.Hidden.unique_id],
        )

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
