"""Fidelity-oriented VAE encode node (E*): a drop-in for VAE Encode that loses less on each round trip."""
import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io

from ..rerender.fidelity import fidelity_encode

CATEGORY = "Rerender"
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


class FidelityEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Rerender_FidelityEncode",
            display_name="VAE Encode (Fidelity-Oriented)",
            category=CATEGORY,
            description="Rerender's E*: encodes, measures what one decode-encode round trip loses, and "
                        "pre-compensates it, except where that would make the decoded image worse. Works with any "
                        "VAE; use it wherever VAE Encode feeds an img2img loop.",
            inputs=[
                io.Image.Input("pixels", tooltip="Images to encode; width and height must be multiples of the "
                                                 "VAE's scale (8 for SD, 16 for taef2)."),
                io.Vae.Input("vae", tooltip="Any VAE; the latent channels and scale are read from it."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="λ_E: how much of the round-trip loss to pre-compensate "
                                       "(reference default 1; 0 gives plain VAE Encode)."),
                io.Float.Input("error_threshold", default=0.25, min=0.0, max=2.0, step=0.01,
                               tooltip="Reject compensation in latent cells whose decoded mean error exceeds this, "
                                       "on the reference's [-1, 1] image scale (0.25 ≈ 32/255)."),
            ],
            outputs=[
                io.Latent.Output("latent", display_name="LATENT", tooltip="The compensated latent."),
                io.Mask.Output("rejected", display_name="rejected_mask",
                               tooltip="Latent cells (at latent resolution) where compensation was rejected: 1 = "
                                       "plain encoding kept there."),
            ],
        )

    @classmethod
    def execute(cls, pixels, vae, strength, error_threshold) -> io.NodeOutput:
        check_vae_size(pixels, vae, "VAE Encode (Fidelity-Oriented)")
        progress = comfy.utils.ProgressBar(pixels.shape[0])
        latents, masks = [], []
        for start in range(0, pixels.shape[0], FRAMES_PER_CHUNK):
            comfy.model_management.throw_exception_if_processing_interrupted()
            chunk = pixels[start:start + FRAMES_PER_CHUNK]
            latent, rejected = fidelity_encode(vae.encode, vae.decode, chunk, strength, error_threshold)
            latents.append(latent.to(comfy.model_management.intermediate_device()))
            masks.append(rejected.cpu())
            progress.update_absolute(start + chunk.shape[0])
        return io.NodeOutput({"samples": torch.cat(latents)}, torch.cat(masks))


NODES = [FidelityEncode]
