"""Flow estimation library (no host): recovery of known motion on real frames, warp-back on a real clip,
disocclusion, the pair cache, RAFT checkpoint conversion, and bad input."""
import argparse
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from host_compat import define_missing_torchvision_ops
from rerender import flow as flowlib
from rerender.raft_checkpoint import convert_original_state_dict, load_raft, raft_from_state_dict
from rerender.warp import flow_warp

define_missing_torchvision_ops()  # CPU torch with PyPI's CUDA torchvision: see host_compat


def read_frames(path, indices, size):
    """Frames `indices` of a video as [N,3,h,w] float 0..1, area-resized to size = (h, w)."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    for index in range(max(indices) + 1):
        ok, frame = cap.read()
        assert ok, f"{path} has fewer than {max(indices) + 1} frames"
        if index in indices:
            frames.append(cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), size[::-1], interpolation=cv2.INTER_AREA))
    cap.release()
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0


def as_image_batch(nchw):
    return nchw.movedim(1, -1).contiguous()


def rigid_motion_flow(height, width, degrees, shift):
    """Backward flow of a rotation about the centre plus a shift: pixel p of the moved frame comes from
    R (p - c) + c + shift in the original."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    cx, cy = (width - 1) / 2, (height - 1) / 2
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    source_x = cos * (xs - cx) - sin * (ys - cy) + cx + shift[0]
    source_y = sin * (xs - cx) + cos * (ys - cy) + cy + shift[1]
    return torch.stack([source_x - xs, source_y - ys])[None]


class CountingEstimator:
    """Wraps an estimator and records every batch it is asked for."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, image_a, image_b):
        self.calls += 1
        return self.inner(image_a, image_b)


@pytest.fixture(scope="module")
def raft_small(shared_data):
    return load_raft(str(shared_data / "weights" / "raft-small.pth"))


@pytest.fixture(scope="module")
def man_frame(shared_data):
    return read_frames(shared_data / "videos" / "man_talking_512x640_25fps.mp4", [0], (160, 128))


def estimators(raft_module):
    return [flowlib.DISEstimator("medium"), flowlib.RAFTEstimator(raft_module, iterations=12)]


# mean end-point error allowed on known motion of a 160x128 frame: RAFT-small is coarser than DIS at this size
RIGID_TOLERANCE = {flowlib.DISEstimator: 0.25, flowlib.RAFTEstimator: 0.4}


@pytest.mark.parametrize("degrees, shift", [(0.0, (4.5, -2.5)), (3.0, (0.0, 0.0)), (2.0, (3.0, 1.0))])
def test_known_rigid_motion_of_a_real_frame_is_recovered(man_frame, raft_small, degrees, shift):
    true_flow = rigid_motion_flow(*man_frame.shape[-2:], degrees, shift)
    moved = flow_warp(man_frame, true_flow)
    for estimator in estimators(raft_small):
        video_flow = flowlib.VideoFlow.estimate(as_image_batch(torch.cat([man_frame, moved])), estimator)
        flow, occlusion = video_flow.pair(0, 1)
        inner = (slice(None), slice(None), slice(12, -12), slice(12, -12))  # the moved frame's border is padding
        error = (flow - true_flow).norm(dim=1, keepdim=True)[inner]
        assert error.mean() < RIGID_TOLERANCE[type(estimator)], (estimator, error.mean())
        assert occlusion[inner].mean() < 0.05, estimator


def test_warping_the_next_frame_back_reproduces_the_frame_outside_occlusion(shared_data, raft_small):
    clip = read_frames(shared_data / "videos" / "car_turn_480x480_10fps.mp4", [30, 33], (128, 128))
    still_error = (clip[1] - clip[0]).abs().mean()
    for estimator in estimators(raft_small):
        flow, occlusion = flowlib.VideoFlow.estimate(as_image_batch(clip), estimator).pair(1, 0)
        valid = 1 - occlusion
        warped = flow_warp(clip[1:], flow)
        error = ((warped - clip[:1]).abs().mean(dim=1, keepdim=True) * valid).sum() / valid.sum()
        assert error < 0.025 and error < 0.4 * still_error, (estimator, error, still_error)
        assert valid.mean() > 0.6, estimator


def test_disoccluded_border_of_a_shift_is_flagged(man_frame, raft_small):
    shift = 8
    wide = F.interpolate(man_frame, size=(man_frame.shape[-2], man_frame.shape[-1] + shift), mode="bilinear")
    before, after = wide[..., shift:], wide[..., :-shift]  # the content moves right; new content enters left
    for estimator in estimators(raft_small):
        video_flow = flowlib.VideoFlow.estimate(as_image_batch(torch.cat([before, after])), estimator)
        flow, occlusion = video_flow.pair(0, 1)
        assert occlusion[..., : shift - 1].mean() > 0.95, estimator
        assert occlusion[..., shift + 2:].mean() < 0.02, estimator
        assert (flow[0, 0, :, shift + 2:] + shift).abs().median() < 0.25, estimator
        _, reverse_occlusion = video_flow.pair(1, 0)  # seen backwards, the right strip leaves the frame
        assert reverse_occlusion[..., -(shift - 1):].mean() > 0.95, estimator


def test_occlusion_uses_the_reference_thresholds():
    flow = torch.zeros(1, 2, 16, 16)
    flow[:, 0] = 1.0
    reverse = -flow.clone()
    # the round trip of pixel (y, x) = (4, 5) lands on (4, 6); its tolerance is 0.01 * (1 + 1) + 0.5 = 0.52 px
    reverse[0, 1, 4, 6] = 0.51
    reverse[0, 1, 8, 6] = 0.53
    occlusion = flowlib.forward_backward_occlusion(flow, reverse)[0, 0]
    assert not occlusion[4, 5] and occlusion[8, 5]
    assert occlusion[:, :15].sum() == 1 and occlusion[:, 15].all()  # the last column's round trip leaves the frame


def test_photometric_check_flags_changed_colours():
    image = torch.rand(1, 3, 16, 16)
    changed = image.clone()
    changed[..., 4:8, 4:8] = 1.0 - changed[..., 4:8, 4:8].round()  # mean error >= 0.5 there
    still = torch.zeros(1, 2, 16, 16)
    flagged = flowlib.photometric_occlusion(changed, image, still)
    assert flagged[..., 4:8, 4:8].all() and flagged.sum() == 16


def test_photometric_check_only_adds_occlusion(man_frame):
    moved = flow_warp(man_frame, rigid_motion_flow(*man_frame.shape[-2:], 2.0, (3.0, 1.0)))
    moved[..., 40:60, 40:60] = 1.0  # something new appears
    frames = as_image_batch(torch.cat([man_frame, moved]))
    plain = flowlib.VideoFlow.estimate(frames, flowlib.DISEstimator("medium")).pair(0, 1)[1]
    with_colour = flowlib.VideoFlow.estimate(frames, flowlib.DISEstimator("medium"),
                                             photometric_threshold=flowlib.PHOTOMETRIC_THRESHOLD).pair(0, 1)[1]
    assert (with_colour >= plain).all() and with_colour[..., 40:60, 40:60].mean() > plain[..., 40:60, 40:60].mean()


def test_pairs_are_computed_once_and_stored_on_the_cpu(man_frame):
    frames = as_image_batch(torch.cat([flow_warp(man_frame, rigid_motion_flow(160, 128, 0.0, (i, 0.0)))
                                       for i in range(4)]))
    counting = CountingEstimator(flowlib.DISEstimator("ultrafast"))
    progress = []
    video_flow = flowlib.VideoFlow.estimate(frames, counting, progress=lambda done, total: progress.append(done))
    assert counting.calls == 3 and progress == [1, 2, 3]
    assert video_flow.computed_pairs == {(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2)}
    first = video_flow.pair(0, 3)
    assert counting.calls == 4
    assert torch.equal(video_flow.pair(0, 3)[0], first[0]) and counting.calls == 4
    video_flow.pair(3, 0), video_flow.pair(2, 1)
    assert counting.calls == 4
    assert (first[0][:, 0, 20:-20, 20:-20] - 3).abs().median() < 0.25  # frame 3 at p is frame 0 at p + 3
    flow, occlusion = video_flow.pair(1, 1)
    assert not flow.any() and not occlusion.any()
    for stored_flow, stored_occlusion in video_flow._pairs.values():
        assert stored_flow.device.type == "cpu" and stored_flow.dtype == torch.float16
        assert stored_occlusion.dtype == torch.bool
    assert first[0].dtype == torch.float32 and first[0].shape == (1, 2, 160, 128) and first[1].shape == (1, 1, 160, 128)
    assert set(first[1].unique().tolist()) <= {0.0, 1.0}


def test_interrupt_stops_between_pairs(man_frame):
    frames = as_image_batch(man_frame.repeat(5, 1, 1, 1))
    counting = CountingEstimator(flowlib.DISEstimator("ultrafast"))
    checks = []

    def interrupt_after_two():
        checks.append(1)
        if len(checks) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        flowlib.VideoFlow.estimate(frames, counting, interrupt_check=interrupt_after_two)
    assert counting.calls == 2


def test_raft_lean_forward_equals_torchvision_forward(raft_small):
    image1, image2 = torch.rand(2, 1, 3, 128, 136) * 2 - 1
    with torch.no_grad():
        assert torch.equal(flowlib.raft_final_flow(raft_small, image1, image2, 3),
                           raft_small(image1, image2, num_flow_updates=3)[-1])


def test_raft_estimator_accepts_any_frame_size(raft_small):
    frames = torch.rand(2, 3, 70, 99)  # not a multiple of 8, smaller than RAFT's 128 px minimum
    flow = flowlib.RAFTEstimator(raft_small, iterations=2)(frames[:1], frames[1:])
    assert flow.shape == (1, 2, 70, 99) and torch.isfinite(flow).all()


def test_original_checkpoints_convert_to_torchvision(shared_data):
    state_dict = torch.load(shared_data / "weights" / "raft-sintel.pth", map_location="cpu", weights_only=True)
    variant, converted = convert_original_state_dict(state_dict)
    assert variant == "large"
    # princeton-vl stores each downsampling block's norm twice (normK aliases downsample.1): the only dropped keys
    assert len(state_dict) - len(converted) == 10
    module = raft_from_state_dict(converted)  # torchvision layout passes through
    assert module.mask_predictor is not None
    small = torch.load(shared_data / "weights" / "raft-small.pth", map_location="cpu", weights_only=True)
    assert convert_original_state_dict(small)[0] == "small"


def test_converted_raft_is_accurate_on_a_sintel_pair(shared_data, raft_small):
    """A wrongly mapped weight would not give accurate flow on real Sintel motion (a fast crop of alley_1 2 -> 3)."""
    folder = shared_data / "flow" / "sintel_alley_1"
    images = [cv2.cvtColor(cv2.imread(str(folder / "final" / name)), cv2.COLOR_BGR2RGB)[128:256, 512:640]
              for name in ("frame_0002.png", "frame_0003.png")]
    with open(folder / "gt" / "frame_0002.flo", "rb") as file:
        header = np.frombuffer(file.read(12), dtype=np.int32)
        truth = np.frombuffer(file.read(), dtype=np.float32).reshape(header[2], header[1], 2)[128:256, 512:640]
    frames = torch.from_numpy(np.stack(images)).float() / 255.0
    flow, _ = flowlib.VideoFlow.estimate(frames, flowlib.RAFTEstimator(raft_small, iterations=12)).pair(1, 0)
    truth = torch.from_numpy(truth.copy()).permute(2, 0, 1)
    end_point_error = (flow[0] - truth).norm(dim=0).mean()
    assert end_point_error < 0.15 * truth.norm(dim=0).mean(), (end_point_error, truth.norm(dim=0).mean())


def test_safetensors_checkpoint_loads_the_same(shared_data, raft_small, tmp_path):
    import safetensors.torch
    path = tmp_path / "raft-small.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in raft_small.state_dict().items()}, str(path))
    reloaded = load_raft(str(path))
    for (name, a), b in zip(raft_small.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_checkpoints_are_refused_clearly(shared_data, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((shared_data / "weights" / "raft-small.pth").read_bytes()[:100_000])
    not_raft = tmp_path / "conv.pth"
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), not_raft)
    incomplete = tmp_path / "incomplete.pth"
    small = torch.load(shared_data / "weights" / "raft-small.pth", map_location="cpu", weights_only=True)
    torch.save({k: v for k, v in small.items() if "update_block" not in k}, incomplete)
    with_code = tmp_path / "with_code.pth"     # a pickle of an arbitrary object: weights_only refuses it
    torch.save({"args": argparse.Namespace(small=True)}, with_code)
    for path in (garbage, truncated, with_code):
        with pytest.raises(ValueError, match="is not a readable checkpoint") as error:
            load_raft(str(path))
        assert str(path) in str(error.value) and "weights_only" not in str(error.value)
    for path, message in [(not_raft, "is not a RAFT checkpoint"), (incomplete, "does not match")]:
        with pytest.raises(ValueError, match=message):
            load_raft(str(path))


def test_bad_frames_and_models_are_refused_clearly(raft_small):
    estimator = flowlib.DISEstimator("fast")
    with pytest.raises(ValueError, match="at least 2 frames"):
        flowlib.VideoFlow.estimate(torch.rand(1, 64, 64, 3), estimator)
    with pytest.raises(ValueError, match="same size"):
        flowlib.VideoFlow.estimate([torch.rand(64, 64, 3), torch.rand(64, 48, 3)], estimator)
    with pytest.raises(ValueError, match=r"\[N,H,W,3\]"):
        flowlib.VideoFlow.estimate(torch.rand(2, 64, 64), estimator)
    with pytest.raises(ValueError, match="RAFT"):
        flowlib.RAFTEstimator(torch.nn.Conv2d(3, 2, 3))
    with pytest.raises(ValueError, match="preset"):
        flowlib.DISEstimator("slow")
    video_flow = flowlib.VideoFlow(torch.rand(3, 32, 32, 3), estimator)
    with pytest.raises(IndexError, match="out of range"):
        video_flow.pair(0, 3)


def test_flow_colours():
    flow = torch.zeros(1, 2, 4, 4)
    flow[0, 0, 0, 0] = 5.0  # right
    flow[0, 1, 0, 1] = -5.0  # up
    flow[0, 0, 0, 2] = 10.0  # right, beyond max_magnitude: the full colour, darkened
    colors = flowlib.flow_to_color(flow, max_magnitude=5.0)
    assert colors.shape == (1, 4, 4, 3) and colors.min() >= 0 and colors.max() <= 1
    assert torch.equal(colors[0, 3, 3], torch.ones(3))  # still = white
    right, up = colors[0, 0, 0], colors[0, 0, 1]
    assert right[0] == 1.0 and right[1] < 0.1  # Middlebury: right is red
    assert up[2] > 0.9 and up[0] < 0.5  # up is blue-ish
    assert torch.allclose(colors[0, 0, 2], right * 0.75)
