"""Frame sampling policies: pure functions from (frame count, fps, policy, window) to frame indices.

A policy maps a clip of `num_frames_total` frames at `fps` frames/s and a time window `[start, end)` in
seconds to 0-based frame positions (np.int64, ascending, possibly repeated).

Windows: `start=None` means the beginning of the video, `end=None` its end. A window that reaches outside
the video is clamped to it; a window lying wholly past the end collapses onto the last frame (and logs a
warning). `start >= end` is a ValueError.

Short videos / short windows: `uniform` and `segment_middle` always return exactly `num_samples`
indices, repeating frames when the window holds fewer than `num_samples` frames, so that batch shapes
stay fixed. `fps` returns as many frames as the window holds at the target rate, capped, and never fewer
than one; it never repeats a frame.

A new policy is one function registered with `@register_policy("name")`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from vlm.registry import Registry

logger = logging.getLogger(__name__)

# MVBench's "no bound" window, in seconds.
_MVBENCH_NO_BOUND = 100000.0


@dataclass(frozen=True)
class SamplingRequest:
    """The validated arguments every policy receives (seconds already resolved, not yet clamped)."""

    num_frames_total: int
    fps: float
    num_samples: int
    start: float | None
    end: float | None
    first_index: int
    target_fps: float | None
    max_frames: int | None

    @property
    def duration(self) -> float:
        return self.num_frames_total / self.fps


class SamplingPolicy(Protocol):
    """A policy: the validated request in, frame positions (int64 [K], ascending, in range) out."""

    def __call__(self, req: SamplingRequest) -> np.ndarray: ...


POLICIES: Registry[SamplingPolicy] = Registry("sampling policy")
register_policy = POLICIES.register


def sample_indices(
    num_frames_total: int,
    fps: float,
    num_samples: int,
    policy: str = "uniform",
    start: float | None = None,
    end: float | None = None,
    *,
    first_index: int = 0,
    target_fps: float | None = None,
    max_frames: int | None = None,
) -> np.ndarray:
    """Frame positions (0-based, int64 [K], ascending) that `policy` picks from a video.

    Args:
        num_frames_total: frames in the video (>= 1).
        fps: frames per second of the video (> 0); converts `start`/`end` seconds to frames.
        num_samples: how many frames `uniform` / `segment_middle` return (>= 1). For `fps` it is the cap
            on the number of frames when `max_frames` is None.
        policy: a key of `POLICIES`: "uniform", "segment_middle" or "fps".
        start, end: the window in seconds (None: the video's start / end). Clamped to the video.
        first_index: only for `segment_middle`: the number of the first frame in MVBench's formula
            (0 for videos; 1 for MVBench's 1-based frame folders, which also makes MVBench's
            `max_frame` = num_frames_total). Results are always 0-based positions.
        target_fps: for `fps`: frames per second to sample (> 0).
        max_frames: for `fps`: the most frames to return (>= 1); overrides `num_samples` as the cap.

    Returns `num_samples` indices for `uniform` / `segment_middle` (repeats when the window is short),
    between 1 and the cap for `fps` (no repeats).
    """
    req = SamplingRequest(num_frames_total, fps, num_samples, start, end, first_index, target_fps, max_frames)
    req = _validate(req, policy)
    indices = np.asarray(POLICIES.get(policy)(req), dtype=np.int64)  # [K]
    assert indices.ndim == 1 and indices.size >= 1, f"policy {policy!r} returned no indices"
    assert indices.min() >= 0 and indices.max() < num_frames_total, f"policy {policy!r} left the video"
    return indices


def _validate(req: SamplingRequest, policy: str) -> SamplingRequest:
    """`req` with its counts made int and its rate float; ValueError naming the argument that is wrong."""
    num_frames_total, fps, num_samples, start, end = req.num_frames_total, req.fps, req.num_samples, req.start, req.end
    first_index, target_fps, max_frames = req.first_index, req.target_fps, req.max_frames
    if policy not in POLICIES:
        raise ValueError(f"unknown sampling policy {policy!r}; known: {POLICIES.names()}")
    if int(num_frames_total) != num_frames_total or num_frames_total < 1:
        raise ValueError(f"num_frames_total must be a positive integer, got {num_frames_total!r}")
    try:
        fps = float(fps)
    except (TypeError, ValueError):
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}") from None
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    for name, value in (("start", start), ("end", end)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number of seconds or None, got {value!r}")
    if start is not None and end is not None and start >= end:
        raise ValueError(f"start ({start}) must be < end ({end})")
    if first_index not in (0, 1):
        raise ValueError(f"first_index must be 0 (videos) or 1 (1-based frame folders), got {first_index!r}")
    if policy == "fps":
        if target_fps is None or not math.isfinite(target_fps) or target_fps <= 0:
            raise ValueError(f"policy 'fps' needs target_fps > 0, got {target_fps!r}")
    if max_frames is not None and (int(max_frames) != max_frames or max_frames < 1):
        raise ValueError(f"max_frames must be an integer >= 1 or None, got {max_frames!r}")
    return replace(req, num_frames_total=int(num_frames_total), fps=fps, num_samples=int(num_samples),
                   max_frames=None if max_frames is None else int(max_frames))


def _frame_window(req: SamplingRequest) -> tuple[float, float]:
    """The window as fractional frame positions [lo, hi) clamped to [0, num_frames_total]."""
    n = req.num_frames_total
    lo = 0.0 if req.start is None else req.start * req.fps
    hi = float(n) if req.end is None else req.end * req.fps
    lo_c, hi_c = min(max(lo, 0.0), float(n)), min(max(hi, 0.0), float(n))
    if (lo_c, hi_c) != (lo, hi):
        logger.debug("window [%s, %s) s clamped to the video's %d frames at %.3f fps", req.start, req.end, n, req.fps)
    if hi_c <= lo_c:
        if 0.0 <= lo < n:
            # start < end, yet both seconds land on one frame position in floats: a point inside the video,
            # i.e. the frame holding it (no warning: the window is not outside the video).
            point = float(math.floor(lo))
            return point, point + 1.0
        # The whole window lies outside the video: it collapses onto the nearest frame.
        edge = float(n - 1) if lo >= n else 0.0
        logger.warning(
            "window [%s, %s) s lies outside the video (%.3f s); using frame %d", req.start, req.end, req.duration, edge
        )
        return edge, edge + 1.0
    return lo_c, hi_c


def _uniform_positions(lo: float, hi: float, count: int) -> np.ndarray:
    """Frames at the centres of `count` equal segments of [lo, hi), kept inside the window's frames.

    `0 <= lo < hi <= num_frames_total` (as `_frame_window` returns), so ceil(hi) - 1, the last frame reaching
    into the window, is a frame of the video. A centre is lo plus a non-negative step, which never rounds below
    lo; but it can round up onto hi itself (a window a few ulps wide ending on a whole frame), so it is capped
    at ceil(hi) - 1.
    """
    centres = lo + (np.arange(count) + 0.5) * ((hi - lo) / count)  # [count]
    return np.minimum(np.floor(centres).astype(np.int64), math.ceil(hi) - 1)


@register_policy("uniform")
def uniform(req: SamplingRequest) -> np.ndarray:
    """`num_samples` frames at the centres of equal segments of the window."""
    lo, hi = _frame_window(req)
    return _uniform_positions(lo, hi, req.num_samples)


@register_policy("segment_middle")
def segment_middle(req: SamplingRequest) -> np.ndarray:
    """MVBench's rule (`get_index`), exactly; windows outside the video are clamped onto it."""
    start = -_MVBENCH_NO_BOUND if req.start is None else req.start
    end = _MVBENCH_NO_BOUND if req.end is None else req.end
    first = req.first_index
    max_frame = req.num_frames_total - 1 + first  # videos: n - 1; MVBench 1-based frame folders: n
    start_idx = max(first, round(start * req.fps))
    end_idx = min(round(end * req.fps), max_frame)
    if start_idx > end_idx:
        # MVBench would index outside the video here; collapse onto the nearest frame instead.
        edge = first if end_idx < first else max_frame
        logger.warning("window [%s, %s) s lies outside the video; using frame %d", req.start, req.end, edge - first)
        start_idx = end_idx = edge
    seg = float(end_idx - start_idx) / req.num_samples
    picked = [int(start_idx + seg / 2 + np.round(seg * i)) for i in range(req.num_samples)]
    return np.asarray(picked, dtype=np.int64) - first


@register_policy("fps")
def fixed_rate(req: SamplingRequest) -> np.ndarray:
    """Frames every 1/target_fps seconds across the window, at most `max_frames` (or `num_samples`).

    When the window holds more steps than the cap, or the target rate exceeds the video's, the cap (or the
    window's frame count) is spread evenly over the window instead; never fewer than one frame.
    """
    assert req.target_fps is not None
    lo, hi = _frame_window(req)
    cap = req.max_frames if req.max_frames is not None else req.num_samples
    frames_in_window = max(1, min(math.ceil(hi) - 1, req.num_frames_total - 1) - math.floor(lo) + 1)
    steps = math.floor((hi - lo) / req.fps * req.target_fps + 1e-9)  # whole 1/target_fps steps in the window
    count = max(1, min(steps, cap, frames_in_window))
    if count == steps:
        step = req.fps / req.target_fps  # frames between samples
        positions = lo + (np.arange(count, dtype=np.float64) + 0.5) * step  # [count]
        picked = np.clip(np.floor(positions).astype(np.int64), 0, req.num_frames_total - 1)
    else:
        picked = _uniform_positions(lo, hi, count)
    return np.unique(picked)  # partial edge frames can make two steps land on one frame
