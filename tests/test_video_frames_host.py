"""Video Frames: a frame range (first, count, stride) of a real encoded clip, decoded alone, equals the same frames
of the whole clip's decode, and the output keeps the aspect ratio at multiples of 8."""
import cv2
import numpy as np
import pytest
import torch

FPS, FRAMES, WIDTH, HEIGHT = 10, 9, 40, 24


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("video_frames") / "ramp.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
    for index in range(FRAMES):
        writer.write(np.full((HEIGHT, WIDTH, 3), 20 + 25 * index, np.uint8))   # each frame its own grey
    writer.release()
    return path


def video(path):
    from comfy_api.latest import InputImpl
    return InputImpl.VideoFromFile(str(path))


def test_a_frame_range_is_those_frames_of_the_whole_decode(host, clip_file):
    whole = video(clip_file).get_components().images
    assert whole.shape[0] == FRAMES
    frames, fps = host.run_node("Rerender_VideoFrames", video=video(clip_file), first_frame=1, frame_count=3,
                                stride=3, longer_side=0)
    assert fps == pytest.approx(FPS / 3)
    assert torch.equal(frames, whole[[1, 4, 7]])
    frames, _ = host.run_node("Rerender_VideoFrames", video=video(clip_file), first_frame=5, frame_count=0,
                              stride=1, longer_side=0)
    assert torch.equal(frames, whole[5:])


def test_the_size_keeps_the_aspect_ratio_at_multiples_of_8(host, clip_file):
    (frames, _) = host.run_node("Rerender_VideoFrames", video=video(clip_file), first_frame=0, frame_count=2,
                                stride=1, longer_side=80)
    assert frames.shape == (2, 48, 80, 3)          # 40x24 -> 80x48: 5:3 kept, both multiples of 8
    scaled_size = host.pack_module("nodes.video_frames").scaled_size
    assert scaled_size(1920, 1080, 512) == (512, 288) and scaled_size(1000, 750, 512) == (512, 384)
    assert all(side % 8 == 0 for side in scaled_size(1850, 1000, 512))


def test_a_first_frame_past_the_end_is_named(host, clip_file):
    with pytest.raises(ValueError, match="`first_frame` 50 lies past the clip's end"):
        host.run_node("Rerender_VideoFrames", video=video(clip_file), first_frame=50, frame_count=2, stride=1,
                      longer_side=0)
