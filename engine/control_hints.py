"""Per-frame ControlNet hints as users wire them: core Apply ControlNet (Advanced) upstream, on the whole clip's hint
batch, chained as often as wanted (depth + pose + canny). Shared by every stage that samples a clip one frame or one
sub-batch at a time (key frame sampler, inversion, TokenFlow chunks and key frame sets).

The host gives hint i to latent i of the batch it runs and keeps hint[:1] for a one-frame latent, so sampling frame i
of a clip alone would give it frame 0's hint. `conditioning_for_frames` gives conditioning whose ControlNet chain
(every link: its own strength, start/end percent, VAE, type) sees only the hints of the frames being sampled; a
single hint image applies to every frame, as in the host.
"""
from typing import Dict, List, Mapping, Optional, Sequence

import torch


def _chains(conditioning):
    for _, options in conditioning:
        control = options.get("control")
        position = 1
        while control is not None:
            yield position, control
            control, position = control.previous_controlnet, position + 1


def check_control_hints(conditionings: Mapping[str, list], num_frames: int, node_name: str) -> int:
    """Raise before any sampling when a ControlNet's hint batch is neither 1 image nor one per clip frame.
    `conditionings` maps input names (e.g. positive, negative) to CONDITIONING. Returns how many ControlNets are
    attached."""
    seen = set()
    for label, conditioning in conditionings.items():
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


def conditioning_for_frames(conditioning, frames: Sequence[int], num_frames: int,
                            memo: Optional[Dict[int, object]] = None) -> List:
    """`conditioning` with every ControlNet of every entry replaced by a copy holding only the hints of clip frames
    `frames` (in that order). Pass the same `memo` for positive and negative so a ControlNet shared by both (as core
    Apply ControlNet (Advanced) attaches it) stays one shared object. The input is never modified."""
    memo = {} if memo is None else memo
    indices = torch.as_tensor(list(frames), dtype=torch.long)
    out = []
    for tensor, options in conditioning:
        if options.get("control") is None:
            out.append([tensor, options])
            continue
        out.append([tensor, {**options, "control": _frames_chain(options["control"], indices, num_frames, memo)}])
    return out


def _frames_chain(control, indices: torch.Tensor, num_frames: int, memo: Dict[int, object]):
    if control is None:
        return None
    if id(control) in memo:
        return memo[id(control)]
    copy = control.copy()
    hints = control.cond_hint_original
    if hints is not None and hints.shape[0] == num_frames and num_frames > 1:
        copy.cond_hint_original = hints[indices.to(hints.device)]
    copy.set_previous_controlnet(_frames_chain(control.previous_controlnet, indices, num_frames, memo))
    memo[id(control)] = copy
    return copy
