"""Tune-A-Video nodes: one-shot tuning of an image model on the input clip, and save / load of what was tuned.

Everything goes through the host's patch points, on a clone, so the input MODEL never changes:
- sparse-causal self-attention: an `attn1_patch` that swaps the K/V inputs (composes with other packs' patches);
- temporal attention after each transformer block's feed-forward: an object patch that puts, at the block's path,
  a shallow copy of the block (same submodules, same weight keys) with the temporal attention appended;
- the tuned query projections: "diff" weight patches on the host's own keys (on top of any LoRA already there).
Training follows the host's TrainLoraNode: gradients inside `inference_mode(False)`, a private deep copy of the
UNet, the trained weight changes as weight wrappers, the host's guider to run the model, its gradient checkpointing.
"""
import copy
import logging
import os
from typing import Dict, List, Tuple

import safetensors.torch
import torch
from tqdm.auto import trange

import comfy.model_management as mm
import comfy.model_sampling
import comfy.samplers
import comfy.utils
import folder_paths
from comfy.ldm.modules.attention import BasicTransformerBlock
from comfy_api.latest import io, ui
from comfy_extras import nodes_train

from ..rerender.tune_a_video import (TRAINED_PROJECTIONS, TemporalAttention, TunedParameters, base_fingerprint,
                                     check_frame_sizes, select_frames, sparse_causal_inputs, tuning_loss)
from .inversion import start_noise
from .types import Inversion
from .validation import outside_declared

CATEGORY = "Rerender"
NODE_NAME = "Tune-A-Video"
FOLDER = "tune_a_video"
TunedVideo = io.Custom("RERENDER_TUNE_A_VIDEO")
LossMap = io.Custom("LOSS_MAP")  # the host's type: its "Plot Loss Graph" node draws it
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
folder_paths.folder_names_and_paths[FOLDER] = (folder_paths.folder_names_and_paths[FOLDER][0], {".safetensors"})


def videos_in_batch(extra_options) -> int:
    """One video per cond/uncond chunk of the host's batch (the whole clip is one latent batch)."""
    return max(1, len(extra_options.get("cond_or_uncond") or [0]))


class SparseCausalAttention:
    """attn1_patch: self-attention K/V inputs of frame i become frames 0 and i-1."""

    def __call__(self, n, context_attn1, value_attn1, extra_options):
        if context_attn1.shape[1] != n.shape[1]:  # not self-attention (a block with disable_self_attn)
            return n, context_attn1, value_attn1
        videos = videos_in_batch(extra_options)
        context = sparse_causal_inputs(context_attn1, videos)
        value = context if value_attn1 is context_attn1 else sparse_causal_inputs(value_attn1, videos)
        return n, context, value


class TemporalTransformerBlock(BasicTransformerBlock):
    """The host's transformer block followed by temporal attention, as the reference's inflated block. Built by
    `inflate` as a shallow copy of an existing block: it shares every submodule (so the host's weight keys, LoRA
    patches and attention patches all still apply) and adds `attn_temp`."""

    def forward(self, x, context=None, transformer_options={}):
        x = super().forward(x, context=context, transformer_options=transformer_options)
        return self.attn_temp(x, videos_in_batch(transformer_options))


def inflate(block: BasicTransformerBlock, temporal: TemporalAttention) -> TemporalTransformerBlock:
    inflated = TemporalTransformerBlock.__new__(TemporalTransformerBlock)
    inflated.__dict__.update(block.__dict__)
    inflated._modules = dict(block._modules)
    inflated._parameters = dict(block._parameters)
    inflated._buffers = dict(block._buffers)
    inflated.attn_temp = temporal
    return inflated


def transformer_blocks(model) -> Dict[str, BasicTransformerBlock]:
    """{path from the BaseModel: block} of every transformer block of the UNet, read through the patcher's object
    patches (so a block another pack replaced is the one inflated)."""
    diffusion_model = model.get_model_object("diffusion_model")
    blocks = {}
    for name, module in diffusion_model.named_modules():
        if isinstance(module, BasicTransformerBlock) and not isinstance(module, TemporalTransformerBlock):
            blocks[f"diffusion_model.{name}"] = module
    return blocks


def new_temporal_attention(block: BasicTransformerBlock) -> TemporalAttention:
    return TemporalAttention(block.attn1.to_q.in_features, block.n_heads, block.d_head)


def query_keys(blocks: Dict[str, BasicTransformerBlock]) -> List[str]:
    return [f"{path}.{projection}.weight" for path in blocks for projection in TRAINED_PROJECTIONS]


def is_tuned(model) -> bool:
    patches = model.model_options.get("transformer_options", {}).get("patches", {}).get("attn1_patch", [])
    return any(isinstance(p, SparseCausalAttention) for p in patches)


def install_video_attention(model, temporal: Dict[str, TemporalAttention]) -> None:
    """Sparse-causal self-attention everywhere and a temporal attention after each listed block, on `model`
    (a clone)."""
    blocks = transformer_blocks(model)
    missing = sorted(set(temporal) - set(blocks))
    if missing:
        raise ValueError(f"{NODE_NAME}: the model has no transformer block at {missing[:3]}; the tuned parameters "
                         "are for another architecture.")
    for path, module in temporal.items():
        model.add_object_patch(path, inflate(blocks[path], module))
    model.set_model_attn1_patch(SparseCausalAttention())


def apply_tuned(model, tuned: TunedParameters):
    """A clone of `model` with the tuned parameters installed (the input is not modified)."""
    if is_tuned(model):
        raise ValueError(f"{NODE_NAME}: this model already carries Tune-A-Video parameters; connect the base "
                         "model instead.")
    expected = fingerprint(model)
    if tuned.fingerprint != expected:
        raise ValueError(f"{NODE_NAME}: these tuned parameters were made on another base model (fingerprint "
                         f"{tuned.fingerprint[:12]}…, this model {expected[:12]}…); load the checkpoint it was "
                         "tuned on, or tune again.")
    tuned_model = model.clone()
    install_video_attention(tuned_model, tuned.temporal)
    applied = tuned_model.add_patches({key: (delta,) for key, delta in tuned.query_deltas.items()})
    if len(applied) != len(tuned.query_deltas):
        raise ValueError(f"{NODE_NAME}: {len(tuned.query_deltas) - len(applied)} tuned projections have no "
                         "matching weight in this model.")
    return tuned_model


def frozen_tensor(model, key: str) -> torch.Tensor:
    """A base weight as stored, not as patched (the patcher's backup holds the original while it is loaded)."""
    backup = model.backup.get(key)
    return backup.weight if backup is not None else comfy.utils.get_attr(model.model, key)


def fingerprint(model) -> str:
    """Shapes of every UNet weight plus the bytes of the first and last query projections."""
    diffusion_model = model.get_model_object("diffusion_model")
    shapes = [(f"diffusion_model.{k}", v.shape) for k, v in diffusion_model.state_dict().items()
              if ".attn_temp." not in k]
    keys = query_keys(transformer_blocks(model))
    if not keys:
        raise ValueError(f"{NODE_NAME}: the model has no transformer blocks; connect a UNet model (SD1.x, SD2.x).")
    return base_fingerprint(shapes, [frozen_tensor(model, keys[0]), frozen_tensor(model, keys[-1])])


def prediction_kind(model) -> Tuple[str, float]:
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        return "v", float(getattr(sampling, "sigma_data", 1.0))
    if isinstance(sampling, comfy.model_sampling.EPS) and isinstance(sampling,
                                                                     comfy.model_sampling.ModelSamplingDiscrete):
        return "eps", 1.0
    raise ValueError(f"{NODE_NAME}: the model predicts {type(sampling).__name__}; Tune-A-Video tunes discrete-time "
                     "ε- or v-prediction models (SD1.x, SD2.x).")


# ------------------------------------------------------------------------------------------------- training
class QueryDelta(torch.nn.Module):
    """Weight wrapper (the host's training mechanism): the weight the forward pass sees is base + delta, with
    delta trained from zero. `base` remembers the (patched) base weight for the reference's weight decay."""

    def __init__(self, shape):
        super().__init__()
        self.delta = torch.nn.Parameter(torch.zeros(shape))
        self.base = None

    def __call__(self, weight):
        self.base = weight.detach()
        return weight + self.delta.to(weight)

    def move_to(self, device):
        self.to(device=device)
        return self.delta.numel() * self.delta.element_size()


class TuningSampler(comfy.samplers.Sampler):
    """The host's TrainSampler pattern: the guider hands it the loaded model, conds and the clip's latents."""

    def __init__(self, settings, trained, optimizer, kind, sigma_data, on_step):
        self.settings, self.trained, self.optimizer = settings, trained, optimizer
        self.kind, self.sigma_data, self.on_step = kind, sigma_data, on_step
        self.steps_done, self.interrupted = 0, False

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        s = self.settings
        model_wrap.conds = nodes_train.process_cond_list(model_wrap.conds)
        sampling = model_wrap.inner_model.model_sampling
        generator = torch.Generator().manual_seed(s["seed"])
        x0 = latent_image
        device = x0.device
        precision = PRECISIONS[s["mixed_precision"]]
        scaler = torch.amp.GradScaler(device.type) if precision == torch.float16 and device.type == "cuda" else None
        deltas = [w for w in self.trained if isinstance(w, QueryDelta)]
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for step in (bar := trange(s["steps"], desc="Tune-A-Video", disable=not comfy.utils.PROGRESS_BAR_ENABLED)):
            try:
                mm.throw_exception_if_processing_interrupted()
            except mm.InterruptProcessingException:
                self.interrupted = True
                break
            # one timestep for the whole clip, per-frame noise (reference: batch 1 video, randint(0, T))
            timestep = torch.randint(0, len(sampling.sigmas), (1,), generator=generator)
            sigma = sampling.sigma(timestep.float()).to(device).expand(x0.shape[0])
            eps = torch.randn(x0.shape, generator=generator).to(x0)
            x = sampling.noise_scaling(sigma.view(-1, 1, 1, 1), eps, x0)
            with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
                denoised = model_wrap(x, sigma, **extra_args)
            loss = tuning_loss(self.kind, x, denoised, x0, eps, sigma, self.sigma_data)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, s["max_grad_norm"])
            with torch.no_grad():  # AdamW's decoupled decay on the full weight base + delta, as the reference
                for wrapper in deltas:
                    if wrapper.base is not None:
                        wrapper.delta.sub_(s["learning_rate"] * s["weight_decay"] *
                                           (wrapper.base.to(wrapper.delta) + wrapper.delta))
            if scaler:
                scaler.step(self.optimizer)
                scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.steps_done = step + 1
            bar.set_postfix({"loss": f"{loss.item():.4f}"})
            try:
                self.on_step(step, loss.item())
            except mm.InterruptProcessingException:  # the UI progress hook raises on interrupt
                self.interrupted = True
                break
        return torch.zeros_like(latent_image)


def training_copy(base):
    """The BaseModel with a private deep copy of its UNet (normal tensors even when the weights were loaded under
    inference mode; the host's TrainLoraNode reloads the model for the same reason); the rest is shared."""
    private = copy.copy(base)
    private._modules = dict(base._modules)
    private._parameters = dict(base._parameters)
    private._buffers = dict(base._buffers)
    private.diffusion_model = copy.deepcopy(base.diffusion_model).requires_grad_(False).train()
    return private


def memory_estimate(model, temporal: Dict[str, TemporalAttention], query_numel: int, latent_shape) -> Dict[str, int]:
    """Bytes: the private training copy of the UNet, the trained parameters with their gradients and AdamW state
    (×4, float32), and the activations kept for backward (rough: a multiple of one forward's memory estimate)."""
    trained = query_numel + sum(p.numel() for m in temporal.values() for p in m.parameters())
    unet = mm.module_size(model.get_model_object("diffusion_model"))
    activations = int(model.memory_required(list(latent_shape)))
    return {"unet_copy": unet, "trained_state": trained * 4 * 4, "activations": activations, "trained": trained}


def tune(model, positive, latent: torch.Tensor, settings: dict, on_step=None):
    """Tune a copy of `model` on the clip `latent` [F,C,h,w] (raw VAE latents) and return (TunedParameters,
    losses, steps done, interrupted, memory estimate)."""
    kind, sigma_data = prediction_kind(model)
    base_print = fingerprint(model)
    with torch.inference_mode(False), torch.enable_grad():
        mm.unload_model_and_clones(model)  # the shared weights unpatched before the private copy
        private = training_copy(model.model)
        training = model.clone(model_override=(private, ({}, {}, {}, set())))
        blocks = transformer_blocks(training)
        temporal = {path: new_temporal_attention(block) for path, block in blocks.items()}
        wrappers = {}
        for key in query_keys(blocks):
            wrappers[key] = QueryDelta(comfy.utils.get_attr(training.model, key).shape)
            training.add_weight_wrapper(key, wrappers[key])
        install_video_attention(training, temporal)
        latents = latent.detach().clone().float()
        estimate = memory_estimate(training, temporal, sum(w.delta.numel() for w in wrappers.values()), latents.shape)

        trained_params = [w.delta for w in wrappers.values()] + [p for m in temporal.values()
                                                                 for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW([
            {"params": [w.delta for w in wrappers.values()], "weight_decay": 0.0},  # decayed on base + delta
            {"params": trained_params[len(wrappers):], "weight_decay": settings["weight_decay"]}],
            lr=settings["learning_rate"], betas=(0.9, 0.999), eps=1e-8)
        losses = []

        def record(step, loss):
            losses.append(loss)
            if on_step is not None:
                on_step(step, loss)

        sampler = TuningSampler(settings, list(wrappers.values()), optimizer, kind, sigma_data, record)
        checkpointed = []
        if settings["gradient_checkpointing"]:
            checkpointed = nodes_train.find_modules_at_depth(private.diffusion_model, depth=1)
            for module in checkpointed:
                nodes_train.patch(module)
        guider = nodes_train.TrainGuider(training)
        guider.set_conds(positive)
        if mm.get_torch_device().type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            mm.in_training = True
            guider.sample(torch.zeros_like(latents), latents, sampler, torch.tensor([1.0, 0.0]), seed=settings["seed"])
        finally:
            mm.in_training = False
            for module in checkpointed:
                nodes_train.unpatch(module)
            mm.unload_model_and_clones(training)
        if mm.get_torch_device().type == "cuda":
            estimate["measured_peak"] = torch.cuda.max_memory_allocated()
        deltas = {key: w.delta.detach().float().cpu().clone() for key, w in wrappers.items()}
        for module in temporal.values():
            module.to("cpu").requires_grad_(False)
    info = {"steps": sampler.steps_done, "frames": latents.shape[0], "learning_rate": settings["learning_rate"],
            "seed": settings["seed"], "prediction": kind}
    return (TunedParameters(deltas, temporal, base_print, info), losses, sampler.steps_done, sampler.interrupted,
            estimate)


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MB"


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
                io.Latent.Output(display_name="clip", tooltip="The tuned frames' latents (frame_count at "
                                                              "frame_stride): invert these, or sample from them."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, steps=1, frame_count=2, frame_stride=1, learning_rate=3e-5, **others):
        if steps is not None and steps < 1:
            return f"{NODE_NAME}: steps is {steps}; tune for at least 1 step (reference 500)."
        if frame_count is not None and frame_count < 2:
            return f"{NODE_NAME}: frame_count is {frame_count}; tuning needs a clip of at least 2 frames."
        if frame_stride is not None and frame_stride < 1:
            return f"{NODE_NAME}: frame_stride is {frame_stride}; use 1 or more."
        if learning_rate is not None and learning_rate <= 0:
            return f"{NODE_NAME}: learning_rate must be positive (reference 3e-5)."
        problem = outside_declared(cls, steps=steps, frame_count=frame_count, frame_stride=frame_stride,
                                   learning_rate=learning_rate, **others)
        return True if problem is None else f"{NODE_NAME}: {problem}."

    @classmethod
    def execute(cls, model, positive, frames=None, vae=None, latent=None, frame_count=24, frame_stride=2,
                start_frame=0, steps=500, learning_rate=3e-5, weight_decay=1e-2, max_grad_norm=1.0, seed=33,
                gradient_checkpointing=True, mixed_precision="fp16") -> io.NodeOutput:
        problem = cls.validate_inputs(steps=steps, frame_count=frame_count, frame_stride=frame_stride,
                                      learning_rate=learning_rate)
        if problem is not True:
            raise ValueError(problem)
        if mixed_precision not in PRECISIONS:
            raise ValueError(f"{NODE_NAME}: mixed_precision must be one of {list(PRECISIONS)}.")
        if is_tuned(model):
            raise ValueError(f"{NODE_NAME}: this model is already tuned; connect the base model.")
        prediction_kind(model)
        clip = clip_latents(frames, vae, latent, frame_count, frame_stride, start_frame)
        settings = dict(steps=steps, learning_rate=learning_rate, weight_decay=weight_decay,
                        max_grad_norm=max_grad_norm, seed=seed, gradient_checkpointing=gradient_checkpointing,
                        mixed_precision=mixed_precision)
        bar = comfy.utils.ProgressBar(steps, node_id=cls.hidden.unique_id)
        tuned, losses, done, interrupted, estimate = tune(
            model, positive, clip, settings, on_step=lambda step, loss: bar.update_absolute(step + 1, steps))
        report = [f"{NODE_NAME}: {done} of {steps} steps on {clip.shape[0]} frames "
                  f"({clip.shape[-1] * 8}x{clip.shape[-2] * 8} px at the usual 1/8 latent scale), "
                  f"{tuned.parameter_count():,} trained parameters",
                  f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}" if losses else "loss: no step run",
                  f"memory estimate: UNet copy {_mb(estimate['unet_copy'])}, trained state "
                  f"{_mb(estimate['trained_state'])}, activations ~{_mb(estimate['activations'])} per forward"
                  + (f"; measured peak {_mb(estimate['measured_peak'])}" if "measured_peak" in estimate else "")]
        if interrupted:
            report.append(f"interrupted: the tuned model keeps the state after {done} steps")
            logging.warning("%s interrupted after %d of %d steps; keeping that state", NODE_NAME, done, steps)
        logging.info("; ".join(report))
        return io.NodeOutput(apply_tuned(model, tuned), tuned, {"loss": losses}, {"samples": clip},
                             ui=ui.PreviewText("\n".join(report)))


def clip_latents(frames, vae, latent, frame_count, frame_stride, start_frame) -> torch.Tensor:
    """The clip's latents [F,C,h,w] at the selected frames; every check happens before the VAE runs."""
    if (frames is None) == (latent is None):
        raise ValueError(f"{NODE_NAME}: connect either `frames` (with `vae`) or `latent`, not "
                         f"{'both' if frames is not None else 'neither'}.")
    if frames is not None:
        if vae is None:
            raise ValueError(f"{NODE_NAME}: `frames` need a `vae` to encode them; connect one, or give `latent`.")
        items = list(frames) if isinstance(frames, (list, tuple)) else [f for f in frames]
        check_frame_sizes([f.shape for f in items])
        indices = select_frames(len(items), frame_count, frame_stride, start_frame)
        return vae.encode(torch.stack([items[i] for i in indices])[..., :3]).float()
    samples = latent["samples"]
    if samples.dim() != 4:
        raise ValueError(f"{NODE_NAME}: `latent` has shape {tuple(samples.shape)}; give one image latent per frame "
                         "[frames, channels, h, w].")
    indices = select_frames(samples.shape[0], frame_count, frame_stride, start_frame)
    return samples[indices].float()


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
    def execute(cls, tuned: TunedParameters, filename_prefix) -> io.NodeOutput:
        root = folder_paths.get_folder_paths(FOLDER)[0]
        prefix = filename_prefix.strip().removeprefix(f"{FOLDER}/") or "clip"
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, root)
        file = f"{name}_{counter:05}_.safetensors"
        os.makedirs(folder, exist_ok=True)
        tensors, metadata = tuned.state_dict()
        safetensors.torch.save_file(tensors, os.path.join(folder, file), metadata=metadata)
        relative = os.path.join(subfolder, file) if subfolder else file
        logging.info("%s: saved %d tensors to %s", NODE_NAME, len(tensors), os.path.join(folder, file))
        return io.NodeOutput(relative, ui=ui.PreviewText(f"saved models/{FOLDER}/{relative}"))


def load_tuned(path: str) -> TunedParameters:
    with safetensors.safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return TunedParameters.from_state_dict(tensors, metadata)


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


class InvertedNoise:
    """A NOISE for SamplerCustomAdvanced that starts the sampler, from an all-zero latent, exactly at the inverted
    clip (the reference's x_T from DDIM inversion); the seed is only reported."""

    def __init__(self, noise: torch.Tensor, seed: int = 0):
        self.noise, self.seed = noise, seed

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        if tuple(samples.shape) != tuple(self.noise.shape):
            raise ValueError(f"Inverted Noise: the latent to sample {tuple(samples.shape)} is not the inverted clip "
                             f"{tuple(self.noise.shape)}; connect this node's `latent` output as latent_image.")
        return self.noise.clone()


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
        top = int(inversion.sigmas.argmax())
        noise = start_noise(model, inversion.state(top), float(inversion.sigmas[top]))
        return io.NodeOutput(InvertedNoise(noise), {"samples": torch.zeros_like(noise)})


NODES = [TuneAVideo, SaveTuneAVideo, LoadTuneAVideo, InvertedNoiseNode]
