"""Colour-aware adaptive latent adjustment (reference §1.7): match channel statistics of a latent to a reference."""
import torch
import torch.nn.functional as F

STATS_EPS = 1e-5


def channel_stats(x: torch.Tensor) -> tuple:
    """Per-sample, per-channel mean and std over the spatial dims, as the reference caches them for the anchor:
    std = sqrt(unbiased var + 1e-5). Returns two [N, C, 1, 1] tensors."""
    flat = x.float().flatten(2)
    mean = flat.mean(dim=2)
    std = (flat.var(dim=2, unbiased=True) + STATS_EPS).sqrt()
    return mean[..., None, None], std[..., None, None]


def adain(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Re-normalise each channel of `x` [N,C,H,W] to `mean`/`std` ([N or 1, C, 1, 1]); `strength` in [0, 1] blends
    between the input (0) and the fully adjusted latent (1)."""
    if x.shape[1] != mean.shape[1] or x.shape[1] != std.shape[1]:
        raise ValueError(f"AdaIN: the latent has {x.shape[1]} channels but the reference statistics have "
                         f"{mean.shape[1]}; both must come from the same VAE / model.")
    adjusted = F.instance_norm(x.float(), eps=STATS_EPS) * std.float() + mean.float()
    return torch.lerp(x.float(), adjusted, float(strength)).to(x.dtype)
