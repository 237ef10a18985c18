"""Pictures people would rather look at than read: frame strips with the question and the answer."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np


def frame_strip(frames: np.ndarray, timestamps: Sequence[float] | None, lines: Sequence[str],
                out: str | os.PathLike, max_frames: int = 8, title: str | None = None) -> Path:
    """Save a row of frames (uint8 [T, H, W, 3]) with their times, and text lines (Q/A) under it, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
    wrapped = [w for line in lines for w in textwrap.wrap(line, 110) or [""]]
    header = 0.45 if title else 0.15  # inches above the frames: their time labels, and the title over them
    fig = plt.figure(figsize=(2.0 * len(idx), 2.15 + header + 0.22 * len(wrapped)))
    top = 1.0 - (1.75 + header) / fig.get_figheight()
    for k, i in enumerate(idx):
        ax = fig.add_axes((k / len(idx), top, 1 / len(idx) * 0.97, 1.75 / fig.get_figheight()))
        ax.imshow(frames[i])
        ax.set_xticks([])
        ax.set_yticks([])
        if timestamps is not None:
            ax.set_title(f"t={float(timestamps[i]):.2f}s", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10, y=1.0 - 0.05 / fig.get_figheight(), va="top")
    fig.text(0.01, top - 0.02, "\n".join(wrapped), va="top", ha="left", fontsize=9, family="monospace")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
