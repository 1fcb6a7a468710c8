"""Fidelity-oriented VAE encode node (E*): a drop-in for VAE Encode that loses less on each round trip."""
import comfy.utils
from comfy_api.latest import io

from ..engine.vae import fidelity_encode_batch
from .categories import RERENDER_A_VIDEO as CATEGORY



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
                io.Latent.Output("latent", display_name="latent", tooltip="The compensated latent."),
                io.Mask.Output("rejected", display_name="rejected_mask",
                               tooltip="Latent cells (at latent resolution) where compensation was rejected: 1 = "
                                       "plain encoding kept there."),
            ],
        )

    @classmethod
    def execute(cls, pixels, vae, strength, error_threshold) -> io.NodeOutput:
        progress = comfy.utils.ProgressBar(pixels.shape[0])
        latent, rejected = fidelity_encode_batch(pixels, vae, strength, error_threshold, progress.update_absolute)
        return io.NodeOutput({"samples": latent}, rejected)


NODES = [FidelityEncode]
