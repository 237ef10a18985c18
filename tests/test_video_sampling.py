"""Sampling policies: hand-computed cases, MVBench parity, short videos, windows and argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from vlm.video import POLICIES, register_policy, sample_indices
from vlm.video.sampling import uniform


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


# -- uniform ----------------------------------------------------------------------------------------------
def test_uniform_hand_computed():
    # 10 frames, 5 segments of 2 frames: centres at 1, 3, 5, 7, 9.
    assert sample_indices(10, 1.0, 5).tolist() == [1, 3, 5, 7, 9]
    # 100 frames, 4 segments of 25: centres 12.5, 37.5, 62.5, 87.5.
    assert sample_indices(100, 25.0, 4, "uniform").tolist() == [12, 37, 62, 87]
    # Window [2 s, 4 s) at 10 fps = frames [20, 40): segments of 5, centres 22.5 ... 37.5.
    assert sample_indices(100, 10.0, 4, "uniform", start=2.0, end=4.0).tolist() == [22, 27, 32, 37]
    assert sample_indices(7, 30.0, 1).tolist() == [3]


def test_uniform_dtype_and_order():
    idx = sample_indices(1000, 29.97, 16)
    assert idx.dtype == np.int64 and idx.shape == (16,)
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 1000


def test_uniform_short_video_repeats_to_keep_shape():
    idx = sample_indices(3, 25.0, 8)
    assert idx.shape == (8,) and set(idx.tolist()) == {0, 1, 2}
    assert np.all(np.diff(idx) >= 0)
    assert sample_indices(1, 25.0, 4).tolist() == [0, 0, 0, 0]


def test_uniform_window_clamped_to_video():
    # A window reaching past both ends is the whole video.
    assert np.array_equal(sample_indices(50, 10.0, 5, start=-3.0, end=99.0), sample_indices(50, 10.0, 5))
    # A window wholly past the end collapses onto the last frame (documented), keeping N samples.
    assert sample_indices(50, 10.0, 4, start=20.0, end=30.0).tolist() == [49] * 4
    # ... and one wholly before the start onto the first frame.
    assert sample_indices(50, 10.0, 3, start=-5.0, end=-1.0).tolist() == [0] * 3


def test_uniform_partial_window_stays_inside():
    idx = sample_indices(100, 10.0, 6, start=9.55, end=9.95)  # frames 95.5 .. 99.5
    assert idx.min() >= 95 and idx.max() <= 99 and idx.shape == (6,)


# -- segment_middle (MVBench) -------------------------------------------------------------------------
def test_segment_middle_hand_computed():
    # 10 frames, no bound: start 0, end 9, seg 1.8 -> int(0.9 + round(1.8 i)) = 0, 2, 4, 5, 7.
    assert sample_indices(10, 1.0, 5, "segment_middle").tolist() == [0, 2, 4, 5, 7]
    # MVBench frame folder (first_idx=1, max_frame=10): seg 2.25 -> files 2, 4, 6, 9 -> positions 1, 3, 5, 8.
    assert sample_indices(10, 3.0, 4, "segment_middle", first_index=1).tolist() == [1, 3, 5, 8]


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


def test_segment_middle_short_and_outside():
    assert sample_indices(2, 25.0, 5, "segment_middle").shape == (5,)
    assert sample_indices(2, 25.0, 5, "segment_middle").max() <= 1
    # Window past the end: clamped onto the last frame rather than indexing outside the video.
    assert sample_indices(40, 10.0, 3, "segment_middle", start=10.0, end=12.0).tolist() == [39] * 3
    assert sample_indices(40, 3.0, 3, "segment_middle", start=30.0, end=40.0, first_index=1).tolist() == [39] * 3


# -- fps ----------------------------------------------------------------------------------------------------
def test_fps_hand_computed():
    # 10 s at 25 fps, 1 frame/s: steps at 0.5 s, 1.5 s, ... -> frames 12, 37, ..., 237.
    idx = sample_indices(250, 25.0, 100, "fps", target_fps=1.0)
    assert idx.tolist() == [12 + 25 * k for k in range(10)]
    # 2 frames/s over [1 s, 3 s): 4 steps of 0.5 s starting at 1.25 s.
    assert sample_indices(250, 25.0, 100, "fps", 1.0, 3.0, target_fps=2.0).tolist() == [31, 43, 56, 68]


def test_fps_cap_spreads_evenly():
    # 60 s at 1 fps would be 60 frames; capped at 8 they spread like `uniform`.
    capped = sample_indices(1500, 25.0, 16, "fps", target_fps=1.0, max_frames=8)
    assert np.array_equal(capped, sample_indices(1500, 25.0, 8, "uniform"))
    # Without max_frames the cap is num_samples.
    assert sample_indices(1500, 25.0, 5, "fps", target_fps=1.0).shape == (5,)


def test_fps_short_video_returns_fewer_never_repeats():
    # 1.2 s of video at 1 frame/s: one step fits, at 0.5 s.
    assert sample_indices(30, 25.0, 16, "fps", target_fps=1.0).tolist() == [12]
    # Target rate above the video's: every frame once, no repeats.
    idx = sample_indices(5, 5.0, 16, "fps", target_fps=30.0)
    assert idx.tolist() == [0, 1, 2, 3, 4]
    # A window shorter than one step still gives one frame.
    assert sample_indices(250, 25.0, 16, "fps", 2.0, 2.2, target_fps=1.0).shape == (1,)


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
        ((10, 25.0, 0), {}, "num_samples"),
        ((10, 25.0, 4, "uniform", 3.0, 3.0), {}, "start"),
        ((10, 25.0, 4, "uniform", 5.0, 2.0), {}, "start"),
        ((0, 25.0, 4), {}, "num_frames_total"),
        ((10, 0.0, 4), {}, "fps"),
        ((10, float("nan"), 4), {}, "fps"),
        ((10, 25.0, 4, "bogus"), {}, "unknown sampling policy"),
        ((10, 25.0, 4, "fps"), {}, "target_fps"),
        ((10, 25.0, 4, "fps"), {"target_fps": 1.0, "max_frames": 0}, "max_frames"),
        ((10, 25.0, 4, "segment_middle"), {"first_index": 2}, "first_index"),
        ((10, 25.0, 4, "uniform", float("inf")), {}, "start"),
    ],
)
def test_invalid_arguments_raise_clear_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_indices(*args, **kwargs)


def test_registry_adds_a_policy_in_one_function():
    name = "test_first_n"
    if name not in POLICIES:

        @register_policy(name)
        def first_n(req):
            return np.arange(min(req.num_samples, req.num_frames_total))

    assert sample_indices(10, 1.0, 3, name).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="already registered"):
        register_policy("uniform")(uniform)
