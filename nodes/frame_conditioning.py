"""Per-frame ControlNet hints for sub-batches of a clip.

Users attach ControlNet with the host's Apply ControlNet node and one hint image per frame; the host gives hint i
to latent i of the batch it runs (`broadcast_image_to`). A stage that runs a clip in sub-batches (chunks, key frame
sets) must hand each sub-batch the hints of its own frames: `conditioning_for_frames` returns a conditioning whose
ControlNets (the whole `previous_controlnet` chain) are copies holding only those frames' hints.
"""
from typing import Sequence

import torch


def check_control_hints(conditioning, frame_count: int, node: str, input_name: str) -> None:
    """Refuse a ControlNet whose hint batch is neither one image nor one per frame (before any work)."""
    for _, options in conditioning:
        control = options.get("control")
        while control is not None:
            hints = getattr(control, "cond_hint_original", None)
            if hints is not None and hints.shape[0] not in (1, frame_count):
                raise ValueError(f"{node}: a ControlNet on `{input_name}` has {hints.shape[0]} hint images for "
                                 f"{frame_count} frames; give it one hint per frame (or a single one for all).")
            control = getattr(control, "previous_controlnet", None)


def _control_for_frames(control, indices: torch.Tensor, frame_count: int):
    if control is None:
        return None
    copy = control.copy()
    hints = getattr(control, "cond_hint_original", None)
    if hints is not None and hints.shape[0] == frame_count and frame_count > 1:
        copy.cond_hint_original = hints[indices.to(hints.device)]
    copy.set_previous_controlnet(_control_for_frames(control.previous_controlnet, indices, frame_count))
    return copy


def conditioning_for_frames(conditioning, indices: Sequence[int], frame_count: int):
    """A new CONDITIONING whose ControlNets see only frames `indices` of a `frame_count`-frame clip (unchanged
    entries are shared; the input is never modified)."""
    index_tensor = torch.as_tensor(list(indices), dtype=torch.long)
    out = []
    for embedding, options in conditioning:
        if options.get("control") is not None:
            options = dict(options, control=_control_for_frames(options["control"], index_tensor, frame_count))
        out.append([embedding, options])
    return out
