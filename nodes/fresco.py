"""FRESCO key frame node: the selected key frames rendered jointly in batches, FRESCO's way, on any host sampler."""
import dataclasses
import logging

import comfy.samplers
import comfy.utils
import latent_preview
import server
from comfy_api.latest import io, ui

from ..rerender.fresco import optimize as fo
from ..engine.fresco import NODE_NAME, FrescoRenderer, FrescoSettings
from .keyframe_sampler import PROGRESS_EVENT, period_inputs
from .types import KeyFrames, VideoFlow
from .validation import sampler_refusal
from .categories import FRESCO as CATEGORY

DEFAULTS = FrescoSettings()
SD15_UP_BLOCK_INPUTS_512 = ((1280, 8, 8), (1280, 16, 16), (1280, 32, 32), (640, 64, 64))


def _batch_cost_at_512(frames: int, form: str) -> str:
    """What a batch of `frames` costs in feature optimisation memory at 512² on SD1.5 (cond + uncond)."""
    kept, peak = fo.memory_totals(fo.feature_optimization_memory(
        SD15_UP_BLOCK_INPUTS_512, frames, distance=fo.LOSS_FORMS[form].gram_distance))
    return f"{kept / 2 ** 20:.0f} MiB of Gram references + {peak / 2 ** 20:.0f} MiB working set"


PERIOD_INPUTS = (("cross_frame", "cross_frame_period"), ("temporal_guided", "temporal_guided_period"),
                 ("optimization", "optimization_period"), ("smoothing", "smoothing_period"))


def settings_from(inputs: dict) -> FrescoSettings:
    fields = {f.name for f in dataclasses.fields(FrescoSettings)}
    values = {k: v for k, v in inputs.items() if k in fields}
    for prefix, field in PERIOD_INPUTS:
        values[field] = (inputs[f"{prefix}_start"], inputs[f"{prefix}_end"])
    return dataclasses.replace(DEFAULTS, **values)


def send_batch_progress(node_id, number: int, total: int, frames) -> None:
    instance = getattr(server.PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(PROGRESS_EVENT, {"node": node_id, "text": f"batch {number + 1}/{total} (frames "
                                            f"{', '.join(map(str, frames))})"}, instance.client_id)


class FrescoKeyFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = DEFAULTS
        return io.Schema(
            node_id="Rerender_FrescoKeyFrames",
            display_name=NODE_NAME,
            category=CATEGORY,
            description="FRESCO (CVPR 2024) key frame translation: the key frames are rendered jointly in batches "
                        "(later batches share two anchors with the earlier ones) under FRESCO-guided attention "
                        "(efficient cross-frame, spatial- and temporal-guided) and FRESCO-aware optimisation of "
                        "the decoder features (spatial Gram + temporal flow losses), with background smoothing "
                        "when a foreground mask is given. Patch Propagator takes its output unchanged. With every "
                        "component off it equals KSampler img2img of each key frame with the same seed.",
            inputs=[
                io.Model.Input("model", tooltip="The model (not patched with Cross-Frame Attention: FRESCO brings "
                                                "its own)."),
                io.Conditioning.Input("positive", tooltip="Positive prompt conditioning. ControlNets applied upstream "
                                                          "on one hint per clip frame give each key frame its own "
                                                          "hint; a single hint applies to all frames."),
                io.Conditioning.Input("negative", tooltip="Negative prompt conditioning (the same ControlNets)."),
                io.Vae.Input("vae", tooltip="The model's VAE: encodes the frames, decodes the results (and x̂0 for "
                                            "background smoothing)."),
                io.Image.Input("frames", tooltip="The whole clip [N,H,W,3]; sides multiples of the VAE's scale."),
                KeyFrames.Input("keyframes", tooltip="Which frames to render (Key Frame Picker; FRESCO's adaptive "
                                                     "mode is its own choice); at least 2."),
                io.Int.Input("seed", default=d.seed, min=0, max=0xffffffffffffffff,
                             control_after_generate=io.ControlAfterGenerate.fixed,
                             tooltip="Noise seed; every key frame starts from the same noise, as the reference."),
                io.Int.Input("steps", default=d.steps, min=1, max=10000,
                             tooltip="Steps actually run (as KSampler); the full schedule has steps/denoise steps: "
                                     "15 at denoise 0.75 is the reference's 20-step grid."),
                io.Float.Input("cfg", default=d.cfg, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (the reference: 7.5)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default=d.sampler_name,
                               tooltip="Any host sampler but dpm_fast and dpm_adaptive (they pick their own "
                                       "evaluation points). The reference uses DDPM; per-step noise differs "
                                       "between the frames of a batch, as there."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default=d.scheduler,
                               tooltip="Any host scheduler (ddim_uniform gives the reference's timesteps)."),
                io.Float.Input("denoise", default=d.denoise, min=0.01, max=1.0, step=0.01,
                               tooltip="SDEdit strength (the reference's webUI: 0.75)."),
                io.Int.Input("batch_size", default=d.batch_size, min=3, max=64,
                             tooltip=f"Key frames rendered jointly (the reference: 8; later batches hold 2 shared "
                                     f"anchors + batch_size-2 new keys). Memory grows with it: at 512² on SD1.5 a "
                                     f"batch of 8 costs {_batch_cost_at_512(8, 'code')} in feature optimisation "
                                     f"with the code's loss form ({_batch_cost_at_512(8, 'paper')} with the "
                                     f"paper's), 4 costs {_batch_cost_at_512(4, 'code')} "
                                     f"({_batch_cost_at_512(4, 'paper')}); the UNet itself runs 2×batch_size "
                                     f"samples."),
                *period_inputs("cross_frame", "Efficient cross-frame attention (every frame attends to frame 0 and "
                               "the regions each later frame newly shows)", d.cross_frame_period,
                               "The reference: all steps."),
                io.Int.Input("spatial_guided_steps", default=d.spatial_guided_steps, min=0, max=10000,
                             tooltip="Spatial-guided attention (queries re-weighted by the input frame's own "
                                     "self-similarity): for this many executed steps from the first (the "
                                     "reference: 1; 0 = off)."),
                *period_inputs("temporal_guided", "Temporal-guided attention (along flow trajectories through the "
                               "batch)", d.temporal_guided_period, "The reference: while t >= 350 of 1000 (0 to 0.6)."),
                *period_inputs("optimization", "Feature optimisation of the decoder up-block inputs",
                               d.optimization_period, "The reference: the first 15 of 20 steps (0 to 0.7)."),
                io.Boolean.Input("spatial_loss", default=d.spatial_loss,
                                 tooltip="Feature optimisation's spatial (intra-frame Gram) loss: keeps each frame's "
                                         "token self-similarity that of the input frame (code: L1 x100; paper Eq. "
                                         "6: squared L2 x50; see loss_form)."),
                io.Boolean.Input("temporal_loss", default=d.temporal_loss,
                                 tooltip="Feature optimisation's temporal (inter-frame flow-warp) loss: features of "
                                         "consecutive key frames agree along the flow (code: both directions over "
                                         "the cyclic pairs, x2; paper Eq. 5: one direction; see loss_form)."),
                io.Int.Input("iterations", default=d.iterations, min=0, max=1000,
                             tooltip="Adam iterations per optimised step and layer (the reference: 20)."),
                io.Float.Input("learning_rate", default=d.learning_rate, min=0.001, max=10.0, step=0.01,
                               tooltip="Adam learning rate (the code: 0.2, the default; the paper: 0.4)."),
                *period_inputs("smoothing", "Background smoothing of x̂0 (needs `mask`)", d.smoothing_period,
                               "The reference: steps 16 and 17 of 20 (0.8 to 0.85)."),
                VideoFlow.Input("flow", optional=True,
                                tooltip="Flow of these frames (Flow Estimation); needed by cross-frame and temporal-"
                                        "guided attention, the temporal loss and smoothing."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Foreground mask (1 = foreground), one per clip frame or one for all, from "
                                      "any segmentation node (the host's Remove Background among them). Without it "
                                      "background smoothing is off."),
                io.Combo.Input("loss_form", options=list(fo.LOSS_FORMS), default=d.loss_form, optional=True,
                               tooltip="How feature optimisation writes its losses. code (default, FRESCO's "
                                       "diffusion_hacked.py optimize_feature, which made the official results): "
                                       "Gram L1 x100, flow loss both directions over the cyclic pairs x2, the last "
                                       "Adam iterate. paper (Eq. 5/6): Gram squared L2 x50 (computed from C x C "
                                       "products: far less memory at the 64x64 layer), flow loss one direction "
                                       "over adjacent pairs, the lowest-loss iterate kept (set learning_rate 0.4 "
                                       "for the paper's rate)."),
            ],
            outputs=[
                io.Image.Output("images", display_name="key_frames", tooltip="The rendered key frames, in key order."),
                io.Latent.Output("latent", display_name="key_frame_latents",
                                 tooltip="Their latents (the VAE's raw space)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None):
        """Queue-time refusal of a sampler FRESCO cannot steer, on `sampler_name` alone (as the Key Frame Sampler:
        the host checks the other widgets against their declared ranges; the node checks all of them when it runs)."""
        return sampler_refusal(sampler_name, NODE_NAME)

    @classmethod
    def execute(cls, model, positive, negative, vae, frames, keyframes, flow=None, mask=None,
                **widgets) -> io.NodeOutput:
        settings = settings_from(widgets)
        node_id = cls.hidden.unique_id
        previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        progress = comfy.utils.ProgressBar(1, node_id=node_id)

        def on_step(batch, step, x0, done, total):
            preview = None if previewer is None else previewer.decode_latent_to_preview_image("JPEG", x0[-1:])
            progress.update_absolute(done, total, preview)

        renderer = FrescoRenderer(model, positive, negative, vae, frames, keyframes, flow, mask, settings,
                                  on_step=on_step, on_batch=lambda number, total, batch_frames: send_batch_progress(
                                      node_id, number, total, batch_frames))
        images, latents, stats = renderer.run()
        logging.info("%s: %s", NODE_NAME, stats.report[0])
        return io.NodeOutput(images, {"samples": latents}, ui=ui.PreviewText("\n".join(stats.report)))


NODES = [FrescoKeyFrames]
