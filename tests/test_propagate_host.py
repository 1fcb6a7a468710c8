"""The Patch Propagator node run by the real host: same result as the library, key frames untouched, clear errors."""
import pytest
import torch
import torch.nn.functional as F

NODE = "Rerender_PatchPropagator"
HEIGHT, WIDTH, FRAMES = 32, 40, 6
FAST = dict(search_vote_iters=2, patchmatch_iters=2)


def clip() -> torch.Tensor:
    noise = torch.rand(1, 3, HEIGHT + 4, WIDTH + FRAMES + 4, generator=torch.Generator().manual_seed(0))
    texture = F.avg_pool2d(noise, 5, stride=1)[0]
    return torch.stack([texture[:, :, t:t + WIDTH].permute(1, 2, 0) for t in range(FRAMES)]).contiguous()


def node_inputs(host, frames, indices=(0, 3, 5), key_images=None, **overrides):
    keyframes = host.pack_module("rerender.keyframes").KeyFrameSelection(tuple(indices), frames.shape[0])
    flowlib = host.pack_module("rerender.flow")
    flow = flowlib.VideoFlow.estimate(frames, flowlib.DISEstimator("ultrafast"))
    if key_images is None:
        key_images = 1.0 - frames[list(indices)]
    defaults = host.pack_module("rerender.propagate").PropagationSettings()
    inputs = dict(frames=frames, keyframes=keyframes, key_frame_images=key_images, flow=flow,
                  colour_weight=defaults.colour_weight, edge_weight=defaults.edge_weight,
                  temporal_weight=defaults.temporal_weight, positional_weight=defaults.positional_weight,
                  patch_size=defaults.patch_size, search_vote_iters=defaults.search_vote_iters,
                  patchmatch_iters=defaults.patchmatch_iters, hole_fill=defaults.hole_fill,
                  histogram_blend=defaults.histogram_blend, poisson_fusion=defaults.poisson,
                  uniformity=defaults.uniformity, stop_threshold=defaults.stop_threshold, pyramid_levels=0,
                  descriptor_size=defaults.descriptor_size, seed=defaults.seed)
    inputs.update(overrides)
    return inputs


def test_node_is_registered_with_tooltips(host):
    assert NODE in host.nodes.NODE_CLASS_MAPPINGS
    schema = host.nodes.NODE_CLASS_MAPPINGS[NODE].define_schema()
    assert schema.category == "Rerender/Shared"
    for socket in list(schema.inputs) + list(schema.outputs):
        assert socket.tooltip, f"{socket.id} has no tooltip"


def test_node_defaults_are_the_library_defaults(host):
    schema = host.nodes.NODE_CLASS_MAPPINGS[NODE].define_schema()
    defaults = {socket.id: getattr(socket, "default", None) for socket in schema.inputs}
    expected = node_inputs(host, clip())
    for name in ("colour_weight", "edge_weight", "temporal_weight", "positional_weight", "patch_size",
                 "search_vote_iters", "patchmatch_iters", "hole_fill", "histogram_blend", "poisson_fusion",
                 "uniformity", "stop_threshold", "pyramid_levels", "descriptor_size", "seed"):
        assert defaults[name] == expected[name], name


def test_node_matches_the_library_and_keeps_key_frames(host):
    frames = clip()
    inputs = node_inputs(host, frames, **FAST)
    (video,) = host.run_node(NODE, **inputs)
    assert video.shape == frames.shape and video.dtype == torch.float32
    for slot, index in enumerate((0, 3, 5)):
        assert torch.equal(video[index], inputs["key_frame_images"][slot])
    propagate = host.pack_module("rerender.propagate")
    expected = propagate.propagate_video(frames, [0, 3, 5], inputs["key_frame_images"], inputs["flow"],
                                         propagate.PropagationSettings(**FAST))
    torch.testing.assert_close(video, expected)
    assert torch.equal(frames, clip())  # inputs untouched


def test_node_reproduces_the_video_when_the_key_frames_are_the_frames(host):
    frames = clip()
    (video,) = host.run_node(NODE, **node_inputs(host, frames, indices=(0, 5), key_images=frames[[0, 5]]))
    mse = ((video - frames) ** 2).mean(dim=(1, 2, 3))
    assert bool((10 * torch.log10(1 / mse.clamp(min=1e-10)) > 30).all()), mse


@pytest.mark.parametrize("change, message", [
    (dict(key_frame_images=torch.zeros(2, HEIGHT, WIDTH, 3)), "one image per selected key frame"),
    (dict(key_frame_images=torch.zeros(3, HEIGHT, WIDTH + 8, 3)), "resize the key frames"),
    (dict(patch_size=4), "must be odd"),
])
def test_node_rejects_bad_input_with_a_clear_error(host, change, message):
    inputs = node_inputs(host, clip())
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        host.run_node(NODE, **inputs)


def test_node_rejects_key_frames_from_another_clip(host):
    frames = clip()
    inputs = node_inputs(host, frames)
    inputs["keyframes"] = host.pack_module("rerender.keyframes").KeyFrameSelection((0, 3, 5), FRAMES + 4)
    with pytest.raises(ValueError, match="pick them from these same frames"):
        host.run_node(NODE, **inputs)
