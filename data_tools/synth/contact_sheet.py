"""A contact sheet: for a few clips (one per class), a strip of frames decoded from the mp4 and the caption under it."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

THUMB = 128  # px per frame in the sheet
PAD = 6


def decode_frames(path: str | Path) -> np.ndarray:
    """All frames of a video file, uint8 [T, H, W, 3]."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def make_contact_sheet(root: str | Path, metas: list[dict[str, Any]], path: str | Path, *,
                       max_clips: int = 12, frames_per_clip: int = 6) -> Path:
    """Write a PNG grid: one row per clip (the first clip of each class), frames with their times, caption below."""
    root = Path(root)
    chosen: list[dict[str, Any]] = []
    seen: set[str] = set()
    for m in metas:
        if m["label"] not in seen:
            seen.add(m["label"])
            chosen.append(m)
        if len(chosen) == max_clips:
            break
    font, small = _font(13), _font(11)
    width = PAD + frames_per_clip * (THUMB + PAD)
    wrap = max(40, int(width / 7.2))
    rows = []
    for m in chosen:
        frames = decode_frames(root / m["video"])
        idx = np.linspace(0, len(frames) - 1, frames_per_clip).round().astype(int)
        lines = textwrap.wrap(m["caption"], wrap)
        header = f"{m['id']} ({m['split']})  class: {m['label']}"
        h = THUMB + 16 + 18 * (len(lines) + 1) + PAD
        row = Image.new("RGB", (width, h), (250, 250, 250))
        draw = ImageDraw.Draw(row)
        for j, k in enumerate(idx):
            x = PAD + j * (THUMB + PAD)
            row.paste(Image.fromarray(frames[k]).resize((THUMB, THUMB), Image.NEAREST), (x, 0))
            draw.text((x, THUMB + 1), f"frame {k}  t={k / m['fps']:.2f}s", fill=(90, 90, 90), font=small)
        y = THUMB + 16
        draw.text((PAD, y), header, fill=(20, 20, 120), font=font)
        for line in lines:
            y += 18
            draw.text((PAD, y), line, fill=(0, 0, 0), font=font)
        rows.append(row)
    sheet = Image.new("RGB", (width, sum(r.height for r in rows) + PAD), (200, 200, 200))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + 1
    path = Path(path)
    sheet.save(path)
    return path
