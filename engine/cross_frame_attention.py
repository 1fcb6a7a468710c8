"""Host-bound side of cross-frame attention: the patch the Cross-Frame Attention node installs and how the key
frame sampler finds its controller on a MODEL. Imports the host and `rerender`, never `nodes`.

Built on the host's `attn1_patch` point: a list every pack can append to, called with the normed hidden states and
the K/V inputs before any projection or attention kernel. The patch only swaps the K/V inputs, so it composes with
other packs' attn1 patches and attn1 replacements (they receive the substituted inputs), with attention-backend
overrides, and it never takes over an `attn1_replace` slot.
"""
import logging
from typing import Dict, Optional

from comfy.ldm.modules.attention import BasicTransformerBlock

from ..rerender.rerender_a_video.cross_frame_attention import CrossFrameAttention, LayerKey
from ..rerender.rerender_a_video.keyframe_constraints import validate_period

NODE_NAME = "Cross-Frame Attention"
LAYER_SETS = ("all", "loose")


class CrossFrameAttentionPatch:
    """The attn1 patch: hands decoder self-attention K/V inputs to the controller; a no-op outside a run."""

    def __init__(self, controller: CrossFrameAttention):
        self.controller = controller

    def __call__(self, n, context_attn1, value_attn1, extra_options):
        block = extra_options.get("block")
        if block is None or not self.controller.running:
            return n, context_attn1, value_attn1
        layer = (block[0], block[1], extra_options.get("block_index", 0))
        context, value = self.controller.kv_inputs(layer, extra_options["cond_or_uncond"], context_attn1,
                                                   value_attn1)
        return n, context, value


def decoder_self_attention_layers(model) -> Dict[LayerKey, int]:
    """{(block name, block number, transformer index): channels} of every self-attention in the UNet's decoder
    (`output_blocks`), read from the model itself: SD1.x has 9 (1280/640/320 channels), SDXL 36 (1280/640)."""
    diffusion_model = model.get_model_object("diffusion_model")
    layers = {}
    for number, block in enumerate(getattr(diffusion_model, "output_blocks", [])):
        for spatial in (m for m in block.modules() if hasattr(m, "transformer_blocks")):
            for index, transformer in enumerate(spatial.transformer_blocks):
                if isinstance(transformer, BasicTransformerBlock) and not transformer.disable_self_attn:
                    layers[("output", number, index)] = transformer.attn1.to_q.in_features
    return layers


def select_layers(layers: Dict[LayerKey, int], layer_set: str) -> frozenset:
    """"all" decoder self-attention layers, or "loose": without the widest (lowest-resolution) ones, as the
    reference's loose_cfattn (drops SD1.5's 1280-channel layers; SDXL's likewise)."""
    if layer_set == "all":
        return frozenset(layers)
    widest = max(layers.values())
    return frozenset(key for key, channels in layers.items() if channels < widest)


def find_cross_frame_attention(model) -> Optional[CrossFrameAttention]:
    """The controller this pack's patcher installed on `model` (or an ancestor clone), if any."""
    patches = model.model_options.get("transformer_options", {}).get("patches", {}).get("attn1_patch", [])
    controllers = [p.controller for p in patches if isinstance(p, CrossFrameAttentionPatch)]
    if len(controllers) > 1:
        raise ValueError(f"{NODE_NAME}: the model was patched {len(controllers)} times; apply the patcher once.")
    return controllers[0] if controllers else None


def missing_attention_note(model) -> list:
    """The line the Key Frame Sampler shows when its model carries no Cross-Frame Attention: it still renders, but
    without the attention constraint, which is easy to miss (the cache then reports 0 MiB)."""
    if find_cross_frame_attention(model) is not None:
        return []
    return ["no Cross-Frame Attention on this model: key frames are rendered without the cross-frame attention "
            "constraint; connect the model through 'Cross-Frame Attention' first"]


def cache_dtype(model):
    """The dtype the model computes in (its manual-cast dtype when the weights are stored lower)."""
    return getattr(model.model, "manual_cast_dtype", None) or model.model.get_dtype()


def with_cross_frame_attention(model, layers: str, start: float, end: float):
    """A clone of `model` whose decoder self-attention the Key Frame Sampler steers; every refusal first."""
    validate_period(f"{NODE_NAME}: start/end", start, end)
    if layers not in LAYER_SETS:
        raise ValueError(f"{NODE_NAME}: `layers` must be one of {LAYER_SETS}, got {layers!r}.")
    if find_cross_frame_attention(model) is not None:
        raise ValueError(f"{NODE_NAME}: this model already has cross-frame attention; apply the patcher once.")
    available = decoder_self_attention_layers(model)
    if not available:
        raise ValueError(f"{NODE_NAME}: the model has no decoder self-attention layers (output_blocks with "
                         "transformer blocks); connect a UNet model such as SD1.5 or SDXL.")
    selected = select_layers(available, layers)
    if not selected:
        raise ValueError(f"{NODE_NAME}: the 'loose' set is empty for this model (all its decoder attention "
                         "layers have the same width); use 'all'.")
    patched = model.clone()
    controller = CrossFrameAttention(selected, start, end, dtype=cache_dtype(model))
    patched.set_model_attn1_patch(CrossFrameAttentionPatch(controller))
    logging.info("%s: %d of %d decoder self-attention layers, steps %.2f..%.2f of the schedule", NODE_NAME,
                 len(selected), len(available), start, end)
    return patched
