"""AdaIN latent adjust node: match a latent's channel statistics to a reference latent's."""
from comfy_api.latest import io

from ..rerender.adain import adain, channel_stats
from .categories import RERENDER_A_VIDEO as CATEGORY



class AdaINLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Rerender_AdaINLatent",
            display_name="AdaIN Latent Adjust",
            category=CATEGORY,
            description="Matches the per-channel mean and std of each latent to the reference (Rerender's colour-"
                        "aware adjustment): keeps colours consistent with an anchor frame.",
            inputs=[
                io.Latent.Input("latent", tooltip="Latents to adjust."),
                io.Latent.Input("reference", tooltip="Reference latent: one (applied to every latent) or one per "
                                                     "latent, from the same VAE."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="0 leaves the latent unchanged, 1 matches the statistics exactly."),
            ],
            outputs=[io.Latent.Output("adjusted", display_name="adjusted_latent",
                                      tooltip="The adjusted latents (other latent fields passed through).")],
        )

    @classmethod
    def execute(cls, latent, reference, strength) -> io.NodeOutput:
        x, ref = latent["samples"], reference["samples"]
        if x.shape[1] != ref.shape[1]:
            raise ValueError(f"AdaIN Latent Adjust: `latent` has {x.shape[1]} channels but `reference` has "
                             f"{ref.shape[1]}; encode both with the same VAE.")
        if ref.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"AdaIN Latent Adjust: `reference` has {ref.shape[0]} latents for {x.shape[0]} "
                             "latents; give one reference or one per latent.")
        if x.dim() != 4 or ref.dim() != 4:
            raise ValueError("AdaIN Latent Adjust: expects image latents [N, C, H, W].")
        mean, std = channel_stats(ref.to(x.device))
        out = dict(latent)
        out["samples"] = adain(x, mean, std, strength)
        return io.NodeOutput(out)


NODES = [AdaINLatent]
