import numpy as np
import pytest

from rerender.keyframes import (KeyFrameSelection, adaptive_keyframes, adaptive_keyframes_from_differences,
                                check_index_list, frame_differences, parse_index_list, uniform_keyframes)


def test_uniform_is_first_frame_then_every_k():
    assert uniform_keyframes(21, 10).indices == (0, 10, 20)
    assert uniform_keyframes(25, 10, include_last=False).indices == (0, 10, 20)
    assert uniform_keyframes(25, 10, include_last=True).indices == (0, 10, 20, 24)
    assert uniform_keyframes(1, 10).indices == (0,)


def test_adaptive_puts_keys_at_motion_peaks_within_gap_bounds():
    n, s_min, s_max = 60, 3, 12
    diffs = np.full(n, 0.01)
    diffs[0] = 0
    for peak in (17, 18, 40):           # big cuts; 18 is within s_min of 17 and must be suppressed
        diffs[peak] = 5.0 + peak * 0.01
    keys = adaptive_keyframes_from_differences(diffs, s_min, s_max).indices
    assert keys[0] == 0 and keys[-1] == n - 1
    assert 40 in keys and 18 in keys and 17 not in keys
    gaps = np.diff(keys)
    assert gaps.max() <= s_max and gaps.min() >= s_min


def test_adaptive_equal_bounds_is_uniform_range():
    assert adaptive_keyframes_from_differences(np.zeros(23), 5, 5).indices == (0, 5, 10, 15, 20)


def test_adaptive_on_frames_detects_a_scene_change():
    rng = np.random.default_rng(0)
    static = rng.random((32, 48, 3)).astype(np.float32)
    other = rng.random((32, 48, 3)).astype(np.float32)
    frames = [static] * 15 + [other] * 15
    diffs = frame_differences(frames)
    assert np.argmax(diffs) == 15 and diffs[0] == 0
    assert 15 in adaptive_keyframes(frames, 2, 10).indices


def test_index_list_syntax():
    assert parse_index_list("0,10,25", 30).indices == (0, 10, 25)
    assert parse_index_list("0:80:10", 81).indices == (0, 10, 20, 30, 40, 50, 60, 70)
    assert parse_index_list("0:-1:10,-1", 81).indices[-2:] == (70, 80)
    assert parse_index_list(" 3 , 7 ", 10).indices == (3, 7)


@pytest.mark.parametrize("text, message", [
    ("0,10,40", "out of range"),
    ("0,20,10", "strictly increasing"),
    ("0,10,10", "strictly increasing"),
    ("0,x", "not an integer"),
    ("0:10:0", "positive"),
    ("", "no key frame"),
])
def test_index_list_errors_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_index_list(text, 30)


def test_out_of_range_messages_quote_the_index_as_typed():
    with pytest.raises(ValueError, match=r"index -5 is out of range for a clip of 3 frames") as error:
        parse_index_list("0,-5", 3)
    assert "-2" not in str(error.value)
    with pytest.raises(ValueError, match=r"'-9:3' starts at -9"):
        parse_index_list("-9:3", 3)


@pytest.mark.parametrize("text", ["0,x", "0:1:2:3", "0:10:0", " , "])
def test_index_list_syntax_is_checked_without_a_clip(text):
    with pytest.raises(ValueError, match="key frame list"):
        check_index_list(text)
    check_index_list("0:-1:10,-1")     # valid syntax, whatever the clip length


def test_bad_bounds_and_empty_clip():
    with pytest.raises(ValueError, match="s_min"):
        adaptive_keyframes_from_differences(np.zeros(10), 6, 3)
    with pytest.raises(ValueError, match="no frames"):
        KeyFrameSelection((0,), 0)
    assert KeyFrameSelection((0, 5, 9), 10).intervals() == [(0, 5), (5, 9)]
