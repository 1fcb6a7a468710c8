"""Why the cluster job can cut the propagation into intervals: each interval propagated alone, from its own frames,
its own flow and its key frames, with the seed shifted by its first frame, is bit-identical to the same frames of
the whole-clip propagation; the cut covers every frame that is not a key frame exactly once; the workers' interval
task does this from the node's widgets. And what the driver cuts from the workflow, or refuses to."""

import copy
import json
import re

import numpy as np
import pytest
import torch

from host_compat import REPO_ROOT
from rerender import flow as flowlib
from rerender import propagate
from test_propagate import moving_clip

from rerender_cli import dask_worker, scale_out  # noqa: E402
from rerender_cli.errors import UserError


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


WORKFLOW = json.loads((REPO_ROOT / "workflows" / "api" / "rerender_full_pipeline.json").read_text())


def test_the_cluster_tasks_of_every_interval_equal_the_whole_clip_node_settings():
    """The worker's interval task, fed Patch Propagator's and Flow Estimation's widgets as the shipped workflow has
    them, gives the frames the whole-clip propagation with the same widgets gives (the node's mapping of widgets to
    settings, the flow's consistency settings, the seed shift), and leaves the key frames out."""
    pipeline = scale_out.Pipeline.find(copy.deepcopy(WORKFLOW))
    widgets = dict(pipeline.settings, search_vote_iters=3, patchmatch_iters=2, seed=5)
    frames = moving_clip(10, seed=6)
    keys = [1, 5, 8]
    render = {"frames": frames.numpy(), "indices": keys, "key_images": (1.0 - frames[keys]).numpy()}
    flow = pipeline.flow
    whole_flow = flowlib.VideoFlow(frames, flowlib.DISEstimator(flow["dis_preset"]),
                                   **flowlib.consistency_settings(flow["consistency_alpha"], flow["consistency_beta"],
                                                                  flow["photometric_check"]))
    whole = propagate.propagate_video(frames, keys, torch.from_numpy(render["key_images"]), whole_flow,
                                      propagate.settings_from_widgets(**widgets), workers=1)
    for part in scale_out.segments(keys, len(frames)):
        alone = dask_worker.propagate_interval(dask_worker.interval_inputs(render, part.start, part.stop, part.keys),
                                               part.start, part.keys, widgets, flow, "a job")
        assert np.array_equal(alone, whole[part.propagated].numpy()), part.label


NODE_OF = {node["class_type"]: nid for nid, node in WORKFLOW.items()}
FLOW, PROPAGATOR = NODE_OF["Rerender_FlowEstimation"], NODE_OF["Rerender_PatchPropagator"]
CHECKPOINT, VIDEO_FRAMES = NODE_OF["CheckpointLoaderSimple"], NODE_OF["Rerender_VideoFrames"]


@pytest.mark.parametrize("change, expected", [
    (lambda p: p[FLOW]["inputs"].update(optical_flow=[CHECKPOINT, 0]), "disconnect Flow Estimation's optical_flow"),
    (lambda p: p[PROPAGATOR]["inputs"].update(seed=[VIDEO_FRAMES, 0]), "Patch Propagator's seed must be values"),
    (lambda p: p[PROPAGATOR]["inputs"].update(keyframes=[VIDEO_FRAMES, 0]), "must come straight from a Key Frame Picker"),
])
def test_a_workflow_the_cluster_cannot_cut_is_refused(change, expected):
    prompt = copy.deepcopy(WORKFLOW)
    change(prompt)
    with pytest.raises(UserError, match=re.escape(expected)) as refused:
        scale_out.Pipeline.find(prompt)
    assert refused.value.code == 3


def test_the_stages_split_the_workflow_at_patch_propagator():
    pipeline = scale_out.Pipeline.find(copy.deepcopy(WORKFLOW))
    classes = lambda stage: sorted(node["class_type"] for node in stage.values())  # noqa: E731
    assert "Rerender_KeyframeSampler" in classes(pipeline.key_stage())
    assert not {"Rerender_PatchPropagator", "CreateVideo", "SaveVideo"} & set(classes(pipeline.key_stage()))
    assert classes(pipeline.video_stage()) == ["CreateVideo", "LoadVideo", "Rerender_VideoFrames", "SaveVideo"]
