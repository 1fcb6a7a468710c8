"""Host-bound VAE helpers shared by every stage that encodes frames: the VAE's real spatial factor, the size check
that runs before any real encoding, and the fidelity-oriented encode (E*) of a batch in chunks with progress and
interruption. Imports the host and `rerender`, never `nodes`."""
from typing import Callable, Optional

import comfy.model_management
import torch

from ..rerender.fidelity import fidelity_encode

FRAMES_PER_CHUNK = 4
PROBE_SIZE = 64


def vae_spatial_factor(vae) -> int:
    """Pixels per latent cell, measured with a small encode: the host's `downscale_ratio` is not always the
    encoder's real stride (it says 8 for taef2, which downsamples by 16)."""
    probe = torch.zeros(1, PROBE_SIZE, PROBE_SIZE, 3)
    return PROBE_SIZE // vae.encode(probe).shape[-1]


def check_vae_size(images: torch.Tensor, vae, node: str, input_name: str = "pixels") -> int:
    """Errors, before any real encoding, for an empty batch or a size the VAE would silently crop.
    Returns the VAE's spatial factor."""
    if images.shape[0] == 0:
        raise ValueError(f"{node}: `{input_name}` is an empty batch.")
    factor = vae_spatial_factor(vae)
    h, w = images.shape[1:3]
    if h % factor or w % factor:
        raise ValueError(f"{node}: `{input_name}` is {w}x{h}, but this VAE needs width and height that are "
                         f"multiples of {factor}; resize or crop the images first (e.g. to "
                         f"{w // factor * factor}x{h // factor * factor}).")
    return factor


def fidelity_encode_batch(pixels: torch.Tensor, vae, strength: float, error_threshold: float,
                          progress: Optional[Callable[[int], None]] = None):
    """(latent batch, rejected masks) of `pixels` [N,H,W,3], FRAMES_PER_CHUNK frames at a time."""
    check_vae_size(pixels, vae, "VAE Encode (Fidelity-Oriented)")
    latents, masks = [], []
    for start in range(0, pixels.shape[0], FRAMES_PER_CHUNK):
        comfy.model_management.throw_exception_if_processing_interrupted()
        chunk = pixels[start:start + FRAMES_PER_CHUNK]
        latent, rejected = fidelity_encode(vae.encode, vae.decode, chunk, strength, error_threshold)
        latents.append(latent.to(comfy.model_management.intermediate_device()))
        masks.append(rejected.cpu())
        if progress is not None:
            progress(start + chunk.shape[0])
    return torch.cat(latents), torch.cat(masks)
