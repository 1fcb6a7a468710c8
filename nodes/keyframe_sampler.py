"""Structure-guided key frame sampler node: Rerender's key frame translation with any host sampler."""
import logging

import comfy.samplers
import comfy.utils
import latent_preview
import server
from comfy_api.latest import io, ui

from ..engine.cross_frame_attention import missing_attention_note
from ..engine.rerender_a_video import NODE_NAME, KeyframeRenderer, KeyframeSettings, StepInfo
from .types import KeyFrames, VideoFlow
from .validation import sampler_refusal
from .categories import RERENDER_A_VIDEO as CATEGORY

PROGRESS_EVENT = "rerender.keyframe_progress"
DEFAULTS = KeyframeSettings()


def _fraction(name: str, default: float, tooltip: str):
    return io.Float.Input(name, default=default, min=0.0, max=1.0, step=0.01, tooltip=tooltip)


def period_inputs(prefix: str, label: str, period, note: str):
    """A constraint's active period as two widgets, `<prefix>_start` and `<prefix>_end` (fractions of the schedule)."""
    return [_fraction(f"{prefix}_start", period[0], f"{label}: first step, as a fraction of the full schedule. "
                                                    f"{note}"),
            _fraction(f"{prefix}_end", period[1], f"{label}: last step, as a fraction of the full schedule; "
                                                  f"start >= end switches it off.")]


def send_key_frame_progress(node_id, number: int, index: int, total: int) -> None:
    """Tell the frontend which key frame is rendering (the pack's js shows it on the node)."""
    instance = getattr(server.PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(PROGRESS_EVENT, {"node": node_id, "key_frame": number, "frame_index": index,
                                            "total": total}, instance.client_id)


class KeyframeSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = DEFAULTS
        return io.Schema(
            node_id="Rerender_KeyframeSampler",
            display_name=NODE_NAME,
            category=CATEGORY,
            description="Rerender-A-Video's key frame translation: renders the anchor (the first key frame), then "
                        "each key frame in order under cross-frame constraints: cross-frame attention (patch the "
                        "model with Cross-Frame Attention), shape-aware x̂0 fusion, pixel-aware fusion toward the "
                        "warped previous outputs, and AdaIN. With every constraint off it equals KSampler img2img "
                        "of each key frame with the same seed.",
            inputs=[
                io.Model.Input("model", tooltip="The model; patch it with Cross-Frame Attention for the "
                                                "attention constraint."),
                io.Conditioning.Input("positive", tooltip="Positive prompt conditioning. ControlNets applied upstream "
                                                          "(Apply ControlNet (Advanced), chained as often as "
                                                          "wanted) on one hint per clip frame give each key frame "
                                                          "its own hint; a single hint applies to all frames."),
                io.Conditioning.Input("negative", tooltip="Negative prompt conditioning (the same ControlNets)."),
                io.Vae.Input("vae", tooltip="The model's VAE: encodes the frames, decodes the results (any "
                                            "channel count and scale)."),
                io.Image.Input("frames", tooltip="The whole clip [N,H,W,3]; sides multiples of the VAE's scale."),
                KeyFrames.Input("keyframes", tooltip="Which frames to render (from the Key Frame Picker); the "
                                                     "first is the anchor and is part of the output. With shot "
                                                     "cuts, each shot's first key frame is the anchor of that "
                                                     "shot's key frames."),
                io.Int.Input("seed", default=d.seed, min=0, max=0xffffffffffffffff,
                             control_after_generate=io.ControlAfterGenerate.fixed,
                             tooltip="Noise seed; every key frame starts from the same noise, as the reference."),
                io.Int.Input("steps", default=d.steps, min=1, max=10000,
                             tooltip="Steps actually run (as KSampler). The full schedule has steps/denoise steps: "
                                     "15 at denoise 0.75 is the reference's 20-step grid."),
                io.Float.Input("cfg", default=d.cfg, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (the reference uses 7.5)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default=d.sampler_name,
                               tooltip="Any host sampler but dpm_fast and dpm_adaptive, which pick their own "
                                       "evaluation points (refused at queue time). The reference uses DDIM."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default=d.scheduler,
                               tooltip="Any host scheduler (ddim_uniform reproduces the reference's timesteps)."),
                io.Float.Input("denoise", default=d.denoise, min=0.01, max=1.0, step=0.01,
                               tooltip="SDEdit strength: how much of the schedule runs. Constraint periods before "
                                       "the start are never reached; the node reports them."),
                *period_inputs("shape_fusion", "Shape-aware fusion (anchor x̂0 warped onto the frame)",
                               d.shape_period, "Early steps; hidden unless denoise > 0.85 at 20 steps."),
                *period_inputs("pixel_fusion", "Pixel-aware fusion (inpainting toward the warped previous outputs, "
                               "both ends excluded)", d.pixel_period, "Costs a rough pass per key frame."),
                *period_inputs("adain", "AdaIN (x̂0 colour statistics of the anchor)", d.adain_period,
                               "Late steps."),
                io.Float.Input("mask_strength", default=d.mask_strength, min=0.0, max=1.0, step=0.01,
                               tooltip="Pixel-aware fusion: weight of the reference inside its valid mask."),
                io.Float.Input("inner_strength", default=d.inner_strength, min=0.0, max=1.0, step=0.01,
                               tooltip="Pixel-aware fusion 'detail level': how much of the noise is kept where the "
                                       "reference is blended in (lower = smoother, fewer new details)."),
                io.Boolean.Input("smooth_boundary", default=d.smooth_boundary,
                                 tooltip="Blend the noise linearly on the mask's soft boundary to avoid seams."),
                io.Float.Input("fidelity_strength", default=d.fidelity_strength, min=0.0, max=2.0, step=0.05,
                               tooltip="λ of the fidelity-oriented encoding of the pixel reference (0 = plain "
                                       "VAE encode)."),
                io.Float.Input("fidelity_threshold", default=d.fidelity_threshold, min=0.0, max=2.0, step=0.01,
                               tooltip="Where the compensated encode decodes worse than this (mean abs error in "
                                       "[-1,1] units), compensation is dropped."),
                io.Boolean.Input("color_preserve", default=d.color_preserve,
                                 tooltip="Keep the input's colours. Off: render the anchor from pure noise first "
                                         "and match every key frame's colours to it (LAB histograms)."),
                VideoFlow.Input("flow", optional=True,
                                tooltip="Flow of these frames (Rerender Flow); needed by the fusion constraints."),
            ],
            outputs=[
                io.Image.Output("images", display_name="key_frames", tooltip="The rendered key frames, anchor first."),
                io.Latent.Output("latent", display_name="key_frame_latents",
                                 tooltip="Their latents (the VAE's raw space)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None):
        """Queue-time refusal of a sampler the constraints cannot steer. It takes `sampler_name` alone because the
        host reports a failed check once on every input the function takes, and checks the others itself against
        their declared ranges and options; the node checks everything again when it runs (linked widgets)."""
        return sampler_refusal(sampler_name, NODE_NAME)

    @classmethod
    def execute(cls, model, positive, negative, vae, frames, keyframes, seed, steps, cfg, sampler_name, scheduler,
                denoise, shape_fusion_start, shape_fusion_end, pixel_fusion_start, pixel_fusion_end, adain_start,
                adain_end, mask_strength, inner_strength, smooth_boundary, fidelity_strength, fidelity_threshold,
                color_preserve, flow=None) -> io.NodeOutput:
        settings = KeyframeSettings(
            seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, denoise=denoise,
            shape_period=(shape_fusion_start, shape_fusion_end), pixel_period=(pixel_fusion_start, pixel_fusion_end),
            adain_period=(adain_start, adain_end), mask_strength=mask_strength, inner_strength=inner_strength,
            smooth_boundary=smooth_boundary, fidelity_strength=fidelity_strength,
            fidelity_threshold=fidelity_threshold, color_preserve=color_preserve)
        node_id = cls.hidden.unique_id
        previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        progress = comfy.utils.ProgressBar(1, node_id=node_id)

        def on_step(info: StepInfo):
            preview = None if previewer is None else previewer.decode_latent_to_preview_image("JPEG", info.x0)
            progress.update_absolute(info.done, info.total, preview)

        renderer = KeyframeRenderer(
            model, positive, negative, vae, frames, keyframes, flow, settings, on_step=on_step,
            on_key_frame=lambda number, index, total: send_key_frame_progress(node_id, number, index, total))
        images, latents, stats = renderer.run()
        anchors = [keys[0] for keys in keyframes.shot_keys()]
        in_shots = f" in {len(anchors)} shots (anchors {', '.join(map(str, anchors))})" if len(anchors) > 1 else ""
        summary = (f"{len(keyframes.indices)} key frames{in_shots}; VAE {stats.vae_encodes} encodes + "
                   f"{stats.vae_decodes} decodes ({stats.vae_seconds:.1f} s); attention cache peak "
                   f"{stats.attention_cache_peak_bytes / 2 ** 20:.1f} MiB")
        logging.info("%s: %s", NODE_NAME, summary)
        report = [summary, *missing_attention_note(model), *stats.report]
        return io.NodeOutput(images, {"samples": latents}, ui=ui.PreviewText("\n".join(report)))


NODES = [KeyframeSampler]
