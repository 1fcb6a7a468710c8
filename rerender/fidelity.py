"""Fidelity-oriented VAE encoding E* (reference §1.6 step 4, paper Eq. 8-9).

A lossy autoencoder loses detail on every encode-decode round trip. E* estimates that loss from one extra round
trip and pre-compensates it: x_c = x_r + λ (x_r - x_rr), with x_r = E(I), x_rr = E(D(x_r)). Where the compensated
latent decodes worse than the plain one would allow (mean |D(x_c) - I| above a threshold, in the reference's [-1, 1]
image units), compensation is rejected for that latent cell and its 3x3 neighbourhood.
Works with any VAE: the latent channel count and the pixel/latent scale are read from the shapes.
"""
from typing import Callable

import torch
import torch.nn.functional as F

Codec = Callable[[torch.Tensor], torch.Tensor]


def latent_scale(image_size: tuple, latent_size: tuple) -> int:
    """Pixel-per-latent-cell factor of a VAE, from an image and its latent (8 for SD, 16 for taef2)."""
    fy, fx = image_size[0] // latent_size[0], image_size[1] // latent_size[1]
    if fy != fx or fy * latent_size[0] != image_size[0]:
        raise ValueError(f"cannot infer the VAE's scale from image {image_size} and latent {latent_size}")
    return fy


def fidelity_encode(encode: Codec, decode: Codec, images: torch.Tensor, strength: float = 1.0,
                    error_threshold: float = 0.25) -> tuple:
    """E*(images). `encode`: IMAGE [N,H,W,3] in 0..1 -> raw latent [N,C,h,w]; `decode`: the reverse.
    Returns (latent [N,C,h,w], rejected [N,h,w] float mask, 1 where compensation was rejected).
    `error_threshold` is on the reference's [-1, 1] scale (0.25 ≈ 32/255)."""
    x_r = encode(images)
    x_rr = encode(decode(x_r))
    residual = x_r - x_rr
    compensated = decode(x_r + strength * residual)

    scale = latent_scale(tuple(images.shape[1:3]), tuple(x_r.shape[-2:]))
    # |D(x_c) - I| on [-1, 1] is twice the error on 0..1 images.
    error = 2.0 * (compensated.to(images.device).float() - images.float()).abs().mean(dim=-1, keepdim=True)
    bad_pixels = (error > error_threshold).float().movedim(-1, 1)                     # [N,1,H,W]
    bad_cells = F.interpolate(bad_pixels, scale_factor=1.0 / scale, mode="bilinear", align_corners=False) > 0
    rejected = F.max_pool2d(bad_cells.float(), kernel_size=3, stride=1, padding=1)  # [N,1,h,w]

    keep = (1.0 - rejected).to(x_r.device, x_r.dtype)
    latent = x_r + keep * strength * residual
    return latent, rejected[:, 0].to(images.device)
