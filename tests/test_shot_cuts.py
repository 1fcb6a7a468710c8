"""Shot cuts without the host: the cut detector on two shared clips joined end to end, the shots carried by the key
frame selection, key frames on both sides of every cut, and a propagation that never takes pixels or flow across a
cut."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clips import read_frames
from rerender import flow as flowlib
from rerender import propagate
from rerender.keyframes import (DEFAULT_CUT_THRESHOLD, KeyFrameSelection, adaptive_keyframes_from_differences,
                                detect_cuts, parse_index_list, uniform_keyframes)

FAST = propagate.PropagationSettings(search_vote_iters=2, patchmatch_iters=2)


def shared_clip(shared_data, name: str, count: int, size: int) -> torch.Tensor:
    frames = read_frames(shared_data / "videos" / name, count)
    return F.interpolate(frames.movedim(-1, 1), size=(size, size), mode="area").movedim(1, -1).contiguous()


def joined(shared_data, count: int, size: int) -> tuple:
    """(up to `count` frames of the man clip, then of the car clip; the index of the first car frame)."""
    man = shared_clip(shared_data, "man_talking_512x640_25fps.mp4", count, size)
    car = shared_clip(shared_data, "car_turn_480x480_10fps.mp4", count, size)
    return torch.cat([man, car]), man.shape[0]


def test_the_join_of_two_clips_is_the_only_cut_found(shared_data):
    """The whole of both clips: no cut inside either (the car clip pans and turns fast), one at the join, with a
    wide margin on both sides of the default threshold."""
    frames, join = joined(shared_data, count=81, size=64)
    cuts, distances = detect_cuts(frames)
    assert cuts == (join,)
    inside = np.delete(distances, join)
    assert inside.max() < DEFAULT_CUT_THRESHOLD / 3 and distances[join] > 2 * DEFAULT_CUT_THRESHOLD
    reversed_cuts, _ = detect_cuts(torch.cat([frames[join:], frames[:join]]))
    assert reversed_cuts == (frames.shape[0] - join,)


def test_threshold_decides_and_is_range_checked():
    frames = torch.zeros(6, 8, 8, 3)
    frames[3:, :4] = 1.0                 # half of the pixels change colour at frame 3: distance 0.5
    assert detect_cuts(frames, 0.4)[0] == (3,)
    assert detect_cuts(frames, 0.6)[0] == ()
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            detect_cuts(frames, bad)


def test_detection_in_chunks_equals_one_batch():
    """Frames go through the detector a chunk at a time: a cut on a chunk boundary is still seen."""
    from rerender import keyframes
    ramp = torch.linspace(0.0, 1.0, 10).view(1, 10, 1).expand(12, 10, 3)
    frames = torch.stack([ramp.roll(i, dims=1) for i in range(40)])      # a moving ramp: the same colours
    frames += 0.01 * torch.rand(frames.shape, generator=torch.Generator().manual_seed(0))
    boundary = keyframes.CUT_CHUNK_FRAMES
    frames[boundary:, ..., 1:] *= 0.3                                    # another palette from here on
    cuts, distances = detect_cuts(frames)
    histograms = keyframes.colour_histograms(frames)
    whole = 0.5 * (histograms[1:] - histograms[:-1]).abs().sum(dim=1)
    assert cuts == (boundary,)
    assert np.allclose(distances[1:], whole.double().numpy()) and distances[0] == 0


def test_selection_without_cuts_is_one_shot():
    selection = KeyFrameSelection((0, 10, 20), 25)
    assert selection.cuts == () and selection.shots() == [range(0, 25)]
    assert selection.shot_keys() == [(0, 10, 20)] and selection.anchor_of(20) == 0
    assert selection.intervals() == [(0, 10), (10, 20)]


def test_selection_carries_the_shots():
    selection = KeyFrameSelection((0, 3, 6, 7, 9, 12, 13), 16, cuts=(7, 13))
    assert selection.shots() == [range(0, 7), range(7, 13), range(13, 16)]
    assert [selection.shot_of(f) for f in (0, 6, 7, 12, 13, 15)] == [0, 0, 1, 1, 2, 2]
    assert selection.shot_keys() == [(0, 3, 6), (7, 9, 12), (13,)]
    assert [selection.anchor_of(k) for k in (3, 6, 9, 12, 13)] == [0, 0, 7, 7, 13]
    assert selection.intervals() == [(0, 3), (3, 6), (7, 9), (9, 12)]   # (6, 7) and (12, 13) straddle a cut


@pytest.mark.parametrize("indices, cuts, message", [
    ((0, 5, 9), (5,), r"\[4\] beside a cut"),
    ((0, 4, 9), (5,), r"\[5\] beside a cut"),
    ((0, 4, 5), (0,), "out of range"),
    ((0, 4, 5, 8, 9), (9, 5), "increasing"),
])
def test_selection_refuses_a_cut_without_key_frames_beside_it(indices, cuts, message):
    with pytest.raises(ValueError, match=message):
        KeyFrameSelection(indices, 10, cuts=cuts)


def test_every_mode_keys_both_sides_of_every_cut():
    cuts = (7, 12)
    uniform = uniform_keyframes(20, 4, include_last=False, cuts=cuts)
    assert uniform.indices == (0, 4, 6, 7, 11, 12, 16) and uniform.cuts == cuts   # spacing restarts per shot
    assert uniform_keyframes(20, 4, include_last=True, cuts=cuts).indices == (0, 4, 6, 7, 11, 12, 16, 19)
    listed = parse_index_list("0,10,-1", 20, cuts)
    assert listed.indices == (0, 6, 7, 10, 11, 12, 19)
    diffs = np.full(20, 0.01)
    diffs[cuts[0]] = 100.0               # a cut is not motion: it never pulls a key frame into the other shot
    diffs[3] = 1.0
    adaptive = adaptive_keyframes_from_differences(diffs, 2, 4, cuts)
    for shot in adaptive.shot_keys():
        assert np.diff(shot).max(initial=0) <= 4
    assert {6, 7, 11, 12} <= set(adaptive.indices) and 3 in adaptive.indices
    for selection in (uniform, listed, adaptive):
        assert all(b - a == 1 for a, b in zip(selection.indices, selection.indices[1:])
                   if selection.shot_of(a) != selection.shot_of(b))


def test_propagation_plan_stays_inside_each_shot():
    keys, cuts = (0, 3, 6, 7, 10, 13), (7,)
    plan = propagate.propagation_plan(14, keys, cuts)
    selection = KeyFrameSelection(keys, 14, cuts)
    assert [job.interval for job in plan if job.kind == "forward"] == [(0, 3), (3, 6), (7, 10), (10, 13)]
    for job in plan:
        assert {selection.shot_of(t) for t in job.targets} == {selection.shot_of(job.key)}
        assert keys[job.slot] == job.key
    assert propagate.pass_frame_count(14, keys, cuts) == 2 * 8
    assert propagate.propagation_plan(14, keys) == plan    # keys beside the cut: nothing lies across it anyway

    sparse = propagate.propagation_plan(14, (0, 9), (7,))  # keys not beside the cut: each shot on its own
    assert [(job.kind, job.key, list(job.targets)) for job in sparse] == [
        ("single", 0, [1, 2, 3, 4, 5, 6]), ("single", 9, [8, 7]), ("single", 9, [10, 11, 12, 13])]
    with pytest.raises(ValueError, match="frames 7..13 has no key frame"):
        propagate.propagation_plan(14, (0, 3), (7,))


class RecordingFlow:
    """A VideoFlow that records every pair asked for."""

    def __init__(self, video_flow):
        self.video_flow, self.pairs = video_flow, []
        self.num_frames, self.height, self.width = video_flow.num_frames, video_flow.height, video_flow.width

    def pair(self, src, dst, device=None):
        self.pairs.append((src, dst))
        return self.video_flow.pair(src, dst, device)


def redness(images: torch.Tensor) -> torch.Tensor:
    """Per pixel, how much red stands above green and blue: 0 for any grey."""
    return images[..., 0] - images[..., 1:].amax(dim=-1)


def red_and_grey_keys(shared_data):
    """The joined clip with one key frame per shot, away from the cut (frames 0 and join+3): shot 1's painted red
    (its luminance in the red channel only), shot 2's grey. A propagation that ignored the cut would carry shot 1's
    key into shot 2 and shot 2's into shot 1."""
    frames, join = joined(shared_data, count=6, size=32)
    keys = (0, join + 3)
    styles = frames[list(keys)].mean(dim=-1, keepdim=True).expand(-1, -1, -1, 3).clone()
    styles[0, ..., 1:] = 0.0
    return frames, join, keys, styles


def test_each_shot_is_propagated_as_if_it_were_alone(shared_data):
    """With the cut, each shot's frames are exactly what propagating that shot alone gives (seeds follow the frame
    index, hence the offset): nothing of the other shot enters. Without it, shot 2 differs."""
    frames, join, keys, styles = red_and_grey_keys(shared_data)
    dis = flowlib.DISEstimator("ultrafast")
    video = propagate.propagate_video(frames, keys, styles, flowlib.VideoFlow.estimate(frames, dis), FAST,
                                      workers=1, cuts=(join,))
    for shot, key, style, seed in ((slice(0, join), keys[0], styles[:1], 0),
                                   (slice(join, None), keys[1] - join, styles[1:], join)):
        alone = propagate.propagate_video(frames[shot], (key,), style, flowlib.VideoFlow.estimate(frames[shot], dis),
                                          dataclasses.replace(FAST, seed=seed), workers=1)
        assert torch.equal(video[shot], alone)
    ignoring_the_cut = propagate.propagate_video(frames, keys, styles, flowlib.VideoFlow.estimate(frames, dis),
                                                 FAST, workers=1)
    assert not torch.equal(ignoring_the_cut[join:], video[join:])


def test_no_propagated_frame_takes_pixels_or_flow_across_a_cut(shared_data):
    """Linear blending (the histogram blend would re-colour a leak to the other pass's statistics, hiding it): no
    red in shot 2, no grey in shot 1, and no flow pair asked across the cut; the control without cuts shows both
    leaks."""
    frames, join, keys, styles = red_and_grey_keys(shared_data)
    video_flow = flowlib.VideoFlow.estimate(frames, flowlib.DISEstimator("ultrafast"))
    linear = propagate.PropagationSettings(search_vote_iters=2, patchmatch_iters=2, histogram_blend=False)

    def propagated(cuts):
        flows = RecordingFlow(video_flow)
        video = propagate.propagate_video(frames, keys, styles, flows, linear, workers=1, cuts=cuts)
        return video, flows.pairs

    video, pairs = propagated((join,))
    assert pairs and all((src < join) == (dst < join) for src, dst in pairs)
    assert redness(video[join:]).max() < 0.02                                           # no red in shot 2
    assert video[1:join, ..., 1:].max() < 0.02 and redness(video[1:join]).mean() > 0.1   # only red in shot 1

    control, control_pairs = propagated(())
    assert any((src < join) != (dst < join) for src, dst in control_pairs)
    # without cuts both leaks are several times what the cut run shows (per-pixel weights make them small, not
    # absent)
    assert redness(control[join:join + 2]).max() > 4 * max(float(redness(video[join:]).max()), 1e-3)
    assert control[1:join, ..., 1:].max() > 4 * max(float(video[1:join, ..., 1:].max()), 1e-3)
