"""Flow estimation node (flow + occlusion for any frame pair) and a loader for original RAFT checkpoints."""
import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..rerender import flow as flowlib
from ..rerender.raft_checkpoint import load_raft
from .keyframe_picker import frame_size_note
from .types import VideoFlow

CATEGORY = "Rerender"
OpticalFlowModel = io.Custom("OPTICAL_FLOW")  # the host's flow *model* (core "Load Optical Flow Model")


def _raft_estimator(optical_flow, iterations: int) -> flowlib.RAFTEstimator:
    module = getattr(optical_flow, "model", None)
    if not flowlib.is_raft(module):
        found = type(module if module is not None else optical_flow).__name__
        raise ValueError(f"Flow Estimation: `optical_flow` must be a RAFT model from 'Load Optical Flow Model' or "
                         f"'Load RAFT Checkpoint (Rerender)', got a {found}; connect one of those, or disconnect "
                         f"it to use OpenCV DIS.")
    return flowlib.RAFTEstimator(
        module, iterations=iterations,
        prepare=lambda: comfy.model_management.load_models_gpu([optical_flow]))


ESTIMATE_MODES = ["on demand", "precompute"]


def _preview(video_flow: flowlib.VideoFlow) -> tuple:
    """Per frame i >= 1, the flow and occlusion of pair (i-1, i) on frame i's grid (frame 0: still, no occlusion);
    one colour scale for the whole clip so magnitudes compare across frames."""
    n, h, w = video_flow.num_frames, video_flow.height, video_flow.width
    max_magnitude = max(float(flowlib.flow_magnitude(flow).max()) for _, flow, _ in video_flow.consecutive())
    colors = torch.ones(n, h, w, 3)
    masks = torch.zeros(n, h, w)
    for index, flow, occlusion in video_flow.consecutive():
        colors[index] = flowlib.flow_to_color(flow, max_magnitude)[0]
        masks[index] = occlusion[0, 0]
    return colors, masks


def _first_pair_preview(video_flow: flowlib.VideoFlow) -> tuple:
    """On demand: only pair (0, 1), on frame 1's grid, as one frame (a check that the estimator runs)."""
    flow, occlusion = video_flow.pair(0, 1)
    return flowlib.flow_to_color(flow), occlusion[:, 0]


def _status(video_flow: flowlib.VideoFlow, mode: str) -> str:
    size = f"{video_flow.width}x{video_flow.height}"
    if mode == "precompute":
        held = len(video_flow.computed_pairs) // 2
        return (f"flow precomputed: {held} pairs kept for the whole clip "
                f"({held * video_flow.pair_nbytes / 2 ** 20:.1f} MiB at {size})")
    bound = video_flow.max_cached_pairs
    return (f"flow on demand: each pair is estimated when a later stage asks for it; at most {bound} pairs kept "
            f"({bound * video_flow.pair_nbytes / 2 ** 20:.1f} MiB at {size})")


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
        if frames.shape[0] < 2:
            raise ValueError(f"Flow Estimation: `frames` holds {frames.shape[0]} frame(s); flow needs at least 2 frames. "
                             "Connect the whole clip (e.g. Get Video Components' images), not a single image.")
        if estimate not in ESTIMATE_MODES:
            raise ValueError(f"Flow Estimation: `estimate` must be one of {ESTIMATE_MODES}, got {estimate!r}.")
        if optical_flow is None:
            estimator = flowlib.DISEstimator(dis_preset)
        else:
            estimator = _raft_estimator(optical_flow, raft_iterations)
        settings = dict(alpha=consistency_alpha, beta=consistency_beta,
                        photometric_threshold=flowlib.PHOTOMETRIC_THRESHOLD if photometric_check else None)
        interrupt_check = comfy.model_management.throw_exception_if_processing_interrupted
        if estimate == "precompute":
            progress = comfy.utils.ProgressBar(max(frames.shape[0] - 1, 1))
            video_flow = flowlib.VideoFlow.estimate(
                frames, estimator, progress=lambda done, total: progress.update_absolute(done, total),
                interrupt_check=interrupt_check, **settings)
            colors, masks = _preview(video_flow)
        else:
            progress = comfy.utils.ProgressBar(1)
            interrupt_check()
            video_flow = flowlib.VideoFlow(frames, estimator, max_cached_pairs=cache_pairs, **settings)
            colors, masks = _first_pair_preview(video_flow)
            progress.update_absolute(1, 1)
        notes = [_status(video_flow, estimate), *frame_size_note(frames)]
        return io.NodeOutput(video_flow, colors, masks, ui={"rerender_notes": notes})


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
        module = load_raft(folder_paths.get_full_path_or_raise("optical_flow", model_name))
        patcher = comfy.model_patcher.ModelPatcher(
            module, load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device())
        return io.NodeOutput(patcher)


NODES = [FlowEstimation, RAFTLoader]
