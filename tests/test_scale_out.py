"""Why the scale-out job can cut the propagation into intervals: each interval propagated alone, from its own frames,
its own flow and its key frames, with the seed shifted by its first frame, is bit-identical to the same frames of
the whole-clip propagation; and the cut covers every frame that is not a key frame exactly once."""

import pytest
import torch

from rerender import flow as flowlib
from rerender import propagate
from test_propagate import moving_clip

from rerender_cli import scale_out  # noqa: E402


@pytest.mark.parametrize("keys, num_frames", [([0, 3, 6, 9], 10), ([2, 5, 9], 12), ([4], 7), ([0, 1, 5], 6)])
def test_segments_cover_every_propagated_frame_once(keys, num_frames):
    parts = scale_out.segments(keys, num_frames)
    covered = sorted(i for part in parts for i in part.propagated)
    assert covered == [i for i in range(num_frames) if i not in keys]
    for part in parts:
        assert all(part.start <= k <= part.stop for k in part.keys)
        assert [k for k in keys if part.start <= k <= part.stop] == list(part.keys)  # no key frame missing inside


def test_each_interval_alone_equals_the_whole_clip_bit_for_bit():
    frames = moving_clip(12, seed=3)
    keys = [2, 6, 9]                                   # frames before the first key and after the last too
    styles = 1.0 - frames[keys]
    settings = propagate.PropagationSettings(search_vote_iters=3, patchmatch_iters=2, seed=11)
    estimator = flowlib.DISEstimator("ultrafast")
    whole = propagate.propagate_video(frames, keys, styles, flowlib.VideoFlow.estimate(frames, estimator), settings,
                                      workers=1)
    for part in scale_out.segments(keys, frames.shape[0]):
        clip = frames[part.start:part.stop + 1]
        local_keys = [k - part.start for k in part.keys]
        alone = propagate.propagate_video(
            clip, local_keys, styles[[keys.index(k) for k in part.keys]],
            flowlib.VideoFlow.estimate(clip, estimator),
            propagate.PropagationSettings(search_vote_iters=3, patchmatch_iters=2, seed=11 + part.start), workers=1)
        assert torch.equal(alone, whole[part.start:part.stop + 1]), part.label


def test_without_the_seed_shift_an_interval_differs():
    """The check above can fail: the whole-clip run seeds each frame by its index, so an interval propagated alone
    with the unshifted seed searches differently."""
    frames = moving_clip(9, seed=4)
    keys = [0, 4, 8]
    styles = 1.0 - frames[keys]
    settings = propagate.PropagationSettings(search_vote_iters=3, patchmatch_iters=2, seed=11)
    estimator = flowlib.DISEstimator("ultrafast")
    whole = propagate.propagate_video(frames, keys, styles, flowlib.VideoFlow.estimate(frames, estimator), settings,
                                      workers=1)
    clip = frames[4:9]
    alone = propagate.propagate_video(clip, [0, 4], styles[1:], flowlib.VideoFlow.estimate(clip, estimator),
                                      settings, workers=1)
    assert not torch.equal(alone, whole[4:9])
