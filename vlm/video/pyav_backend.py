"""Video files through PyAV: a keyframe index built by demuxing (no decoding) and a planned decode.

Opening a file validates it (header, video stream, every packet present and complete, as many frames as
the header declares) and records, per frame in presentation order, its pts and the keyframe at or before
it. Reading sorted positions then seeks only when the next wanted frame's keyframe lies more than
SEEK_MARGIN frames beyond where the decoder stands, and otherwise decodes forward; packets of unwanted
frames are decoded with non-reference pictures skipped, and only returned frames are converted to RGB,
so memory is bounded by the output. Streams without usable timestamps (raw elementary streams; AVIs with
packed B-frames, whose decoded timestamps come out of order) are read in decode order from the start.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import av
import av.logging
import numpy as np

from vlm.video.backends import Backend, positive_fps, register_backend
from vlm.video.clip import VideoInfo
from vlm.video.errors import VideoDecodeError

logger = logging.getLogger(__name__)

# Containers whose header states the exact number of video samples (so a shorter file is truncated).
_EXACT_COUNT_FORMATS = ("mov", "mp4")
# A seek (demuxer jump, decoder flush, thread pipeline refill) costs about as much as decoding a few frames:
# decoding forward is kept when the next keyframe is at most this many frames ahead.
SEEK_MARGIN = 4
# Demuxing or decoding more than this many packets per frame of the video means something is wrong.
_WORK_FACTOR = 3


@dataclass
class StreamIndex:
    """Frame positions of one video stream, in presentation order, from its packets alone."""

    frame_pts: np.ndarray  # int64 [N] pts of each frame (decode-order mode: 0..N-1)
    key_pts: np.ndarray  # int64 [N] pts of the keyframe at or before frame i (decode from there)
    seek_ts: np.ndarray  # int64 [N] timestamp to seek to for that keyframe (its dts: what demuxers index by)
    time_base: Fraction
    has_pts: bool  # False: no usable timestamps; frames are counted in decode order, never sought

    @property
    def num_frames(self) -> int:
        return int(self.frame_pts.shape[0])


@contextlib.contextmanager
def ffmpeg_errors(path: str, what: str, *, capture_log: bool = True) -> Iterator[list]:
    """Turn any PyAV/FFmpeg failure inside the block into a VideoDecodeError naming `path` and FFmpeg's reason.

    `capture_log` routes FFmpeg's log into the reason ("moov atom not found"); it must stay off around
    decoding, where FFmpeg's frame threads would log through the GIL that the decoding thread holds.
    """
    logs: list = []
    level = av.logging.get_level()
    enable = capture_log and level is None
    if enable:
        av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture(local=True) if capture_log else contextlib.nullcontext(logs) as logs:
            try:
                yield logs
            except VideoDecodeError:
                raise
            except FileNotFoundError:
                raise VideoDecodeError(path, "file not found") from None
            except (av.FFmpegError, OSError, ValueError, EOFError, MemoryError) as e:
                raise VideoDecodeError(path, f"{what}: {_reason(e, logs)}") from None
    finally:
        if enable:
            av.logging.set_level(None)


def _reason(error: Exception, logs: list) -> str:
    """FFmpeg's last logged complaint (e.g. 'moov atom not found') plus the error itself."""
    entries = list(logs)
    if isinstance(getattr(error, "log", None), tuple):
        entries.append(error.log)  # FFmpeg's last error line, kept by PyAV even when the log repeats
    messages = [str(entry[2]).strip() for entry in entries if len(entry) >= 3 and str(entry[2]).strip()]
    base = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return f"{messages[-1]} ({base})" if messages else str(base)


def open_video(path: str) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """Open `path` with PyAV and return it with its first video stream; VideoDecodeError if it is not a video."""
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    if os.path.isdir(path):
        raise VideoDecodeError(path, "is a folder, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    with ffmpeg_errors(path, "not a readable video"):
        container = av.open(path, metadata_errors="ignore")
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(path, "no video stream")
    return container, container.streams.video[0]


def build_index(path: str, container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> StreamIndex:
    """Demux every packet of `stream` (no decoding) into a StreamIndex; VideoDecodeError on truncation."""
    pts_list: list[int | None] = []  # of packets that produce a frame
    keyframes: list[tuple[int, int]] = []  # (pts, dts or pts)
    num_packets, any_missing_pts = 0, False
    with ffmpeg_errors(path, "corrupt or truncated video") as logs:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the flush packet at the end, or an empty (dropped-frame) chunk
            num_packets += 1
            if packet.is_corrupt:
                detail = f" ({_reason(RuntimeError('corrupt packet'), logs)})" if logs else ""
                raise VideoDecodeError(path, f"truncated or corrupt: packet {num_packets} is incomplete{detail}")
            pts = packet.pts
            any_missing_pts |= pts is None
            if packet.is_keyframe and pts is not None:
                keyframes.append((pts, pts if packet.dts is None else min(packet.dts, pts)))
            if not packet.is_discard:
                pts_list.append(pts)
    declared = stream.frames
    fmt = container.format.name
    if declared and num_packets < declared and any(f in fmt for f in _EXACT_COUNT_FORMATS):
        raise VideoDecodeError(
            path, f"truncated: the header declares {declared} frames but the file holds {num_packets}"
        )
    if not pts_list:
        raise VideoDecodeError(path, "video has no frames")
    n = len(pts_list)
    has_pts = not any_missing_pts and len(set(pts_list)) == n and bool(keyframes)
    if has_pts:
        _check_declared_duration(path, container, stream, max(p for p in pts_list if p is not None))
    if not has_pts:
        logger.debug("%s: no usable packet timestamps; reading in decode order", path)
        frame_pts, zeros = np.arange(n, dtype=np.int64), np.zeros(n, np.int64)
        return StreamIndex(frame_pts, zeros, zeros, _time_base(stream), False)
    frame_pts = np.sort(np.asarray(pts_list, dtype=np.int64))  # [N] presentation order
    keys = np.asarray(sorted(keyframes), dtype=np.int64).reshape(-1, 2)  # [K, 2] (pts, dts) by pts
    which = np.searchsorted(keys[:, 0], frame_pts, side="right") - 1  # [N] last keyframe at or before each frame
    # Frames before the first keyframe (open GOP / leading frames) are reached from the first keyframe.
    which = np.maximum(which, 0)
    return StreamIndex(frame_pts, keys[which, 0], keys[which, 1], _time_base(stream), True)


def _declared_seconds(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    """How long the header says the video track lasts, where that is exact (Matroska by FFmpeg, AVI)."""
    tag = (stream.metadata or {}).get("DURATION")  # FFmpeg's Matroska/WebM muxer writes it per track
    if tag:
        try:
            hours, minutes, seconds = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        except ValueError:
            return None
    if container.format.name == "avi" and stream.frames:
        return float(stream.frames * _time_base(stream))  # the stream header's length, in frame ticks
    return None


def _check_declared_duration(path: str, container: av.container.InputContainer,
                             stream: av.video.stream.VideoStream, last_pts: int) -> None:
    """Frames that end well before the header's stated duration mean the file was cut."""
    declared, rate = _declared_seconds(container, stream), _nominal_fps(stream)
    if declared is None or not rate:
        return
    end = float(last_pts * _time_base(stream)) + 1.0 / rate  # seconds at which the last frame found ends
    if declared - end > 1.5 / rate:  # more than one whole frame missing at the end
        raise VideoDecodeError(path, f"truncated: the header declares {declared:.3f} s but frames end at {end:.3f} s")


class _UnreliablePts(Exception):
    """Decoded frames carry missing or out-of-order timestamps: positions must be counted instead."""


def _time_base(stream: av.video.stream.VideoStream) -> Fraction:
    return Fraction(stream.time_base) if stream.time_base else Fraction(1, 90000)


def _nominal_fps(stream: av.video.stream.VideoStream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and float(rate) > 0:
            return float(rate)
    return None


def decode_threads(setting: str = "auto") -> str:
    """FFmpeg thread type for a decoder: "auto" is frame+slice threads while a core is idle, else slice only.

    Frame threads cut a lone read's wall time on an idle machine, but cost ~30% more CPU per frame
    (pipeline refills after each seek); when every core is busy (data-loader workers, other jobs) that
    overhead only slows everyone down, and slice threads (free for single-slice H.264) are used instead.
    """
    if setting != "auto":
        return setting.upper()
    cores = os.cpu_count() or 1
    return "AUTO" if cores >= 2 and os.getloadavg()[0] <= cores - 1 else "SLICE"


@register_backend("pyav")
class PyAVBackend(Backend):
    """Any video FFmpeg reads, decoded by PyAV with a keyframe-aware plan; `fps` overrides the stream's rate."""

    def __init__(self, path: str, fps: float | None = None, *, threads: str = "auto", skip_nonref: bool = True):
        self.path = path
        self._threads = threads
        self._container, self._stream = open_video(path)
        try:
            self.index = build_index(path, self._container, self._stream)
        except BaseException:
            self._container.close()
            raise
        self.info = self._make_info(fps)
        self._configure_threads()
        self._fps_override = fps is not None
        self._in_order = not self.index.has_pts
        self._seek_by = "pts"
        self._skip_nonref = skip_nonref
        self._wanted_pts: set[int] = set()
        self._frames_iter: Iterator[av.VideoFrame] | None = None  # the live decode, positioned after _last_pts
        self._last_pts: int | None = None
        self.stats = {"seeks": 0, "decoded": 0}
        self.seek_margin = SEEK_MARGIN

    def _make_info(self, fps: float | None) -> VideoInfo:
        idx, stream = self.index, self._stream
        ctx = stream.codec_context
        n = idx.num_frames
        nominal = _nominal_fps(stream)
        if fps is not None:
            rate = positive_fps(self.path, fps, 0.0)
        elif idx.has_pts and n > 1:
            span = float((idx.frame_pts[-1] - idx.frame_pts[0]) * idx.time_base)  # first to last frame, s
            measured = (n - 1) / span if span > 0 else None
            rate = nominal or measured or 25.0
            if measured and abs(measured - rate) > 0.1 * rate:
                # Dropped or variable-rate frames: the positions-to-seconds map follows the real frame times.
                logger.debug(
                    "%s: nominal %.3f fps but frames arrive at %.3f fps; using the latter", self.path, rate, measured
                )
                rate = measured
        else:
            rate = nominal or 25.0
        return VideoInfo(n, rate, n / rate, int(ctx.width), int(ctx.height), self.registry_name)

    def timestamps(self, indices: np.ndarray) -> np.ndarray:
        idx = self.index
        if not idx.has_pts or self._fps_override:
            return indices.astype(np.float64) / self.info.fps
        rel = idx.frame_pts[indices] - idx.frame_pts[0]  # [K] in time_base units
        return rel.astype(np.float64) * float(idx.time_base)

    def read(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), self.info.height, self.info.width, 3), np.uint8)  # [K, H, W, 3]
        if len(indices) == 0:
            return out
        try:
            with ffmpeg_errors(self.path, "decoding failed", capture_log=False):
                if not self._in_order:
                    try:
                        self._read_planned(indices, out)
                        return out
                    except _UnreliablePts:
                        # e.g. AVI with packed B-frames: the decoder relabels timestamps out of order.
                        logger.debug("%s: decoded timestamps disagree with the packets'; decode order", self.path)
                        self._in_order = True
                self._read_in_order(indices, out)
        except BaseException:
            self._frames_iter = None  # the decoder's state is unknown after a failure
            raise
        return out

    # -- planned reads (streams with timestamps) ---------------------------------------------------
    def _read_planned(self, indices: np.ndarray, out: np.ndarray) -> None:
        """Fill `out`, seeking to a keyframe only when the next wanted frame lies beyond the decoder's reach."""
        idx = self.index
        targets = idx.frame_pts[indices]  # [K] ascending
        self._wanted_pts = set(targets.tolist())
        budget = _WORK_FACTOR * idx.num_frames + 64  # frames this read may decode at most
        k, attempt = 0, 0  # attempt: 0 seek by keyframe pts, 1 by keyframe dts, 2 from the stream's start
        while k < len(indices):
            want, key, last = int(targets[k]), int(idx.key_pts[indices[k]]), self._last_pts
            sought = self._frames_iter is None or last is None or want <= last or self._worth_seeking(key, last)
            if sought:
                self._position(int(indices[k]), attempt)
            first, previous = True, None
            for frame in self._frames_iter:
                budget -= 1
                if budget < 0:
                    raise VideoDecodeError(self.path, "decoding did not reach the wanted frames (runaway decode)")
                pts = frame.pts
                if pts is None or (previous is not None and pts <= previous):
                    raise _UnreliablePts()
                self._last_pts = previous = pts
                if pts < want:
                    first = False
                    continue
                if pts > want:
                    if first:
                        break  # the decoder started past the frame: position it further back
                    raise _UnreliablePts()  # the frame never came out under its packet's timestamp
                self._store(frame, out, k)
                k, attempt, first = k + 1, 0, False
                if k == len(indices) or self._worth_seeking(int(idx.key_pts[indices[k]]), pts):
                    break  # done, or the next frame is past a keyframe not reached yet: seek there
                want = int(targets[k])
            else:
                self._frames_iter = None
                if k < len(indices):
                    raise _UnreliablePts()  # the stream ended before the frame came out
                return
            if first and k < len(indices):  # started past the wanted frame
                self._frames_iter = None
                if not sought:
                    continue  # a decode left over from an earlier read: seek normally
                attempt += 1
                if attempt > 2:
                    raise VideoDecodeError(self.path, f"could not seek to frame {int(indices[k])}")
                if attempt == 1 and self._seek_by == "pts":
                    self._seek_by = "dts"  # this demuxer indexes keyframes by dts: seek by dts from now on
                logger.debug("%s: seek overshot frame %d (attempt %d)", self.path, int(indices[k]), attempt)

    def _worth_seeking(self, key_pts: int, current_pts: int) -> bool:
        """Whether jumping to the keyframe at `key_pts` skips enough frames past `current_pts` to pay for a seek."""
        if key_pts <= current_pts:
            return False
        pts = self.index.frame_pts
        return int(np.searchsorted(pts, key_pts) - np.searchsorted(pts, current_pts)) > self.seek_margin

    def _position(self, i: int, attempt: int) -> None:
        """Put the decoder at or before frame `i`, at the keyframe that starts its run."""
        if attempt >= 2:
            self._restart()
        elif self._seek_by == "dts" or attempt == 1:
            self._seek(int(self.index.seek_ts[i]))
        else:
            self._seek(int(self.index.key_pts[i]))

    def _seek(self, timestamp: int) -> None:
        """Position the decoder at the keyframe at or before `timestamp` (stream time base)."""
        try:
            self._container.seek(timestamp, stream=self._stream, backward=True, any_frame=False)
        except av.FFmpegError:
            logger.debug("%s: seek failed; decoding from the start", self.path)
            self._reopen()
        self.stats["seeks"] += 1
        self._frames_iter = self._decode()
        self._last_pts = None

    def _restart(self) -> None:
        """Position the decoder at the very start of the stream."""
        self._reopen()
        self.stats["seeks"] += 1
        self._frames_iter = self._decode()
        self._last_pts = None

    def _decode(self, skip_unwanted: bool = True) -> Iterator[av.VideoFrame]:
        """Frames from the current position on; packets of unwanted frames skip non-reference pictures."""
        ctx = self._stream.codec_context
        skip_unwanted = skip_unwanted and self._skip_nonref
        skipping = False
        ctx.skip_frame = "DEFAULT"
        for packet in self._container.demux(self._stream):
            skip = skip_unwanted and packet.pts is not None and packet.pts not in self._wanted_pts
            if skip != skipping:
                # Read per packet by the decoder (and by frame threads when the packet is submitted):
                # a non-reference picture nobody asked for is never reconstructed.
                ctx.skip_frame = "NONREF" if skip else "DEFAULT"
                skipping = skip
            for frame in packet.decode():
                self.stats["decoded"] += 1
                yield frame

    def _reopen(self) -> None:
        self._container.close()
        self._container, self._stream = open_video(self.path)
        self._configure_threads()

    def _configure_threads(self) -> None:
        self._stream.thread_type = decode_threads(self._threads)

    def _store(self, frame: av.VideoFrame, out: np.ndarray, k: int) -> None:
        if (frame.height, frame.width) != out.shape[1:3]:
            raise VideoDecodeError(
                self.path,
                f"frame size changed mid-stream ({frame.width}x{frame.height}, expected {out.shape[2]}x{out.shape[1]})",
            )
        out[k] = frame.to_ndarray(format="rgb24")

    # -- decode-order reads (no timestamps) ----------------------------------------------------------
    def _read_in_order(self, indices: np.ndarray, out: np.ndarray) -> None:
        self._reopen()
        self._frames_iter, self._last_pts = None, None
        k, position = 0, -1
        budget = _WORK_FACTOR * self.index.num_frames + 64
        for position, frame in enumerate(self._decode(skip_unwanted=False)):
            if position > indices[-1]:
                break
            if position > budget:
                raise VideoDecodeError(self.path, "decoding did not reach the wanted frames (runaway decode)")
            if position == indices[k]:
                self._store(frame, out, k)
                k += 1
                if k == len(indices):
                    break
        if k < len(indices):
            raise VideoDecodeError(self.path, f"frame {int(indices[k])} is missing: only {position + 1} frames decoded")

    def close(self) -> None:
        self._frames_iter = None
        self._container.close()
