"""Key frame picker node: which frames the diffusion model renders; the rest are propagated."""
import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..rerender.keyframes import (DEFAULT_CUT_THRESHOLD, adaptive_keyframes, check_index_list, detect_cuts,
                                  parse_index_list, uniform_keyframes)
from .types import KeyFrames
from .validation import outside_declared
from .categories import SHARED as CATEGORY

MODES = ["uniform", "adaptive", "list"]
# SD-family VAEs work on multiples of 8 pixels (taef2: 16); the picker is the first node to see the frames.
LATENT_SCALE = 8


def frame_size_note(frames) -> list:
    """A note (not an error: the propagator alone takes any size) when the frames cannot go through an SD VAE."""
    height, width = frames.shape[1:3]
    if height % LATENT_SCALE == 0 and width % LATENT_SCALE == 0:
        return []
    fit = f"{width // LATENT_SCALE * LATENT_SCALE}x{height // LATENT_SCALE * LATENT_SCALE}"
    return [f"frames are {width}x{height}: the Key Frame Sampler needs width and height divisible by the VAE's "
            f"scale ({LATENT_SCALE} for SD1.5); scale them to e.g. {fit} first"]


def cut_report(cuts: tuple, distances, threshold: float) -> list:
    """The line the node shows about shots: where the cuts are and how clear each was, or how close the clip came
    to one (so that the threshold can be tuned)."""
    if not cuts:
        peak = int(distances.argmax()) if len(distances) > 1 else 0
        return [f"no shot cut (largest colour change {distances[peak]:.2f} at frame {peak}; threshold "
                f"{threshold:.2f})"]
    listed = ", ".join(f"{c} ({distances[c]:.2f})" for c in cuts)
    return [f"{len(cuts) + 1} shots; cuts before frames {listed}"]


class KeyframePicker(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Rerender_KeyframePicker",
            display_name="Key Frame Picker",
            category=CATEGORY,
            description="Choose the key frames that the diffusion model renders; every other frame is propagated "
                        "from its two neighbouring key frames.",
            inputs=[
                io.Image.Input("frames", tooltip="The video frames, as one image batch in frame order."),
                io.Combo.Input("mode", options=MODES, default="uniform",
                               tooltip="uniform: the first frame, then every `interval` frames (Rerender). "
                                       "adaptive: denser where the motion is larger, gaps between s_min and s_max "
                                       "(FRESCO Algorithm 1). list: the indices typed in `index_list`."),
                io.Int.Input("interval", default=10, min=1, max=10000,
                             tooltip="uniform mode: frames between key frames (Rerender's K; 5-20 works well)."),
                io.Boolean.Input("include_last", default=True,
                                 tooltip="uniform mode: also make the last frame a key frame, so every frame lies "
                                         "between two key frames."),
                io.Int.Input("s_min", default=5, min=1, max=10000,
                             tooltip="adaptive mode: smallest gap between key frames (FRESCO's s_min)."),
                io.Int.Input("s_max", default=20, min=1, max=10000,
                             tooltip="adaptive mode: largest gap between key frames (FRESCO's s_max); "
                                     "equal to s_min gives uniform spacing."),
                io.String.Input("index_list", default="0:-1:10,-1",
                                tooltip="list mode: VideoHelperSuite index syntax - comma-separated indices "
                                        "(negative counts from the end) and start:stop:step ranges, e.g. "
                                        "'0,10,25' or '0:80:10'. Must be increasing."),
                io.Boolean.Input("split_at_cuts", default=False, optional=True,
                                 tooltip="Detect shot cuts and treat each shot as its own clip: key frames restart "
                                         "at every shot (uniform, adaptive) and both frames beside every cut become "
                                         "key frames (any mode), so that nothing downstream reaches across a cut. "
                                         "The cuts found are shown on the node."),
                io.Float.Input("cut_threshold", default=DEFAULT_CUT_THRESHOLD, min=0.01, max=1.0, step=0.01,
                               optional=True,
                               tooltip="split_at_cuts: a cut lies between two consecutive frames when more than "
                                       "this fraction of their colours differs (colour histogram distance: 0 = "
                                       "the same colours, 1 = none in common). Lower finds more cuts; within a "
                                       "shot the change is usually below 0.1."),
            ],
            outputs=[
                io.Image.Output("key_frames", display_name="key_frames",
                                tooltip="The selected frames, in order (the first is the anchor)."),
                KeyFrames.Output("keyframes", display_name="keyframes",
                                 tooltip="The selection, for the key frame sampler and the patch propagator."),
                io.String.Output("indices", display_name="indices",
                                 tooltip="The selected indices as text, e.g. '0,10,20'."),
            ],
        )

    @classmethod
    def validate_inputs(cls, index_list=None):
        """At queue time (POST /prompt), the syntax of `index_list` in any mode, on that input alone; the host checks
        the other widgets against their declared ranges, and s_min <= s_max (two inputs) is checked when it runs."""
        if index_list is None:
            return True  # linked: checked when the node runs
        try:
            check_index_list(index_list)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, frames, mode, interval, include_last, s_min, s_max, index_list, split_at_cuts=False,
                cut_threshold=DEFAULT_CUT_THRESHOLD) -> io.NodeOutput:
        num_frames = frames.shape[0]
        if num_frames == 0:
            raise ValueError("Key Frame Picker: `frames` is an empty batch; connect the video's frames.")
        if split_at_cuts:
            problem = outside_declared(cls, cut_threshold=cut_threshold)  # a linked threshold is only known now
            if problem is not None:
                raise ValueError(f"Key Frame Picker: {problem}.")
        if mode not in MODES:
            raise ValueError(f"Key Frame Picker: unknown mode '{mode}'; use one of {MODES}.")
        if mode == "adaptive" and s_min > s_max:
            raise ValueError(f"Key Frame Picker: s_min ({s_min}) is larger than s_max ({s_max}); set s_min <= s_max.")
        interrupt = comfy.model_management.throw_exception_if_processing_interrupted
        passes = int(split_at_cuts) + int(mode == "adaptive")
        progress = comfy.utils.ProgressBar(passes * num_frames) if passes else None
        cuts, report = (), []
        if split_at_cuts:
            cuts, distances = detect_cuts(frames, cut_threshold, interrupt, progress.update_absolute)
            report = cut_report(cuts, distances, cut_threshold)
        if mode == "uniform":
            selection = uniform_keyframes(num_frames, interval, include_last, cuts)
        elif mode == "list":
            selection = parse_index_list(index_list, num_frames, cuts)
        else:
            done_before = num_frames * int(split_at_cuts)

            def frames_with_progress():
                for i in range(num_frames):
                    yield frames[i].cpu().numpy()
                    progress.update_absolute(done_before + i + 1)

            selection = adaptive_keyframes(frames_with_progress(), s_min, s_max, interrupt, cuts)
        text = selection.as_string()
        ui = {"rerender_indices": [text], "rerender_notes": frame_size_note(frames)}
        if split_at_cuts:
            ui["rerender_report"] = report
        return io.NodeOutput(frames[list(selection.indices)], selection, text, ui=ui)


NODES = [KeyframePicker]
