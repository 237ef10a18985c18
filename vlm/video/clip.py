"""What the video layer returns: decoded clips and what a source holds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Clip:
    """Frames decoded from one source, in the order they were asked for (repeats allowed)."""

    frames: np.ndarray  # uint8 [T, H, W, 3] RGB
    timestamps: np.ndarray  # float64 [T] seconds from the source's first frame
    indices: np.ndarray  # int64 [T] frame positions in the source (0-based)
    source: str
    fps: float
    num_frames_total: int

    def __len__(self) -> int:
        return int(self.frames.shape[0])


@dataclass
class VideoInfo:
    """What a source holds; `fps` is the rate that maps frame positions to seconds for sampling."""

    num_frames: int
    fps: float
    duration: float  # seconds
    width: int
    height: int
    backend: str
