"""Patch propagator node: every non-key frame synthesised from its neighbouring rendered key frames (EbSynth-style
guided PatchMatch in torch, two passes per interval, temporal-aware blending). Works with hand-made key frames too."""
import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..rerender import propagate
from .types import KeyFrames, VideoFlow
from .validation import outside_declared
from .categories import SHARED as CATEGORY

DEFAULTS = propagate.PropagationSettings()


class PatchPropagator(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Rerender_PatchPropagator",
            display_name="Patch Propagator",
            category=CATEGORY,
            description="Propagate rendered (or hand-painted) key frames to the whole video, as Rerender does with "
                        "EbSynth: each in-between frame is synthesised from the key frame before it and the one "
                        "after it by guided patch matching, and the two results are blended where each is best.",
            inputs=[
                io.Image.Input("frames", tooltip="The original video frames, as one image batch in frame order."),
                KeyFrames.Input("keyframes",
                                tooltip="Which frames are key frames (from Key Frame Picker); with its "
                                        "split_at_cuts on, each shot is propagated from its own key frames only."),
                io.Image.Input("key_frame_images",
                               tooltip="The rendered key frames, one per selected index, in order, at the video's "
                                       "size. Hand-made ones work too (an EbSynth replacement)."),
                VideoFlow.Input("flow", tooltip="Flow and occlusion of these frames (from Flow Estimation)."),
                io.Float.Input("colour_weight", default=DEFAULTS.colour_weight, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the colour guide (input frame vs key's input frame). Reference 6."),
                io.Float.Input("edge_weight", default=DEFAULTS.edge_weight, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the edge guide (Laplacian of the input). Reference 0.5."),
                io.Float.Input("temporal_weight", default=DEFAULTS.temporal_weight, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the temporal guide (previous output carried along the flow); "
                                       "higher = steadier, lower = follows the key more freely. Reference 0.5."),
                io.Float.Input("positional_weight", default=DEFAULTS.positional_weight, min=0.0, max=100.0,
                               step=0.1,
                               tooltip="Weight of the positional guide (key coordinates carried along the flow); "
                                       "keeps patches near where the motion says they are. Reference 2."),
                io.Int.Input("patch_size", default=DEFAULTS.patch_size, min=3, max=15, step=2,
                             tooltip="Patch side in pixels (odd). Reference 5."),
                io.Int.Input("search_vote_iters", default=DEFAULTS.search_vote_iters, min=1, max=64,
                             tooltip="Search-and-vote rounds per pyramid level (reference 12); pixels whose vote "
                                     "stops changing are skipped, so extra rounds cost little."),
                io.Int.Input("patchmatch_iters", default=DEFAULTS.patchmatch_iters, min=0, max=64,
                             tooltip="PatchMatch iterations per search round (reference 6). The warm-started search "
                                     "(pyramid_levels 0) runs at most 3: it starts next to the answer."),
                io.Combo.Input("hole_fill", options=list(propagate.HOLE_FILLS), default=DEFAULTS.hole_fill,
                               tooltip="How guide pixels with no source (occluded, from outside the frame) are "
                                       "filled: 'pyramid' = fast push-pull in torch; 'telea' = OpenCV inpaint "
                                       "radius 30 as the reference (slow on the CPU)."),
                io.Boolean.Input("histogram_blend", default=DEFAULTS.histogram_blend,
                                 tooltip="Blend the two passes with the histogram-preserving blend in Lab "
                                         "(reference); off = linear blend. Either way each pixel weighs the "
                                         "passes by the temporal weights over their patch errors."),
                io.Boolean.Input("poisson_fusion", default=DEFAULTS.poisson,
                                 tooltip="Gradient-domain (screened Poisson) fusion of the blend, taking each "
                                         "pixel's gradients from the better pass (the reference code's 'Gradient "
                                         "blending'; off in the paper, and off by default here: it softens strong "
                                         "edges). Solved exactly with DCTs; needs histogram_blend."),
                io.Float.Input("uniformity", default=DEFAULTS.uniformity, min=0.0, max=100000.0, step=100.0,
                               advanced=True,
                               tooltip="Penalty for re-using the same key frame patch many times (EbSynth 3500)."),
                io.Float.Input("stop_threshold", default=DEFAULTS.stop_threshold, min=0.0, max=255.0, step=0.5,
                               advanced=True,
                               tooltip="A pixel stops being searched once its vote changes by less than this "
                                       "(0..255 scale; EbSynth 5). 0 = search every pixel every round."),
                io.Int.Input("pyramid_levels", default=0, min=0, max=16, advanced=True,
                             tooltip="0 = each frame's search starts from the previous frame's matches carried "
                                     "along the flow and runs at half and full size (fast). N = every frame "
                                     "searched from scratch, coarse to fine over N levels, as EbSynth does (16: "
                                     "as many as fit)."),
                io.Int.Input("descriptor_size", default=DEFAULTS.descriptor_size, min=4, max=128, advanced=True,
                             tooltip="Dimensions of the PCA patch descriptors the search compares (speed vs "
                                     "fidelity to the exact patch distance; the error map is always exact). "
                                     "A frame where less than 90% of the pixels were carried from the key along "
                                     "the flow uses at least 24 where its pixels were not carried, and all "
                                     "patchmatch_iters."),
                io.Int.Input("seed", default=DEFAULTS.seed, min=0, max=0xFFFFFFFF, advanced=True,
                             control_after_generate=io.ControlAfterGenerate.fixed,
                             tooltip="Seed of the random search (results are deterministic for a seed; kept "
                                     "fixed between runs so an unchanged graph is not propagated again)."),
            ],
            outputs=[
                io.Image.Output("video", display_name="frames",
                                tooltip="Every frame of the video, as an image batch: key frames exactly as given, "
                                        "every other frame propagated from its neighbouring key frames. Create "
                                        "Video turns it into a VIDEO for Save Video."),
            ],
        )

    @classmethod
    def validate_inputs(cls, patch_size) -> bool | str:
        problem = outside_declared(cls, patch_size=patch_size)
        if problem is None and patch_size is not None and patch_size % 2 == 0:
            problem = f"`patch_size` must be odd (a patch is centred on its pixel), got {patch_size}; use {patch_size + 1}"
        return True if problem is None else f"Patch Propagator: {problem}."

    @classmethod
    def execute(cls, frames, keyframes, key_frame_images, flow, colour_weight, edge_weight, temporal_weight,
                positional_weight, patch_size, search_vote_iters, patchmatch_iters, hole_fill, histogram_blend,
                poisson_fusion, uniformity, stop_threshold, pyramid_levels, descriptor_size, seed) -> io.NodeOutput:
        indices = getattr(keyframes, "indices", None)
        if indices is None:
            raise ValueError("Patch Propagator: `keyframes` must come from Key Frame Picker (RERENDER_KEYFRAMES).")
        if getattr(keyframes, "num_frames", frames.shape[0]) != frames.shape[0]:
            raise ValueError(f"Patch Propagator: `keyframes` were picked from a {keyframes.num_frames}-frame clip "
                             f"but `frames` has {frames.shape[0]}; pick them from these same frames.")
        widgets_ok = cls.validate_inputs(patch_size)  # a linked patch_size is only known now
        if widgets_ok is not True:
            raise ValueError(widgets_ok)
        settings = propagate.settings_from_widgets(
            colour_weight, edge_weight, temporal_weight, positional_weight, patch_size, search_vote_iters,
            patchmatch_iters, hole_fill, histogram_blend, poisson_fusion, uniformity, stop_threshold, pyramid_levels,
            descriptor_size, seed)
        try:
            propagate.check_inputs(frames, list(indices), key_frame_images, flow)
        except ValueError as error:
            raise ValueError(f"Patch Propagator: {error}") from None
        cuts = tuple(getattr(keyframes, "cuts", ()))  # shots: no pass reaches across a cut
        total = max(propagate.pass_frame_count(frames.shape[0], list(indices), cuts), 1)
        progress = comfy.utils.ProgressBar(total)

        def on_frame(done: int) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update_absolute(done, total)

        video = propagate.propagate_video(frames, indices, key_frame_images, flow, settings,
                                          device=comfy.model_management.get_torch_device(), on_frame=on_frame,
                                          cuts=cuts)
        progress.update_absolute(total, total)
        return io.NodeOutput(video)


NODES = [PatchPropagator]
