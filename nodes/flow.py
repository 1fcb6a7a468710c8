"""Flow estimation node (flow + occlusion for any frame pair) and a loader for original RAFT checkpoints."""
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..engine.flow import ESTIMATE_MODES, estimate_flow, raft_patcher
from ..rerender import flow as flowlib
from .keyframe_picker import frame_size_note
from .types import VideoFlow
from .categories import SHARED as CATEGORY

OpticalFlowModel = io.Custom("OPTICAL_FLOW")  # the host's flow *model* (core "Load Optical Flow Model")


class FlowEstimation(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Rerender_FlowEstimation",
            display_name="Flow Estimation",
            category=CATEGORY,
            description="Dense optical flow and occlusion between the frames of a clip, for the key frame sampler "
                        "and the propagator. By default each pair is estimated when a later stage asks for it "
                        "(their progress bars include it) and only the most recent pairs are kept, so long clips "
                        "stay in bounded memory; 'precompute' estimates every consecutive pair here instead. Uses "
                        "the connected RAFT model, else OpenCV DIS.",
            inputs=[
                io.Image.Input("frames", tooltip="The video frames, as one image batch in frame order."),
                OpticalFlowModel.Input(
                    "optical_flow", optional=True,
                    tooltip="Optional RAFT model ('Load Optical Flow Model', or 'Load RAFT Checkpoint (Rerender)' "
                            "for original princeton-vl checkpoints). Leave empty to use OpenCV DIS (no weights, "
                            "less accurate)."),
                io.Combo.Input("dis_preset", options=list(flowlib.DIS_PRESETS), default="medium",
                               tooltip="OpenCV DIS speed/quality preset, used only when no RAFT model is "
                                       "connected: ultrafast < fast < medium (best)."),
                io.Int.Input("raft_iterations", default=flowlib.RAFT_ITERATIONS, min=1, max=64,
                             tooltip="RAFT refinement iterations (32 as RAFT's own Sintel evaluation; 12-20 is "
                                     "faster and nearly as good). Ignored for DIS."),
                io.Boolean.Input("photometric_check", default=False,
                                 tooltip="Also mark as occluded the pixels whose colour after warping differs by "
                                         "more than 25% (FRESCO's extra test); off = the forward-backward check "
                                         "only, as Rerender's key frames use."),
                io.Float.Input("consistency_alpha", default=flowlib.CONSISTENCY_ALPHA, min=0.0, max=1.0,
                               step=0.001, advanced=True,
                               tooltip="Forward-backward check: a pixel is occluded when the round trip misses by "
                                       "more than alpha * (|forward| + |backward|) + beta pixels (reference 0.01)."),
                io.Float.Input("consistency_beta", default=flowlib.CONSISTENCY_BETA, min=0.0, max=100.0,
                               step=0.05, advanced=True,
                               tooltip="Forward-backward check: constant tolerance in pixels (reference 0.5)."),
                io.Combo.Input("estimate", options=ESTIMATE_MODES, default=ESTIMATE_MODES[0], optional=True,
                               tooltip="on demand: nothing but pair 0->1 is estimated here; the key frame sampler "
                                       "and the propagator estimate the pairs they use as they go, keeping at most "
                                       "`cache_pairs` (bounded memory on long clips; the previews show pair 0->1 "
                                       "only). precompute: every consecutive pair now, with this node's progress "
                                       "bar, kept for the whole clip (10 bytes per pixel per frame) with full-clip "
                                       "previews. Same numbers either way."),
                io.Int.Input("cache_pairs", default=flowlib.DEFAULT_CACHE_PAIRS, min=1, max=100000, advanced=True,
                             optional=True,
                             tooltip="on demand: how many frame pairs to keep (10 bytes per pixel each: 2.5 MiB "
                                     "at 512x512), least recently used dropped first. Keep it above your longest "
                                     "key frame interval, or pairs are estimated again (same result, more time)."),
            ],
            outputs=[
                VideoFlow.Output("flow", display_name="flow",
                                 tooltip="Flow and occlusion for every frame pair, for the later Rerender stages."),
                io.Image.Output("flow_preview", display_name="flow_preview",
                                tooltip="Colour-coded flow from each frame's predecessor (hue = direction, "
                                        "saturation = speed, white = still; one scale for the clip). On demand: "
                                        "one image, pair 0->1."),
                io.Mask.Output("occlusion", display_name="occlusion",
                               tooltip="Per frame, 1 where the pixel has no reliable source in the previous frame "
                                       "(frame 0: all 0). On demand: one mask, frame 1's."),
            ],
        )

    @classmethod
    def execute(cls, frames, dis_preset, raft_iterations, photometric_check, consistency_alpha, consistency_beta,
                optical_flow=None, estimate=ESTIMATE_MODES[0],
                cache_pairs=flowlib.DEFAULT_CACHE_PAIRS) -> io.NodeOutput:
        video_flow, colors, masks, status = estimate_flow(
            frames, optical_flow, dis_preset, raft_iterations, photometric_check, consistency_alpha,
            consistency_beta, estimate, cache_pairs, comfy.utils.ProgressBar)
        return io.NodeOutput(video_flow, colors, masks, ui={"rerender_notes": [status, *frame_size_note(frames)]})


class RAFTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Rerender_RAFTLoader",
            display_name="Load RAFT Checkpoint (Rerender)",
            category=CATEGORY,
            description="Load a RAFT checkpoint from models/optical_flow: original princeton-vl files "
                        "(raft-sintel.pth, raft-small.pth, ...) or torchvision ones, large or small, as the "
                        "OPTICAL_FLOW model the host's nodes and Flow Estimation take.",
            inputs=[
                io.Combo.Input("model_name", options=folder_paths.get_filename_list("optical_flow"),
                               tooltip="A RAFT checkpoint in models/optical_flow (.pth read with weights_only, "
                                       "or .safetensors)."),
            ],
            outputs=[
                OpticalFlowModel.Output("optical_flow", display_name="optical_flow",
                                        tooltip="The RAFT model (torchvision layout), for Flow Estimation or any "
                                                "node taking OPTICAL_FLOW."),
            ],
        )

    @classmethod
    def execute(cls, model_name) -> io.NodeOutput:
        return io.NodeOutput(raft_patcher(folder_paths.get_full_path_or_raise("optical_flow", model_name)))


NODES = [FlowEstimation, RAFTLoader]
