"""Sampling policies: exact indices computed by hand, MVBench parity, short videos, windows and argument checks.

Every expected list below is worked out in the comment next to it (segment centres, MVBench's formula), never
by calling the code under test; windows use frame rates such as 4 fps so that seconds -> frames is exact.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

from vlm.video import POLICIES, register_policy, sample_indices
from vlm.video.sampling import SamplingRequest, _frame_window, uniform

LOGGER = "vlm.video.sampling"


def mvbench_get_index(bound, fps, max_frame, num_segments, first_idx=0):
    """MVBench's `get_index` (video and frame-folder datasets), transcribed as the reference."""
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return np.array([int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)])


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# -- uniform ----------------------------------------------------------------------------------------------
def test_uniform_hand_computed():
    # 10 frames, 5 segments of 2 frames: centres at 1, 3, 5, 7, 9.
    assert sample_indices(10, 1.0, 5).tolist() == [1, 3, 5, 7, 9]
    # 100 frames, 4 segments of 25: centres 12.5, 37.5, 62.5, 87.5.
    assert sample_indices(100, 25.0, 4, "uniform").tolist() == [12, 37, 62, 87]
    # Window [2 s, 4 s) at 10 fps = frames [20, 40): segments of 5, centres 22.5 ... 37.5.
    assert sample_indices(100, 10.0, 4, "uniform", start=2.0, end=4.0).tolist() == [22, 27, 32, 37]
    # One sample: the centre of the video, 3.5.
    assert sample_indices(7, 30.0, 1).tolist() == [3]


def test_uniform_dtype_and_order():
    idx = sample_indices(1000, 29.97, 16)
    assert idx.dtype == np.int64 and idx.shape == (16,)
    # 16 segments of 62.5 frames: centres 31.25 + 62.5 k.
    assert idx.tolist() == [int(31.25 + 62.5 * k) for k in range(16)]
    assert idx.tolist()[:4] == [31, 93, 156, 218] and idx.tolist()[-1] == 968


def test_uniform_short_video_repeats_to_keep_shape():
    # 3 frames, 8 segments of 0.375: centres 0.1875, 0.5625, 0.9375, 1.3125, 1.6875, 2.0625, 2.4375, 2.8125.
    assert sample_indices(3, 25.0, 8).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert sample_indices(1, 25.0, 4).tolist() == [0, 0, 0, 0]


def test_uniform_fractional_window_keeps_partial_edge_frames():
    # 4 fps: [2.625 s, 3.625 s) = frames [10.5, 14.5); 5 segments of 0.8: centres 10.9, 11.7, 12.5, 13.3, 14.1.
    # Frame 10 (half inside) and frame 14 (half inside) are both reachable.
    assert sample_indices(40, 4.0, 5, "uniform", 2.625, 3.625).tolist() == [10, 11, 12, 13, 14]
    # [10.5, 12.5) in 4 segments of 0.5: centres 10.75, 11.25, 11.75, 12.25 (a short window repeats frames).
    assert sample_indices(40, 4.0, 4, "uniform", 2.625, 3.125).tolist() == [10, 11, 11, 12]
    # A window ending at the video's end: 4 fps, [24.125 s, 25 s) = [96.5, 100): 2 segments of 1.75,
    # centres 97.375, 99.125.
    assert sample_indices(100, 4.0, 2, "uniform", 24.125, 25.0).tolist() == [97, 99]


def test_uniform_open_ended_windows():
    # start only: [2 s, end) at 10 fps = frames [20, 50): 3 segments of 10, centres 25, 35, 45.
    assert sample_indices(50, 10.0, 3, start=2.0).tolist() == [25, 35, 45]
    # end only: [0, 2 s) = frames [0, 20): 4 segments of 5, centres 2.5, 7.5, 12.5, 17.5.
    assert sample_indices(50, 10.0, 4, end=2.0).tolist() == [2, 7, 12, 17]


def test_uniform_window_clamped_to_video(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    # A window reaching past both ends is the whole video: 5 segments of 10, centres 5, 15, ..., 45.
    assert sample_indices(50, 10.0, 5, start=-3.0, end=99.0).tolist() == [5, 15, 25, 35, 45]
    assert sample_indices(50, 10.0, 5, start=-3.0).tolist() == [5, 15, 25, 35, 45]
    assert sample_indices(50, 10.0, 5, end=99.0).tolist() == [5, 15, 25, 35, 45]
    assert sum("clamped" in r.getMessage() for r in caplog.records) == 3
    assert _warnings(caplog) == []  # clamping is not a collapse
    caplog.clear()
    sample_indices(50, 10.0, 5, start=1.0, end=2.0)  # inside the video: nothing to report
    assert not any("clamped" in r.getMessage() for r in caplog.records)


def test_uniform_window_outside_collapses_onto_the_nearest_frame(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    # Wholly past the end: the last frame, N times, with a warning.
    assert sample_indices(50, 10.0, 4, start=20.0, end=30.0).tolist() == [49] * 4
    assert len(_warnings(caplog)) == 1 and "outside the video" in _warnings(caplog)[0]
    # Starting exactly at the end (frame 50 of 50) is past the end too.
    assert sample_indices(50, 10.0, 2, start=5.0, end=6.0).tolist() == [49, 49]
    # Wholly before the start: the first frame.
    assert sample_indices(50, 10.0, 3, start=-5.0, end=-1.0).tolist() == [0] * 3
    assert len(_warnings(caplog)) == 3


def test_window_messages_name_the_window(caplog):
    """The clamp (debug) and collapse (warning) lines quote the window the caller gave, the video and the frame."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    sample_indices(50, 10.0, 5, start=-3.0, end=99.0)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG] == [
        "window [-3.0, 99.0) s clamped to the video's 50 frames at 10.000 fps"]
    caplog.clear()
    sample_indices(50, 10.0, 4, start=20.0, end=30.0)  # 50 frames at 10 fps = 5 s; the last frame is 49
    assert _warnings(caplog) == ["window [20.0, 30.0) s lies outside the video (5.000 s); using frame 49"]
    caplog.clear()
    sample_indices(50, 10.0, 4, start=-5.0, end=-1.0)
    assert _warnings(caplog) == ["window [-5.0, -1.0) s lies outside the video (5.000 s); using frame 0"]


def test_window_one_float_step_wide_inside_the_video_is_its_frame(caplog):
    """start < end, but start * fps == end * fps in floats: the point's frame, not a collapse onto frame 0."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    # 0.6999999999999998 s and 0.7 s at 3 fps both give position 2.0999999999999996: frame 2.
    assert sample_indices(10, 3.0, 2, "uniform", 0.6999999999999998, 0.7).tolist() == [2, 2]
    # 22.439999999999998 s and 22.44 s at 25 fps both give exactly 561.0: frame 561.
    assert sample_indices(1000, 25.0, 3, "uniform", 22.439999999999998, 22.44).tolist() == [561] * 3
    assert sample_indices(1000, 25.0, 3, "fps", 22.439999999999998, 22.44, target_fps=1.0).tolist() == [561]
    # At the video's start: 0 s and the smallest normal float (vlm flushes denormals, so no smaller end exists) at
    # 0.5 fps are both position 0.0: frame 0.
    assert sample_indices(10, 0.5, 2, "uniform", 0.0, sys.float_info.min).tolist() == [0, 0]
    assert _warnings(caplog) == []
    # ... while a window starting at the video's end (position 10.0 of 10 frames) is outside it: a warning.
    assert sample_indices(10, 0.5, 2, "uniform", 20.0, float(np.nextafter(20.0, 21.0))).tolist() == [9, 9]
    assert len(_warnings(caplog)) == 1

def test_collapsed_window_is_one_whole_frame():
    # The helper's contract is a window [lo, hi) with lo < hi: a collapse is the one frame [edge, edge + 1).
    def req(start, end):
        return SamplingRequest(50, 10.0, 4, start, end, 0, None, None)

    assert _frame_window(req(20.0, 30.0)) == (49.0, 50.0)
    assert _frame_window(req(-5.0, -1.0)) == (0.0, 1.0)
    assert _frame_window(req(-3.0, 99.0)) == (0.0, 50.0)  # clamped, not collapsed


def test_uniform_centre_rounding_onto_the_window_end_stays_inside():
    # [9.999999999999998, 10) at 1 fps holds only (a sliver of) frame 9. Its centre, lo + half an ulp, rounds
    # to exactly 10.0 in floats; frame 10 is outside the window, so every sample must still be frame 9.
    lo = float(np.nextafter(10.0, 0.0))
    assert sample_indices(20, 1.0, 1, "uniform", lo, 10.0).tolist() == [9]
    assert sample_indices(20, 1.0, 3, "uniform", lo, 10.0).tolist() == [9, 9, 9]
    # The same window through `fps`'s spreading path (target rate far above the video's: 1 frame to spread).
    assert sample_indices(20, 1.0, 4, "fps", lo, 10.0, target_fps=1e20).tolist() == [9]
    # A window ending at the video's end: frame 20 does not exist, the last frame is 19.
    lo = float(np.nextafter(20.0, 0.0))
    assert sample_indices(20, 1.0, 2, "uniform", lo, 20.0).tolist() == [19, 19]


# -- segment_middle (MVBench) -------------------------------------------------------------------------
def test_segment_middle_hand_computed():
    # 10 frames, no bound: start 0, end 9, seg 1.8 -> int(0.9 + round(1.8 i)) = 0, 2, 4, 5, 7.
    assert sample_indices(10, 1.0, 5, "segment_middle").tolist() == [0, 2, 4, 5, 7]
    # MVBench frame folder (first_idx=1, max_frame=10): seg 2.25 -> files 2, 4, 6, 9 -> positions 1, 3, 5, 8.
    assert sample_indices(10, 3.0, 4, "segment_middle", first_index=1).tolist() == [1, 3, 5, 8]


def test_segment_middle_window_rounding():
    # [1.27 s, 3.46 s) at 10 fps: start round(12.7) = 13, end round(34.6) = 35, seg 22 / 4 = 5.5.
    # int(13 + 2.75 + round(5.5 i)), round half to even: round(5.5) = 6, round(16.5) = 16 -> 15, 21, 26, 31.
    assert sample_indices(100, 10.0, 4, "segment_middle", 1.27, 3.46).tolist() == [15, 21, 26, 31]
    # start only: [2 s, end): start 20, end min(1e6, 99) = 99, seg 79 / 4 = 19.75:
    # int(20 + 9.875 + round(19.75 i)) with round(39.5) = 40, round(59.25) = 59 -> 29, 49, 69, 88.
    assert sample_indices(100, 10.0, 4, "segment_middle", start=2.0).tolist() == [29, 49, 69, 88]
    # end only: [0, 2 s): start max(0, -1e6) = 0, end 20, seg 5: int(2.5 + 5 i) -> 2, 7, 12, 17.
    assert sample_indices(100, 10.0, 4, "segment_middle", end=2.0).tolist() == [2, 7, 12, 17]
    # A window rounding to one frame (20.0 .. 20.4 -> 20 .. 20) is that frame, not a collapse.
    assert sample_indices(40, 10.0, 3, "segment_middle", 2.0, 2.04).tolist() == [20, 20, 20]


def test_segment_middle_no_bound_is_mvbench_100000_seconds():
    """MVBench's "no bound" is the window [-100000 s, 100000 s): a longer video is cut there, as in MVBench."""
    # 10^7 frames at 1 fps: end_idx = min(100000, 9999999) = 100000, seg 25000 -> 12500 + 25000 k.
    assert sample_indices(10**7, 1.0, 4, "segment_middle").tolist() == [12500, 37500, 62500, 87500]


def test_segment_middle_matches_mvbench_on_random_cases():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(3000):
        n = int(rng.integers(1, 2000))
        fps = float(rng.choice([3.0, 10.0, 24.0, 25.0, 29.97, 30.0, 60.0, rng.uniform(1, 60)]))
        segments = int(rng.integers(1, 33))
        first = int(rng.integers(0, 2))
        if rng.random() < 0.3:
            bound = None
        else:
            duration = n / fps
            start = float(rng.uniform(-2.0, duration * 1.1))
            end = start + float(rng.uniform(0.01, duration * 1.2))
            bound = (start, end)
        ref = mvbench_get_index(bound, fps, n - 1 + first, segments, first_idx=first)
        lo, hi = bound if bound else (-100000, 100000)
        if max(first, round(lo * fps)) > min(round(hi * fps), n - 1 + first):
            continue  # a window outside the video: MVBench's output is meaningless there (we clamp instead)
        start, end = bound if bound else (None, None)
        ours = sample_indices(n, fps, segments, "segment_middle", start, end, first_index=first)
        assert np.array_equal(ours, ref - first), (n, fps, segments, bound, first)
        checked += 1
    assert checked > 2000


def test_segment_middle_no_bound_equals_mvbench_huge_bound():
    a = sample_indices(321, 30.0, 16, "segment_middle")
    b = sample_indices(321, 30.0, 16, "segment_middle", start=-100000, end=100000)
    assert np.array_equal(a, b)
    assert np.array_equal(a, mvbench_get_index(None, 30.0, 320, 16))


def test_segment_middle_short_and_outside(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    # 2 frames, 5 segments: end 1, seg 0.2: int(0.1 + round(0.2 i)) = 0, 0, 0, 1, 1.
    assert sample_indices(2, 25.0, 5, "segment_middle").tolist() == [0, 0, 0, 1, 1]
    assert _warnings(caplog) == []
    # Window past the end: clamped onto the last frame rather than indexing outside the video.
    assert sample_indices(40, 10.0, 3, "segment_middle", start=10.0, end=12.0).tolist() == [39] * 3
    assert sample_indices(40, 3.0, 3, "segment_middle", start=30.0, end=40.0, first_index=1).tolist() == [39] * 3
    # ... and a window before the start onto the first frame (end_idx -10 < first).
    assert sample_indices(40, 10.0, 3, "segment_middle", start=-5.0, end=-1.0).tolist() == [0] * 3
    assert sample_indices(40, 10.0, 3, "segment_middle", start=-5.0, end=-1.0, first_index=1).tolist() == [0] * 3
    assert len(_warnings(caplog)) == 4 and all("outside the video" in w for w in _warnings(caplog))


# -- fps ----------------------------------------------------------------------------------------------------
def test_fps_hand_computed():
    # 10 s at 25 fps, 1 frame/s: steps at 0.5 s, 1.5 s, ... -> frames 12.5 + 25 k.
    idx = sample_indices(250, 25.0, 100, "fps", target_fps=1.0)
    assert idx.dtype == np.int64
    assert idx.tolist() == [12, 37, 62, 87, 112, 137, 162, 187, 212, 237]
    # 2 frames/s over [1 s, 3 s) = frames [25, 75): 4 steps of 12.5 frames at 31.25, 43.75, 56.25, 68.75.
    assert sample_indices(250, 25.0, 100, "fps", 1.0, 3.0, target_fps=2.0).tolist() == [31, 43, 56, 68]


def test_fps_whole_steps_survive_float_error():
    # 35 frames at 3 fps = 11.67 s; at 0.6 frames/s that is exactly 7 steps (35 / 3 * 0.6 = 6.999... in floats).
    # Step 5 frames: 2.5, 7.5, ..., 32.5.
    assert sample_indices(35, 3.0, 16, "fps", target_fps=0.6).tolist() == [2, 7, 12, 17, 22, 27, 32]


def test_fps_cap_spreads_evenly():
    # 60 s at 1 fps would be 60 frames; capped at 8 they spread like `uniform`: segments of 187.5,
    # centres 93.75 + 187.5 k.
    capped = sample_indices(1500, 25.0, 16, "fps", target_fps=1.0, max_frames=8)
    assert capped.tolist() == [93, 281, 468, 656, 843, 1031, 1218, 1406]
    # Without max_frames the cap is num_samples: 5 segments of 300, centres 150 + 300 k.
    assert sample_indices(1500, 25.0, 5, "fps", target_fps=1.0).tolist() == [150, 450, 750, 1050, 1350]
    # max_frames overrides num_samples as the cap (10 steps fit under 10, whatever num_samples says).
    assert sample_indices(250, 25.0, 2, "fps", target_fps=1.0, max_frames=10).tolist() == [
        12, 37, 62, 87, 112, 137, 162, 187, 212, 237]
    # A cap just under the step count spreads instead: 8 segments of 31.25, centres 15.625 + 31.25 k.
    assert sample_indices(250, 25.0, 16, "fps", target_fps=1.0, max_frames=8).tolist() == [
        15, 46, 78, 109, 140, 171, 203, 234]
    # A cap of one: the window's centre, 125.
    assert sample_indices(250, 25.0, 16, "fps", target_fps=1.0, max_frames=1).tolist() == [125]


def test_fps_short_video_returns_fewer_never_repeats():
    # 1.2 s of video at 1 frame/s: one step fits, at 0.5 s = frame 12.5.
    assert sample_indices(30, 25.0, 16, "fps", target_fps=1.0).tolist() == [12]
    # Target rate above the video's: every frame once, no repeats (5 segments of 1, centres 0.5 .. 4.5).
    assert sample_indices(5, 5.0, 16, "fps", target_fps=30.0).tolist() == [0, 1, 2, 3, 4]
    # A window shorter than one step still gives one frame: the window's centre, not a step past it.
    # [2 s, 2.2 s) = frames [50, 55): centre 52.5.
    assert sample_indices(250, 25.0, 16, "fps", 2.0, 2.2, target_fps=1.0).tolist() == [52]


def test_fps_fractional_window_counts_partial_frames():
    # 4 fps, [2.625 s, 3.625 s) = frames [10.5, 14.5): frames 10..14 are in it (5 frames), 30 steps at 30 fps
    # -> 5 frames spread: segments of 0.8, centres 10.9, 11.7, 12.5, 13.3, 14.1.
    assert sample_indices(40, 4.0, 16, "fps", 2.625, 3.625, target_fps=30.0).tolist() == [10, 11, 12, 13, 14]
    # [10.5, 12.5) at 7.6 frames/s: floor(0.5 s * 7.6) = 3 steps of 4 / 7.6 = 0.526 frames, which fit in the
    # window's 3 frames (10, 11, 12): positions 10.76, 11.29, 11.82 -> 10, 11, 11 -> one frame once.
    assert sample_indices(40, 4.0, 16, "fps", 2.625, 3.125, target_fps=7.6).tolist() == [10, 11]
    # [10.75, 12.25): frames 10, 11, 12 reach into it, so 3 of the 11 steps are spread: segments of 0.5,
    # centres 11.0, 11.5, 12.0 -> 11, 12 (frame 10, only a quarter inside, is not picked).
    assert sample_indices(40, 4.0, 16, "fps", 2.6875, 3.0625, target_fps=30.0).tolist() == [11, 12]


def test_fps_window_outside_collapses(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert sample_indices(50, 10.0, 4, "fps", 20.0, 30.0, target_fps=1.0).tolist() == [49]
    assert sample_indices(50, 10.0, 4, "fps", -3.0, -1.0, target_fps=1.0).tolist() == [0]
    assert len(_warnings(caplog)) == 2


def test_fps_random_cases_are_valid():
    rng = np.random.default_rng(1)
    for _ in range(500):
        n, fps = int(rng.integers(1, 3000)), float(rng.uniform(1, 60))
        target, cap = float(rng.uniform(0.1, 70)), int(rng.integers(1, 64))
        idx = sample_indices(n, fps, 16, "fps", target_fps=target, max_frames=cap)
        assert 1 <= idx.size <= cap and np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < n


# -- arguments and registry ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((10, 25.0, 0), {}, "num_samples must be"),
        ((10, 25.0, 2.5), {}, "num_samples must be"),
        ((10, 25.0, 4, "uniform", 3.0, 3.0), {}, r"start \(3.0\) must be < end"),
        ((10, 25.0, 4, "uniform", 5.0, 2.0), {}, r"start \(5.0\) must be < end"),
        ((0, 25.0, 4), {}, "num_frames_total must be"),
        ((2.5, 25.0, 4), {}, "num_frames_total must be"),
        ((10, 0.0, 4), {}, "fps must be"),
        ((10, -1.0, 4), {}, "fps must be"),
        ((10, float("nan"), 4), {}, "fps must be"),
        ((10, float("inf"), 4), {}, "fps must be"),
        ((10, "fast", 4), {}, "fps must be"),
        ((10, None, 4), {}, "fps must be"),
        ((10, 25.0, 4, "bogus"), {}, "unknown sampling policy"),
        ((10, 25.0, 4, "fps"), {}, "target_fps"),
        ((10, 25.0, 4, "fps"), {"target_fps": 0.0}, "target_fps"),
        ((10, 25.0, 4, "fps"), {"target_fps": -2.0}, "target_fps"),
        ((10, 25.0, 4, "fps"), {"target_fps": float("nan")}, "target_fps"),
        ((10, 25.0, 4, "fps"), {"target_fps": float("inf")}, "target_fps"),
        ((10, 25.0, 4, "fps"), {"target_fps": 1.0, "max_frames": 0}, "max_frames"),
        ((10, 25.0, 4, "fps"), {"target_fps": 1.0, "max_frames": 2.5}, "max_frames"),
        ((10, 25.0, 4, "segment_middle"), {"first_index": 2}, "first_index"),
        ((10, 25.0, 4, "segment_middle"), {"first_index": -1}, "first_index"),
        ((10, 25.0, 4, "uniform", float("inf")), {}, "start must be a finite"),
        ((10, 25.0, 4, "uniform", None, float("nan")), {}, "end must be a finite"),
    ],
)
def test_invalid_arguments_raise_clear_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_indices(*args, **kwargs)


def test_boundary_arguments_are_accepted():
    assert sample_indices(1, 25.0, 1).tolist() == [0]  # one frame, one sample
    assert sample_indices(10, 1.0, 2, "fps", target_fps=1.0, max_frames=1).tolist() == [5]  # a cap of one
    # Integral floats are integers (a frame count read from metadata).
    assert sample_indices(10.0, 1.0, 5.0).tolist() == [1, 3, 5, 7, 9]


@pytest.fixture
def scratch_policy():
    """Register throwaway policies; removed again after the test."""
    names = []

    def add(name, fn):
        register_policy(name)(fn)
        names.append(name)

    yield add
    for name in names:
        POLICIES.unregister(name)


def test_registry_adds_a_policy_in_one_function(scratch_policy):
    scratch_policy("test_first_n", lambda req: np.arange(min(req.num_samples, req.num_frames_total)))
    idx = sample_indices(10, 1.0, 3, "test_first_n")
    assert idx.tolist() == [0, 1, 2] and idx.dtype == np.int64
    with pytest.raises(ValueError, match="already registered"):
        register_policy("uniform")(uniform)
    assert "test_first_n" in POLICIES.names() and "test_first_n" in POLICIES


def test_registry_rejects_what_is_not_a_policy():
    with pytest.raises(TypeError, match="must be a function"):
        register_policy("not_callable")(np.arange(3))
    with pytest.raises(TypeError, match="must be a function"):
        register_policy("a_class")(SamplingRequest)
    assert "not_callable" not in POLICIES and "a_class" not in POLICIES



def test_builtin_policies_return_int64_themselves():
    """Policies are public (POLICIES): the module promises np.int64 positions from each, not only from
    `sample_indices`."""
    # uniform: 10 frames, 5 segments of 2, centres 1, 3, 5, 7, 9.
    out = POLICIES.get("uniform")(SamplingRequest(10, 1.0, 5, None, None, 0, None, None))
    assert out.dtype == np.int64 and out.tolist() == [1, 3, 5, 7, 9]
    # fps capped at 8 of 10 steps -> spread: 8 segments of 31.25, centres 15.625 + 31.25 k.
    out = POLICIES.get("fps")(SamplingRequest(250, 25.0, 16, None, None, 0, 1.0, 8))
    assert out.dtype == np.int64 and out.tolist() == [15, 46, 78, 109, 140, 171, 203, 234]
    # fps on its step grid: 10 steps of 25 frames at 12.5 + 25 k.
    out = POLICIES.get("fps")(SamplingRequest(250, 25.0, 16, None, None, 0, 1.0, None))
    assert out.dtype == np.int64 and out.tolist()[:3] == [12, 37, 62]
    # segment_middle: 10 frames, seg 1.8 -> 0, 2, 4, 5, 7.
    out = POLICIES.get("segment_middle")(SamplingRequest(10, 1.0, 5, None, None, 0, None, None))
    assert out.dtype == np.int64 and out.tolist() == [0, 2, 4, 5, 7]


@pytest.mark.parametrize("raw", [[0.0, 3.0], np.array([0, 3], dtype=np.int32), np.array([0, 3], dtype=np.uint8)])
def test_sample_indices_casts_a_policys_output_to_int64(scratch_policy, raw):
    scratch_policy("test_raw", lambda req: raw)
    idx = sample_indices(10, 1.0, 2, "test_raw")
    assert idx.dtype == np.int64 and idx.tolist() == [0, 3]

@pytest.mark.parametrize("bad", [[10], [-1], []])
def test_a_policy_leaving_the_video_is_caught(scratch_policy, bad):
    scratch_policy("test_bad", lambda req: list(bad))
    with pytest.raises(AssertionError, match="left the video" if bad else "returned no indices"):
        sample_indices(10, 1.0, 1, "test_bad")
    scratch_policy("test_edge", lambda req: [0, 9])  # the first and the last frame are inside
    assert sample_indices(10, 1.0, 1, "test_edge").tolist() == [0, 9]
