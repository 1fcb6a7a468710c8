"""Tune-A-Video nodes: one-shot tuning of an image model on the input clip, and save / load of what was tuned."""
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..engine.tune_a_video import (FOLDER, PRECISIONS, apply_tuned, load_tuned, save_tuned,
                                   tune_on_clip)
from .types import LossMap, TunedVideo
from .categories import TUNE_A_VIDEO as CATEGORY



class TuneAVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Rerender_TuneAVideo",
            display_name="Tune-A-Video (One-Shot Tuning)",
            category=CATEGORY,
            description="Tune-A-Video: inflates the image model for video (sparse-causal self-attention over the "
                        "first and previous frame, a new temporal attention in every transformer block) and tunes "
                        "the query projections and the temporal attention on the one input clip. Sample the "
                        "returned MODEL over the whole clip as one latent batch, ideally from the clip inverted with "
                        "it.",
            inputs=[
                io.Model.Input("model", tooltip="The image model (SD1.x / SD2.x); it is cloned, never modified."),
                io.Conditioning.Input("positive", tooltip="The prompt describing the input clip (the reference tunes "
                                                          "with the source prompt, e.g. 'a man is skiing')."),
                io.Image.Input("frames", optional=True,
                               tooltip="The clip as an image batch in frame order (needs `vae`). Give this or "
                                       "`latent`."),
                io.Vae.Input("vae", optional=True, tooltip="Encodes `frames` (posterior mode, as VAE Encode)."),
                io.Latent.Input("latent", optional=True,
                                tooltip="The clip already encoded, one latent per frame; used instead of frames."),
                io.Int.Input("frame_count", default=24, min=2, max=4096,
                             tooltip="How many frames to tune on (reference 24)."),
                io.Int.Input("frame_stride", default=2, min=1, max=1000,
                             tooltip="Take every n-th frame (reference sample_frame_rate 2)."),
                io.Int.Input("start_frame", default=0, min=0, max=100000, tooltip="First frame taken (reference 0)."),
                io.Int.Input("steps", default=500, min=1, max=100000,
                             tooltip="Training steps (reference max_train_steps 500; 300-500 is typical)."),
                io.Float.Input("learning_rate", default=3e-5, min=1e-8, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate, constant (reference 3e-5)."),
                io.Float.Input("weight_decay", default=1e-2, min=0.0, max=1.0, step=1e-3,
                               tooltip="AdamW decoupled weight decay (reference 1e-2)."),
                io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Gradient clipping by total norm (reference 1.0)."),
                io.Int.Input("seed", default=33, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate="fixed",
                             tooltip="Seed of the timesteps and noise of every step (reference 33)."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in the backward pass (the host's checkpointing of "
                                         "the UNet's top-level blocks): much less memory, ~30% slower. Reference on."),
                io.Combo.Input("mixed_precision", options=list(PRECISIONS), default="fp16",
                               tooltip="Autocast dtype of the forward pass; trained parameters stay float32 "
                                       "(reference fp16; fp16 uses a gradient scaler on CUDA). Use fp32 or bf16 on "
                                       "a CPU."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The tuned clone with sparse-causal and temporal "
                                                              "attention; sample the whole clip as one batch."),
                TunedVideo.Output(display_name="tuned", tooltip="The tuned parameters (for Save Tune-A-Video)."),
                LossMap.Output(display_name="loss_map", tooltip="Training loss per step (the host's Plot Loss Graph "
                                                                "draws it)."),
                io.Latent.Output(display_name="clip_latents", tooltip="The tuned frames' latents (frame_count at "
                                                              "frame_stride): invert these, or sample from them."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, frames=None, vae=None, latent=None, frame_count=24, frame_stride=2,
                start_frame=0, steps=500, learning_rate=3e-5, weight_decay=1e-2, max_grad_norm=1.0, seed=33,
                gradient_checkpointing=True, mixed_precision="fp16") -> io.NodeOutput:
        settings = dict(steps=steps, learning_rate=learning_rate, weight_decay=weight_decay,
                        max_grad_norm=max_grad_norm, seed=seed, gradient_checkpointing=gradient_checkpointing,
                        mixed_precision=mixed_precision)
        progress_bar = lambda total: comfy.utils.ProgressBar(total, node_id=cls.hidden.unique_id)  # noqa: E731
        tuned_model, tuned, losses, clip, report = tune_on_clip(model, positive, frames, vae, latent, frame_count,
                                                                frame_stride, start_frame, settings, progress_bar)
        return io.NodeOutput(tuned_model, tuned, {"loss": losses}, {"samples": clip},
                             ui=ui.PreviewText("\n".join(report)))


class SaveTuneAVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Rerender_TuneAVideoSave",
            display_name="Save Tune-A-Video",
            category=CATEGORY,
            description=f"Saves the tuned parameters as safetensors in models/{FOLDER}, so the clip can be edited "
                        "again without tuning (Load Tune-A-Video).",
            inputs=[
                TunedVideo.Input("tuned", tooltip="The tuned parameters from Tune-A-Video."),
                io.String.Input("filename_prefix", default="tune_a_video/clip",
                                tooltip=f"File name prefix under models/{FOLDER}; a counter is appended."),
            ],
            outputs=[io.String.Output(display_name="filename", tooltip=f"The saved file, relative to models/{FOLDER}.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, tuned, filename_prefix) -> io.NodeOutput:
        relative = save_tuned(tuned, filename_prefix)
        return io.NodeOutput(relative, ui=ui.PreviewText(f"saved models/{FOLDER}/{relative}"))


class LoadTuneAVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Rerender_TuneAVideoLoad",
            display_name="Load Tune-A-Video",
            category=CATEGORY,
            description="Applies saved Tune-A-Video parameters to the base model they were tuned on (checked by a "
                        "fingerprint of its weights): the same tuned MODEL as right after tuning.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the parameters were tuned on; it is cloned."),
                io.Combo.Input("tuned_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip=f"A file saved by Save Tune-A-Video (models/{FOLDER})."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The tuned clone."),
                     TunedVideo.Output(display_name="tuned", tooltip="The loaded parameters.")],
        )

    @classmethod
    def execute(cls, model, tuned_name) -> io.NodeOutput:
        tuned = load_tuned(folder_paths.get_full_path_or_raise(FOLDER, tuned_name))
        return io.NodeOutput(apply_tuned(model, tuned), tuned)


NODES = [TuneAVideo, SaveTuneAVideo, LoadTuneAVideo]
