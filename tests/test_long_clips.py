"""Long clips in bounded memory: on-demand flow never holds more pairs than its bound and gives the numbers a
precomputed flow gives, the propagator's live state is one interval (not the clip), and the flow payload pickles."""
import gc
import pickle

import torch

from rerender import flow as flowlib
from rerender import propagate
from test_propagate import moving_clip

CHEAP = propagate.PropagationSettings(search_vote_iters=1, patchmatch_iters=1, pyramid_levels=1)


def live_pass_frames() -> int:
    return sum(type(o) is propagate.PassFrame for o in gc.get_objects())


def test_on_demand_flow_stays_within_its_bound_and_equals_the_precomputed_flow():
    frames = moving_clip(43)  # 43 frames, 40x56, moving one pixel per frame
    keys = list(range(0, 43, 6))
    styles = frames[keys].flip(-1)  # any rendering
    bound = 7  # one interval's 6 pairs, plus one
    lazy = flowlib.VideoFlow(frames, flowlib.DISEstimator("ultrafast"), max_cached_pairs=bound)
    live = []
    video = propagate.propagate_video(frames, keys, styles, lazy, CHEAP, workers=2,
                                      on_frame=lambda done: live.append(live_pass_frames()))
    assert 0 < lazy.peak_cached_pairs <= bound and len(lazy.computed_pairs) <= 2 * bound
    interval_frames = 5
    assert max(live) <= 3 * interval_frames < 2 * (43 - len(keys))  # passes in flight + one waiting forward pass
    assert live_pass_frames() == 0

    precomputed = flowlib.VideoFlow.estimate(frames, flowlib.DISEstimator("ultrafast"))
    assert precomputed.max_cached_pairs is None and len(precomputed.computed_pairs) == 2 * 42
    assert torch.equal(video, propagate.propagate_video(frames, keys, styles, precomputed, CHEAP, workers=1))
    for src, dst in [(3, 2), (0, 30), (42, 41)]:  # evicted long ago, asked again: the same numbers
        assert all(torch.equal(a, b) for a, b in zip(lazy.pair(src, dst), precomputed.pair(src, dst)))


def test_each_pair_is_estimated_once_while_it_stays_in_the_cache():
    frames = torch.rand(12, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    video_flow = flowlib.VideoFlow(frames, flowlib.DISEstimator("ultrafast"), max_cached_pairs=3)
    for index in range(1, 12):  # the propagator's order: each pass walks consecutive pairs
        video_flow.pair(index - 1, index), video_flow.pair(index, index - 1), video_flow.pair(index - 1, index)
    assert video_flow.estimates == 11 and video_flow.peak_cached_pairs == 3
    assert video_flow.computed_pairs == {(8, 9), (9, 8), (9, 10), (10, 9), (10, 11), (11, 10)}
    video_flow.pair(9, 10)  # now the most recent: the next new pair drops (8, 9)
    video_flow.pair(0, 11)
    assert (9, 10) in video_flow.computed_pairs and (8, 9) not in video_flow.computed_pairs
    assert video_flow.estimates == 12 and video_flow.pair_nbytes == 10 * 32 * 32


def test_flow_payload_pickles_with_its_cache():
    frames = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    video_flow = flowlib.VideoFlow(frames, flowlib.DISEstimator("fast"), max_cached_pairs=2)
    before = video_flow.pair(1, 2)
    copy = pickle.loads(pickle.dumps(video_flow))
    assert copy.computed_pairs == {(1, 2), (2, 1)} and copy.estimator.preset == "fast"
    assert all(torch.equal(a, b) for a, b in zip(copy.pair(1, 2), before))
    assert all(torch.equal(a, b) for a, b in zip(copy.pair(3, 0), video_flow.pair(3, 0)))  # estimates after loading
