"""Host-bound side of the flow stage: a RAFT estimator on the host's OPTICAL_FLOW model (loaded through the host's
model management), the whole flow estimation as the node runs it, previews and the status line, and RAFT
checkpoints as host model patchers. Imports the host and `rerender`, never `nodes`."""

import comfy.model_management
import comfy.model_patcher
import torch

from ..rerender import flow as flowlib
from ..rerender.raft_checkpoint import load_raft

ESTIMATE_MODES = ["on demand", "precompute"]


def raft_estimator(optical_flow, iterations: int) -> flowlib.RAFTEstimator:
    module = getattr(optical_flow, "model", None)
    if not flowlib.is_raft(module):
        found = type(module if module is not None else optical_flow).__name__
        raise ValueError(f"Flow Estimation: `optical_flow` must be a RAFT model from 'Load Optical Flow Model' or "
                         f"'Load RAFT Checkpoint (Rerender)', got a {found}; connect one of those, or disconnect "
                         f"it to use OpenCV DIS.")
    return flowlib.RAFTEstimator(
        module, iterations=iterations,
        prepare=lambda: comfy.model_management.load_models_gpu([optical_flow]))


def clip_preview(video_flow: flowlib.VideoFlow) -> tuple:
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


def first_pair_preview(video_flow: flowlib.VideoFlow) -> tuple:
    """On demand: only pair (0, 1), on frame 1's grid, as one frame (a check that the estimator runs)."""
    flow, occlusion = video_flow.pair(0, 1)
    return flowlib.flow_to_color(flow), occlusion[:, 0]


def status_line(video_flow: flowlib.VideoFlow, mode: str) -> str:
    size = f"{video_flow.width}x{video_flow.height}"
    if mode == "precompute":
        held = len(video_flow.computed_pairs) // 2
        return (f"flow precomputed: {held} pairs kept for the whole clip "
                f"({held * video_flow.pair_nbytes / 2 ** 20:.1f} MiB at {size})")
    bound = video_flow.max_cached_pairs
    return (f"flow on demand: each pair is estimated when a later stage asks for it; at most {bound} pairs kept "
            f"({bound * video_flow.pair_nbytes / 2 ** 20:.1f} MiB at {size})")


def estimate_flow(frames: torch.Tensor, optical_flow, dis_preset: str, raft_iterations: int, photometric_check: bool,
                  alpha: float, beta: float, estimate: str, cache_pairs: int, progress_bar):
    """(VideoFlow, preview colours, preview masks, status line); every refusal before any estimation.
    `progress_bar(total)` makes the host's progress bar for `total` units."""
    if frames.shape[0] < 2:
        raise ValueError(f"Flow Estimation: `frames` holds {frames.shape[0]} frame(s); flow needs at least 2 frames. "
                         "Connect the whole clip (e.g. Get Video Components' images), not a single image.")
    if estimate not in ESTIMATE_MODES:
        raise ValueError(f"Flow Estimation: `estimate` must be one of {ESTIMATE_MODES}, got {estimate!r}.")
    estimator = flowlib.DISEstimator(dis_preset) if optical_flow is None else raft_estimator(optical_flow,
                                                                                             raft_iterations)
    settings = flowlib.consistency_settings(alpha, beta, photometric_check)
    interrupt_check = comfy.model_management.throw_exception_if_processing_interrupted
    if estimate == "precompute":
        progress = progress_bar(max(frames.shape[0] - 1, 1))
        video_flow = flowlib.VideoFlow.estimate(
            frames, estimator, progress=lambda done, total: progress.update_absolute(done, total),
            interrupt_check=interrupt_check, **settings)
        colors, masks = clip_preview(video_flow)
    else:
        progress = progress_bar(1)
        interrupt_check()
        video_flow = flowlib.VideoFlow(frames, estimator, max_cached_pairs=cache_pairs, **settings)
        colors, masks = first_pair_preview(video_flow)
        progress.update_absolute(1, 1)
    return video_flow, colors, masks, status_line(video_flow, estimate)


def raft_patcher(path: str):
    """A RAFT checkpoint (original princeton-vl or torchvision layout) as a host model patcher."""
    return comfy.model_patcher.ModelPatcher(load_raft(path), load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())
