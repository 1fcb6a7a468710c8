"""Host-bound Tune-A-Video: model surgery for video attention, the one-shot tuning loop, save / load of what was
tuned. Imports the host and `rerender`, never `nodes`.

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
from comfy_extras import nodes_train

from ..rerender.tune_a_video import (TRAINED_PROJECTIONS, TemporalAttention, TunedParameters, base_fingerprint,
                                     check_frame_sizes, select_frames, sparse_causal_inputs, tuning_loss)

NODE_NAME = "Tune-A-Video"
FOLDER = "tune_a_video"
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


def new_temporal_attention(block: BasicTransformerBlock, generator: torch.Generator) -> TemporalAttention:
    return TemporalAttention(block.attn1.to_q.in_features, block.n_heads, block.d_head, generator)


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
        initial = torch.Generator().manual_seed(settings["seed"])  # the temporal attention's initial weights
        temporal = {path: new_temporal_attention(block, initial) for path, block in blocks.items()}
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


def load_tuned(path: str) -> TunedParameters:
    with safetensors.safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return TunedParameters.from_state_dict(tensors, metadata)




def check_tuning(steps, frame_count, frame_stride, learning_rate) -> str | None:
    """The queue-time refusals of the tuning node's numbers, as one line; None when they are fine."""
    if steps is not None and steps < 1:
        return f"{NODE_NAME}: steps is {steps}; tune for at least 1 step (reference 500)."
    if frame_count is not None and frame_count < 2:
        return f"{NODE_NAME}: frame_count is {frame_count}; tuning needs a clip of at least 2 frames."
    if frame_stride is not None and frame_stride < 1:
        return f"{NODE_NAME}: frame_stride is {frame_stride}; use 1 or more."
    if learning_rate is not None and learning_rate <= 0:
        return f"{NODE_NAME}: learning_rate must be positive (reference 3e-5)."
    return None


def tune_on_clip(model, positive, frames, vae, latent, frame_count: int, frame_stride: int, start_frame: int,
                 settings: dict, progress_bar):
    """What the Tune-A-Video node computes: (tuned MODEL clone, TunedParameters, losses, clip latents, report lines);
    every refusal before the first training step. `progress_bar(total)` makes the host's progress bar."""
    problem = check_tuning(settings["steps"], frame_count, frame_stride, settings["learning_rate"])
    if problem is not None:
        raise ValueError(problem)
    if settings["mixed_precision"] not in PRECISIONS:
        raise ValueError(f"{NODE_NAME}: mixed_precision must be one of {list(PRECISIONS)}.")
    if is_tuned(model):
        raise ValueError(f"{NODE_NAME}: this model is already tuned; connect the base model.")
    prediction_kind(model)
    clip = clip_latents(frames, vae, latent, frame_count, frame_stride, start_frame)
    steps = settings["steps"]
    bar = progress_bar(steps)
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
    return apply_tuned(model, tuned), tuned, losses, clip, report


def save_tuned(tuned: TunedParameters, filename_prefix: str) -> str:
    """Writes `tuned` as safetensors under models/tune_a_video; returns its path relative to that folder."""
    root = folder_paths.get_folder_paths(FOLDER)[0]
    prefix = filename_prefix.strip().removeprefix(f"{FOLDER}/") or "clip"
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, root)
    file = f"{name}_{counter:05}_.safetensors"
    os.makedirs(folder, exist_ok=True)
    tensors, metadata = tuned.state_dict()
    safetensors.torch.save_file(tensors, os.path.join(folder, file), metadata=metadata)
    logging.info("%s: saved %d tensors to %s", NODE_NAME, len(tensors), os.path.join(folder, file))
    return os.path.join(subfolder, file) if subfolder else file
