"""Deterministic DDIM inversion in the host's σ parameterisation (reference §5), independent of the host.

A latent at noise level σ is x = x0 + σ·ε (the variance-exploding form every SD sampler of the host works in; the
UNet sees x·c_in(σ), c_in = 1/√(σ²+1)). DDIM with η = 0 is then the Euler step x' = x + (σ' − σ)·ε̂, in either
direction. TokenFlow's inversion (and diffusers' DDIM inversion it uses) evaluates ε̂ for the step σ → σ' (σ' > σ)
with the UNet seeing the current latent at its own level but the timestep of the next, higher level σ' (which also
avoids evaluating the model at σ = 0). In the host's terms: the model is called at σ' on x·c_in(σ)/c_in(σ'), so
that its input is exactly the reference's, and ε̂ = (x_in − D)/σ' from its denoised output D: the model's own
model_sampling converts ε- or v-prediction.

The inversion grid passes through every level of the editing schedule (so the noisy latent of each editing step is
an exact state of the inversion) and adds `inversion_steps` levels uniformly spaced in the model's timesteps over
the full noise range, as the reference's 500-step grid contains its 50-step editing grid.
"""
from typing import Callable, Dict, Sequence

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (x [B,...], sigma [B]) -> denoised x0 [B,...]
InputScale = Callable[[torch.Tensor], torch.Tensor]                # sigma -> c_in(sigma), the UNet's input scale


def inversion_grid(editing_sigmas: torch.Tensor, sigma_table: torch.Tensor, inversion_steps: int) -> torch.Tensor:
    """Ascending noise levels from 0 to the editing schedule's start: every editing level, plus `inversion_steps`
    levels of the model's table (`sigma_table`, ascending per timestep) uniformly spaced over the whole range,
    the ones below the start kept. `editing_sigmas` is the executed schedule (descending, may end at 0)."""
    if inversion_steps < 1:
        raise ValueError(f"inversion_steps must be at least 1, got {inversion_steps}.")
    editing = editing_sigmas.detach().double().cpu()
    table = sigma_table.detach().double().cpu()
    top = float(editing.max())
    picks = torch.linspace(0, len(table) - 1, inversion_steps, dtype=torch.float64).round().long()
    fine = table[picks]
    levels = torch.cat([torch.zeros(1, dtype=torch.float64), editing, fine[fine < top]])
    return torch.unique(levels)  # sorted ascending, duplicates removed


def inversion_step(x: torch.Tensor, sigma: float, next_sigma: float, denoise: Denoiser,
                   input_scale: InputScale) -> torch.Tensor:
    """One DDIM inversion step x_σ → x_σ' (σ' > σ), ε̂ evaluated at σ' on the current latent (see module doc)."""
    sigma_t = torch.tensor(float(sigma), dtype=torch.float64)
    next_t = torch.tensor(float(next_sigma), dtype=torch.float64)
    model_input = x * float(input_scale(sigma_t) / input_scale(next_t))
    sigmas = x.new_full((x.shape[0],), float(next_sigma))
    eps = (model_input - denoise(model_input, sigmas)) / float(next_sigma)
    return x + (float(next_sigma) - float(sigma)) * eps


def invert(x0: torch.Tensor, grid: torch.Tensor, denoise: Denoiser, input_scale: InputScale,
           keep: Sequence[float] = (), on_step: Callable[[int, torch.Tensor], None] = None) -> Dict[float, torch.Tensor]:
    """DDIM inversion of clean latents `x0` (the model's internal latent space) along the ascending `grid`
    (starting at 0). Returns {level: state} for each level of `keep` (they must lie on the grid), the top level
    always included. `on_step(i, x)` after each step (progress, interruption)."""
    levels = [float(s) for s in grid]
    if levels[0] != 0.0:
        raise ValueError("the inversion grid must start at sigma 0 (the clean latent).")
    wanted = {float(s) for s in keep} | {levels[-1]}
    missing = wanted - set(levels)
    if missing:
        raise ValueError(f"levels {sorted(missing)} are not on the inversion grid.")
    saved = {0.0: x0.clone()} if 0.0 in wanted else {}
    x = x0
    for i in range(len(levels) - 1):
        x = inversion_step(x, levels[i], levels[i + 1], denoise, input_scale)
        if levels[i + 1] in wanted:
            saved[levels[i + 1]] = x.clone()
        if on_step is not None:
            on_step(i, x)
    return saved


def noise_for_start(state: torch.Tensor, source: torch.Tensor, unit_noise_scaling: torch.Tensor) -> torch.Tensor:
    """The noise a host sampler needs to start exactly at `state` when it computes x = source + a·noise (its linear
    noise scaling with coefficient `a` = noise_scaling(σ0, 1, 0), which is σ0 or √(σ0²+1) at full denoise)."""
    return (state - source) / unit_noise_scaling


class Inversion:
    """An inverted clip (the RERENDER_INVERSION payload): made for one editing schedule, for one clip.

    `states[k]` is every frame's noisy latent at the editing schedule's level `sigmas[k]` (descending, the
    executed schedule the sampler will visit, its last level usually 0 = the clean latent), in the model's internal
    latent space (after process_latent_in, x = x0 + σ·ε), stored compactly on the CPU. `source` holds the clip's
    latents in the VAE's raw space, `grid` the inversion's own levels, `conditioning` the inversion prompt (the
    source branch of an edit uses it), `schedule` a readable description of the editing schedule (sampler,
    scheduler, steps, denoise), `clip_id` a fingerprint of the source latents."""

    def __init__(self, states: torch.Tensor, sigmas: torch.Tensor, source: torch.Tensor, grid: torch.Tensor,
                 conditioning, schedule: dict, model_kind: str):
        self.states = states
        self.sigmas = sigmas.detach().float().cpu()
        self.source = source
        self.grid = grid
        self.conditioning = conditioning
        self.schedule = dict(schedule)
        self.model_kind = model_kind
        self.clip_id = clip_fingerprint(source)

    @property
    def frame_count(self) -> int:
        return self.source.shape[0]

    @property
    def latent_size(self):
        """(channels, height, width) of one frame's latent."""
        return tuple(self.source.shape[1:])

    def state(self, step: int, indices=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """Frames `indices` (all by default) at editing step `step`, as a working tensor."""
        states = self.states[step] if indices is None else self.states[step][indices]
        return states.to(device=device, dtype=dtype)

    def describe(self) -> str:
        s = self.schedule
        return (f"{self.frame_count} frames of latent {'x'.join(map(str, self.latent_size))}, "
                f"{s.get('sampler_name')}/{s.get('scheduler')} {s.get('steps')} steps at denoise "
                f"{s.get('denoise')}, {len(self.grid) - 1} inversion steps")

    def check_schedule(self, sigmas: torch.Tensor, node: str, fix: str) -> None:
        """Refuse an editing schedule other than the one this inversion was made for (levels compared)."""
        sigmas = sigmas.detach().float().cpu()
        if sigmas.shape != self.sigmas.shape or not torch.allclose(sigmas, self.sigmas, rtol=1e-5, atol=1e-6):
            raise ValueError(f"{node}: the inversion was made for another schedule ({self.describe()}; "
                             f"{len(self.sigmas) - 1} executed steps) than this node's ({len(sigmas) - 1} executed "
                             f"steps, levels {_levels(sigmas)} vs {_levels(self.sigmas)}); {fix}")

    def check_clip(self, latents: torch.Tensor, node: str, input_name: str) -> None:
        """Refuse latents of another clip (count, size or content) than the inverted one."""
        if tuple(latents.shape) != tuple(self.source.shape):
            raise ValueError(f"{node}: `{input_name}` has shape {tuple(latents.shape)} but the inversion was made "
                             f"for {tuple(self.source.shape)} ({self.describe()}); invert this clip.")
        if clip_fingerprint(latents) != self.clip_id:
            raise ValueError(f"{node}: `{input_name}` is not the clip the inversion was made for (same size, other "
                             f"content); invert this clip.")


def clip_fingerprint(latents: torch.Tensor) -> str:
    """A content hash of latents (shape and values), to tell one clip from another."""
    import hashlib
    data = latents.detach().float().cpu().contiguous()
    digest = hashlib.sha1(str(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:16]


def _levels(sigmas: torch.Tensor) -> str:
    values = [f"{float(s):.3g}" for s in sigmas]
    return "[" + ", ".join(values if len(values) <= 6 else values[:3] + ["..."] + values[-2:]) + "]"
