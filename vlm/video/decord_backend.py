"""Video files through decord's `VideoReader.get_batch`, after PyAV has validated them (backend "decord").

decord can crash or hang on corrupt input, so a file reaches decord only once PyAV has opened it and
demuxed every packet of its video stream (the same check, and the same timestamps, as `pyav_backend`).
Garbage inside otherwise complete packets is not caught by that check; `backend="auto"` never picks
decord (see `vlm.video.decode.choose_backend`), and decord returns wrong frames after seeking in AVIs
with packed B-frames. MPEG-TS files are refused: decord returns frames shifted by the first keyframe
interval from them (position 0 gives the frame at the second keyframe), with no error.
"""

from __future__ import annotations

import logging

import numpy as np

from vlm.video.backends import Backend, positive_fps, register_backend
from vlm.video.clip import VideoInfo
from vlm.video.errors import VideoDecodeError
from vlm.video.pyav_backend import build_index, open_video

logger = logging.getLogger(__name__)


def decord_available() -> bool:
    """Whether decord imports here."""
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


@register_backend("decord")
class DecordBackend(Backend):
    """decord's reader; `fps` overrides the stream's rate; `threads` 0 lets FFmpeg choose."""

    def __init__(self, path: str, fps: float | None = None, *, threads: int = 0):
        self.path = path
        container, stream = open_video(path)
        try:
            index = build_index(path, container, stream)
            width, height = stream.codec_context.width, stream.codec_context.height
            container_format = container.format.name
        finally:
            container.close()
        if "mpegts" in container_format:
            raise VideoDecodeError(
                path, "decord returns the wrong frames from MPEG-TS files; read it with backend 'pyav' (or 'auto')"
            )
        try:
            import decord
        except ImportError as e:
            raise VideoDecodeError(path, f"decord is not installed ({e})") from None
        try:
            self._vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
            n = len(self._vr)
            rate = positive_fps(path, fps, 0.0) if fps is not None else float(self._vr.get_avg_fps())
        except (RuntimeError, decord.DECORDError) as e:
            raise VideoDecodeError(path, f"decord could not open it ({str(e).splitlines()[0][:200]})") from None
        if n == 0:
            raise VideoDecodeError(path, "video has no frames")
        if not rate > 0:
            rate = 25.0
        if n != index.num_frames:
            logger.warning("%s: decord counts %d frames, PyAV %d; following decord", path, n, index.num_frames)
        self._pts = index if (index.has_pts and n == index.num_frames and fps is None) else None
        self.info = VideoInfo(n, rate, n / rate, int(width), int(height), self.registry_name)

    def read(self, indices: np.ndarray) -> np.ndarray:
        import decord

        if len(indices) == 0:
            return np.empty((0, self.info.height, self.info.width, 3), np.uint8)
        try:
            frames = self._vr.get_batch(indices.tolist()).asnumpy()  # [K, H, W, 3]
        except (RuntimeError, decord.DECORDError) as e:
            raise VideoDecodeError(self.path, f"decord failed ({str(e).splitlines()[0][:200]})") from None
        return np.ascontiguousarray(frames, dtype=np.uint8)

    def timestamps(self, indices: np.ndarray) -> np.ndarray:
        if self._pts is None:
            return indices.astype(np.float64) / self.info.fps
        rel = self._pts.frame_pts[indices] - self._pts.frame_pts[0]  # [K] in time_base units
        return rel.astype(np.float64) * float(self._pts.time_base)

    def close(self) -> None:
        self._vr = None
