"""Host-bound DDIM inversion every stage of the pack can call (the Video Inversion node, TokenFlow, Tune-A-Video).

`invert_latents(model, conditioning, latents, editing_sigmas, inversion_steps, ...)` inverts a latent batch with
any MODEL (patched, LoRA'd or tuned): the model is called through the host's own sampling machinery
(`comfy.sample.sample_custom` with a custom KSAMPLER function, CFG 1), so its patches, wrappers, ControlNets and
memory management apply as in any host sampler. The DDIM step itself is rerender.inversion.
"""
import logging
import math
from typing import Callable, Optional

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..rerender import inversion as ddim
from .control_hints import check_control_hints, conditioning_for_frames
from .tune_a_video import is_tuned
from .vae import check_vae_size

NODE_NAME = "Video Inversion (DDIM)"
DEFAULT_INVERSION_STEPS = 200
DEFAULT_BATCH = 8


def editing_sigmas(model, steps: int, sampler_name: str, scheduler: str, denoise: float) -> torch.Tensor:
    """The executed sigma schedule (descending) the host's KSampler would run with these settings."""
    ksampler = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler_name, scheduler=scheduler,
                                       denoise=denoise, model_options=model.model_options)
    return ksampler.sigmas.detach().float().cpu()


def check_invertible(model, node: str) -> None:
    """Only the variance-exploding σ parameterisation (SD1.x/2.x/XL: ε, v, EDM) has DDIM's x = x0 + σ·ε form."""
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.EPS) or isinstance(sampling, comfy.model_sampling.X0):
        raise ValueError(f"{node}: DDIM inversion needs an ε- or v-prediction model (SD1.x, SD2.x, SDXL); this "
                         f"model's sampling is {type(sampling).__name__}.")


def start_noise(model, state: torch.Tensor, sigma: float) -> torch.Tensor:
    """The `noise` that makes a host sampler (latent_image all zeros) start exactly at `state`, whatever its noise
    scaling at `sigma` (σ, or √(σ²+1) at the top of the schedule, as KSAMPLER.max_denoise decides)."""
    sampling = model.get_model_object("model_sampling")
    sigma_max = float(sampling.sigma_max)
    max_denoise = math.isclose(sigma_max, sigma, rel_tol=1e-05) or sigma > sigma_max
    unit = sampling.noise_scaling(torch.tensor([sigma]), torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1),
                                  max_denoise=max_denoise)
    return ddim.noise_for_start(state, torch.zeros_like(state), unit.reshape(()).to(state))


def frames_per_call(model, frame_count: int, batch_size: int) -> int:
    """`batch_size`, or the whole clip for a model that carries Tune-A-Video attention: its sparse-causal and
    temporal attention span the batch a call holds, so a piece of the clip would see other neighbours than the
    edit does (the reference inverts the whole video in one call)."""
    return max(frame_count, 1) if is_tuned(model) else batch_size


def _input_scale(sampling) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda sigma: sampling.calculate_input(sigma.reshape(1).float(), torch.ones(1, 1, 1, 1)).reshape(())


def invert_latents(model, conditioning, latents: torch.Tensor, sigmas: torch.Tensor, inversion_steps: int,
                   schedule: Optional[dict] = None, batch_size: int = DEFAULT_BATCH,
                   on_step: Optional[Callable[[], None]] = None,
                   storage_dtype: torch.dtype = torch.float16) -> ddim.Inversion:
    """DDIM-invert raw latents [N,C,h,w] (VAE space) with `model` and `conditioning` (CFG 1) for the editing
    schedule `sigmas` (descending, as `editing_sigmas` returns), `inversion_steps` levels over the full noise range.
    Runs `batch_size` frames per model call (a Tune-A-Video model: the whole clip, `frames_per_call`); each
    batch's ControlNets get their own frames' hints. `on_step()` is
    called after every model call (progress; an interruption raises there too). Returns the Inversion."""
    check_invertible(model, NODE_NAME)
    check_control_hints({"conditioning": conditioning}, latents.shape[0], NODE_NAME)
    sampling = model.get_model_object("model_sampling")
    grid = ddim.inversion_grid(sigmas, sampling.sigmas, inversion_steps)
    keep = [float(s) for s in sigmas.double()]
    latents = latents.detach().float().cpu()
    states = torch.empty((len(keep),) + tuple(latents.shape), dtype=storage_dtype)
    by_level = {level: k for k, level in enumerate(keep)}
    batch_size = frames_per_call(model, latents.shape[0], batch_size)
    for start in range(0, latents.shape[0], batch_size):
        frames = list(range(start, min(start + batch_size, latents.shape[0])))
        saved = _invert_batch(model, conditioning_for_frames(conditioning, frames, latents.shape[0]),
                              latents[frames], grid, keep, on_step)
        for level, state in saved.items():
            states[by_level[level], frames[0]:frames[-1] + 1] = state.to(storage_dtype)
    return ddim.Inversion(states, sigmas, latents, grid.float(), conditioning,
                          dict(schedule or {}, executed_steps=len(keep) - 1), type(sampling).__name__)


def _invert_batch(model, conditioning, latents, grid, keep, on_step):
    saved = {}
    sampling = model.get_model_object("model_sampling")

    def inversion_sampler(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        def denoise(x_in, sigma):
            return model_k(x_in, sigma, **(extra_args or {}))

        def after_step(i, state):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if on_step is not None:
                on_step()

        # sigmas: the grid on the model's device; x = the clean latent in the model's internal space
        states = ddim.invert(x, sigmas.detach().cpu().double(), denoise, _input_scale(sampling), keep=keep,
                             on_step=after_step)
        saved.update({level: state.detach().float().cpu() for level, state in states.items()})
        return states[max(states)]

    sampler = comfy.samplers.KSAMPLER(inversion_sampler)
    comfy.sample.sample_custom(model, torch.zeros_like(latents), 1.0, sampler, grid.float(), conditioning,
                               conditioning, latents, disable_pbar=True)
    return saved


def reconstruct(model, inversion: ddim.Inversion, batch_size: int = DEFAULT_BATCH,
                on_step: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """Sample the inverted noise back to raw latents with the inversion prompt at CFG 1, deterministic DDIM (the
    host's euler) along the inversion's own levels: how well the inversion reproduces the clip."""
    top = float(inversion.sigmas.max())
    top_step = int(inversion.sigmas.argmax())
    levels = inversion.grid.flip(0)
    sampler = comfy.samplers.sampler_object("euler")
    out = []
    batch_size = frames_per_call(model, inversion.frame_count, batch_size)
    for start in range(0, inversion.frame_count, batch_size):
        frames = list(range(start, min(start + batch_size, inversion.frame_count)))
        noise = start_noise(model, inversion.state(top_step, frames), top)
        conditioning = conditioning_for_frames(inversion.conditioning, frames, inversion.frame_count)

        def callback(i, x0, x, total):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if on_step is not None:
                on_step()

        out.append(comfy.sample.sample_custom(model, noise, 1.0, sampler, levels, conditioning, conditioning,
                                              torch.zeros_like(noise), callback=callback, disable_pbar=True))
    return torch.cat(out).float()


def source_latents(frames, vae, latent) -> torch.Tensor:
    """The clip's raw latents from `latent`, or `frames` encoded with `vae`; exactly one of the two."""
    if latent is not None and frames is not None:
        raise ValueError(f"{NODE_NAME}: connect either `latent` or `frames` (+ `vae`), not both.")
    if latent is not None:
        samples = latent["samples"]
        if samples.ndim != 4 or samples.shape[0] == 0:
            raise ValueError(f"{NODE_NAME}: `latent` must be a batch of image latents [N,C,h,w], got "
                             f"{tuple(samples.shape)}.")
        return samples.float().cpu()
    if frames is None:
        raise ValueError(f"{NODE_NAME}: connect the clip: `frames` with `vae`, or `latent`.")
    if vae is None:
        raise ValueError(f"{NODE_NAME}: `frames` needs a `vae` to encode them; connect the model's VAE.")
    check_vae_size(frames, vae, NODE_NAME, "frames")
    return vae.encode(frames).float().cpu()


def invert_clip(model, conditioning, frames, vae, latent, steps: int, denoise: float, sampler_name: str,
                scheduler: str, inversion_steps: int, batch_size: int, progress_bar):
    """What the Video Inversion node computes: (Inversion, reconstruction latents); every refusal before the first
    model call. `progress_bar(total)` makes the host's progress bar for `total` model calls."""
    latents = source_latents(frames, vae, latent)
    sigmas = editing_sigmas(model, steps, sampler_name, scheduler, denoise)
    check_invertible(model, NODE_NAME)
    check_control_hints({"conditioning": conditioning}, latents.shape[0], NODE_NAME)
    per_call = frames_per_call(model, latents.shape[0], batch_size)
    if per_call != batch_size:
        logging.info("%s: a Tune-A-Video model: all %d frames in one model call (its attention spans the clip), "
                     "batch_size %d not used.", NODE_NAME, per_call, batch_size)
    batches = math.ceil(latents.shape[0] / per_call)
    grid_steps = len(ddim.inversion_grid(sigmas, model.get_model_object("model_sampling").sigmas,
                                         inversion_steps)) - 1
    progress = progress_bar(2 * grid_steps * batches)
    step = lambda: progress.update(1)  # noqa: E731
    schedule = dict(sampler_name=sampler_name, scheduler=scheduler, steps=steps, denoise=denoise)
    inverted = invert_latents(model, conditioning, latents, sigmas, inversion_steps, schedule, batch_size, step)
    reconstruction = reconstruct(model, inverted, batch_size, step)
    error = (reconstruction - inverted.source).abs().mean().item()
    logging.info("%s: %s; reconstruction mean abs error %.4g", NODE_NAME, inverted.describe(), error)
    return inverted, reconstruction


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


def inverted_noise(model, inversion: ddim.Inversion) -> InvertedNoise:
    """The NOISE that starts a host sampler at the inversion's noisiest state."""
    top = int(inversion.sigmas.argmax())
    return InvertedNoise(start_noise(model, inversion.state(top), float(inversion.sigmas[top])))
