"""Per-frame ControlNet hints as users wire them: core Apply ControlNet (Advanced) upstream, on the whole clip's hint
batch, chained as often as wanted (depth + pose + canny). Reusable by every sampler that renders one frame of a
clip at a time (key frame sampler, FRESCO).

The host broadcasts a hint batch to the latent batch, keeping hint[:1] for a one-frame latent, so sampling frame i
of a clip alone would give it frame 0's hint. `conditioning_for_frame` gives conditioning whose ControlNet chain
(every link: its own strength, start/end percent, VAE, type) sees only frame i's hint; a single hint image applies
to every frame, as in the host.
"""
from typing import Dict, List


def _chains(conditioning):
    for _, options in conditioning:
        control = options.get("control")
        position = 1
        while control is not None:
            yield position, control
            control, position = control.previous_controlnet, position + 1


def check_control_hints(positive, negative, num_frames: int, node_name: str) -> int:
    """Raise before any sampling when a ControlNet's hint batch is neither 1 image nor one per clip frame;
    returns how many ControlNets are attached."""
    seen = set()
    for label, conditioning in (("positive", positive), ("negative", negative)):
        for position, control in _chains(conditioning):
            if id(control) in seen:
                continue
            seen.add(id(control))
            hints = getattr(control, "cond_hint_original", None)
            count = 1 if hints is None else hints.shape[0]
            if count not in (1, num_frames):
                raise ValueError(
                    f"{node_name}: the ControlNet ({type(control).__name__}) number {position} in the chain on "
                    f"`{label}` (1 = applied last) has {count} hint images for a {num_frames}-frame clip; give it "
                    f"one hint per frame (run the preprocessor on `frames`) or a single image for all frames.")
    return len(seen)


def conditioning_for_frame(conditioning, frame: int, num_frames: int, memo: Dict[int, object]) -> List:
    """`conditioning` with every ControlNet of every entry replaced by a copy whose hint is frame `frame`'s. Pass the
    same `memo` for positive and negative so a ControlNet shared by both (as core Apply ControlNet (Advanced)
    attaches it) stays one shared object."""
    out = []
    for tensor, options in conditioning:
        if options.get("control") is None:
            out.append([tensor, options])
            continue
        out.append([tensor, {**options, "control": _frame_chain(options["control"], frame, num_frames, memo)}])
    return out


def _frame_chain(control, frame: int, num_frames: int, memo: Dict[int, object]):
    if control is None:
        return None
    if id(control) in memo:
        return memo[id(control)]
    copy = control.copy()
    hints = control.cond_hint_original
    if hints is not None and hints.shape[0] == num_frames and num_frames > 1:
        copy.cond_hint_original = hints[frame:frame + 1]
    copy.set_previous_controlnet(_frame_chain(control.previous_controlnet, frame, num_frames, memo))
    memo[id(control)] = copy
    return copy
