"""Writing clips to H.264 mp4 with PyAV (used by the synthetic generator, tests and benchmarks)."""

from __future__ import annotations

import os
from fractions import Fraction
from typing import Iterable

import av
import numpy as np


def write_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    fps: float,
    *,
    codec: str = "libx264",
    gop: int | None = None,
    crf: int = 23,
    preset: str = "veryfast",
    reproducible: bool = False,
) -> str:
    """Encode uint8 RGB frames [H, W, 3] to `path`; `gop` is the keyframe interval in frames (None: codec default).

    `reproducible=True` writes the same bytes for the same frames in every run and process: one encoder thread
    and, for libx264, x264's plain C code (`asm=0`; about 2x the CPU). Measured on 96-224 px synthetic clips:
    with x264's assembly the bytes differed between a forked worker and the parent process, one thread or not.
    H.264 with yuv420p needs even sizes: odd widths/heights are padded by one edge pixel.
    The file is written to a temporary name and renamed, so a crash never leaves a half-written video.
    """
    path = str(path)
    stem, suffix = os.path.splitext(path)
    tmp = f"{stem}.part{os.getpid()}{suffix}"  # keeps the suffix, which picks the container format
    rate = Fraction(fps).limit_denominator(1001)
    options = {"crf": str(crf), "preset": preset} if codec == "libx264" else {}
    x264_params = []
    if gop is not None and codec == "libx264":
        # A fixed keyframe interval: no scene-cut keyframes, so the interval is exactly `gop`.
        x264_params.append(f"keyint={gop}:min-keyint={gop}:scenecut=0")
    if reproducible and codec == "libx264":
        x264_params.append("asm=0")
    if x264_params:
        options["x264-params"] = ":".join(x264_params)
    fmt = "mp4" if path.endswith(".mp4") else None
    try:
        with av.open(tmp, mode="w", format=fmt) as container:
            stream = None
            for frame in frames:
                frame = np.ascontiguousarray(frame, dtype=np.uint8)
                h, w = frame.shape[:2]
                if h % 2 or w % 2:
                    frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
                if stream is None:
                    stream = container.add_stream(codec, rate=rate, options=options)
                    stream.width, stream.height = frame.shape[1], frame.shape[0]
                    stream.pix_fmt = "yuv420p"
                    if gop is not None:
                        stream.codec_context.gop_size = gop
                    if reproducible:
                        stream.codec_context.thread_count = 1
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            if stream is None:
                raise ValueError(f"{path}: no frames to write")
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
