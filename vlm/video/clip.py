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

    def distinct(self) -> "Clip":
        """The clip with each run of a repeated frame kept once (sampling a window with fewer frames than asked
        repeats them: 16 samples of a 4-frame window take each frame four times)."""
        keep = np.concatenate([[True], np.diff(self.indices) != 0]) if len(self) else np.zeros(0, dtype=bool)
        return Clip(self.frames[keep], self.timestamps[keep], self.indices[keep], self.source, self.fps,
                    self.num_frames_total)


@dataclass
class VideoInfo:
    """What a source holds; `fps` is the rate that maps frame positions to seconds for sampling."""

    num_frames: int
    fps: float
    duration: float  # seconds
    width: int
    height: int
    backend: str
