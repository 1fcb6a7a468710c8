"""Cross-Frame Attention node: MODEL -> MODEL whose decoder self-attention the Key Frame Sampler can steer."""
from comfy_api.latest import io

from ..engine.cross_frame_attention import LAYER_SETS, NODE_NAME, with_cross_frame_attention
from .categories import RERENDER_A_VIDEO as CATEGORY



class CrossFrameAttentionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Rerender_CrossFrameAttention",
            display_name=NODE_NAME,
            category=CATEGORY,
            description="Rerender's style-aware cross-frame attention: while the Key Frame Sampler renders, the "
                        "decoder's self-attention takes keys and values from the anchor frame and the previous key "
                        "frame at the same step, layer and cond/uncond branch. Elsewhere the model is unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x, SD2.x, SDXL ...); it is cloned, not modified."),
                io.Combo.Input("layers", options=list(LAYER_SETS), default="all",
                               tooltip="all: every decoder self-attention layer. loose: skip the deepest "
                                       "(lowest-resolution) ones, so frames follow the anchor less tightly; "
                                       "helps with fast motion."),
                io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First step where it acts, as a fraction of the full schedule "
                                       "(0 = the noisiest step)."),
                io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Last step where it acts, as a fraction of the full schedule; start >= "
                                       "end switches it off."),
            ],
            outputs=[io.Model.Output(tooltip="The patched clone; feed it to the Key Frame Sampler.")],
        )

    @classmethod
    def execute(cls, model, layers, start, end) -> io.NodeOutput:
        return io.NodeOutput(with_cross_frame_attention(model, layers, start, end))


NODES = [CrossFrameAttentionNode]
