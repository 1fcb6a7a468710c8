"""Video Inversion (DDIM) node, and Inverted Noise: the inverted clip as the starting NOISE of a host sampler."""
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..engine.inversion import DEFAULT_BATCH, DEFAULT_INVERSION_STEPS, NODE_NAME, invert_clip, inverted_noise
from .types import Inversion
from .categories import SHARED as CATEGORY



class VideoInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Rerender_Inversion",
            display_name=NODE_NAME,
            category=CATEGORY,
            description="Deterministic DDIM inversion of a clip (TokenFlow's preprocessing): every frame's noisy "
                        "latent at every step of the editing schedule it is made for, with an inversion prompt and "
                        "no CFG. The reconstruction output samples the inverted noise back with the same prompt: "
                        "edits need a good reconstruction.",
            inputs=[
                io.Model.Input("model", tooltip="The model the edit will use (ε- or v-prediction: SD1.x, SD2.x, "
                                                "SDXL); patched or LoRA'd models are inverted as they are."),
                io.Conditioning.Input("conditioning", tooltip="The inversion prompt (an empty prompt is the usual "
                                                              "choice, or a plain description of the clip)."),
                io.Int.Input("steps", default=50, min=1, max=10000,
                             tooltip="Steps of the EDITING schedule this inversion is for (the sampler's steps)."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Denoise of the editing schedule; the inversion stops at its first level."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="ddim",
                               tooltip="The editing sampler (some samplers drop a level of the schedule)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="ddim_uniform",
                               tooltip="The editing scheduler (ddim_uniform reproduces the reference's timesteps)."),
                io.Int.Input("inversion_steps", default=DEFAULT_INVERSION_STEPS, min=1, max=1000,
                             tooltip="DDIM inversion steps over the full noise range (the levels of the editing "
                                     "schedule are added). The paper uses 1000, TokenFlow's code 500; more steps "
                                     "reconstruct better and cost proportionally more."),
                io.Int.Input("batch_size", default=DEFAULT_BATCH, min=1, max=256,
                             tooltip="Frames per model call (memory vs speed; results do not depend on it). A "
                                     "Tune-A-Video model inverts the whole clip in one call whatever this says: its "
                                     "attention spans the frames of a call, as in the reference."),
                io.Image.Input("frames", optional=True,
                               tooltip="The clip [N,H,W,3]; needs `vae`. Or connect `latent` instead."),
                io.Vae.Input("vae", optional=True, tooltip="Encodes `frames` (posterior mean, as the reference)."),
                io.Latent.Input("latent", optional=True, tooltip="The clip's latents, instead of frames + vae."),
            ],
            outputs=[
                Inversion.Output("inversion", tooltip="The inverted clip for the TokenFlow sampler (or another "
                                                      "sampler of this pack); held on the CPU in float16."),
                io.Latent.Output("reconstruction", tooltip="The inverted noise sampled back with the inversion "
                                                           "prompt at CFG 1: decode it and compare with the clip."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, conditioning, steps, denoise, sampler_name, scheduler, inversion_steps, batch_size,
                frames=None, vae=None, latent=None) -> io.NodeOutput:
        progress_bar = lambda total: comfy.utils.ProgressBar(total, node_id=cls.hidden.unique_id)  # noqa: E731
        inverted, reconstruction = invert_clip(model, conditioning, frames, vae, latent, steps, denoise, sampler_name,
                                               scheduler, inversion_steps, batch_size, progress_bar)
        return io.NodeOutput(inverted, {"samples": reconstruction})


class InvertedNoiseNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Rerender_InvertedNoise",
            display_name="Inverted Noise",
            category=CATEGORY,
            description="Turns a Video Inversion into the starting point of the host's SamplerCustomAdvanced: a "
                        "NOISE that makes the sampler start at the inverted clip (from an all-zero latent), for the "
                        "whole clip as one batch. Tune-A-Video samples its edit this way.",
            inputs=[
                io.Model.Input("model", tooltip="The model that will sample (its noise scaling is read)."),
                Inversion.Input("inversion", tooltip="From Video Inversion (DDIM), made with the same model and the "
                                                     "sampler's steps / scheduler."),
            ],
            outputs=[io.Noise.Output(display_name="noise", tooltip="For SamplerCustomAdvanced's `noise`."),
                     io.Latent.Output(display_name="latent", tooltip="All zeros at the clip's shape: "
                                                                     "SamplerCustomAdvanced's `latent_image`.")],
        )

    @classmethod
    def execute(cls, model, inversion) -> io.NodeOutput:
        noise = inverted_noise(model, inversion)
        return io.NodeOutput(noise, {"samples": torch.zeros_like(noise.noise)})


NODES = [VideoInversion, InvertedNoiseNode]
