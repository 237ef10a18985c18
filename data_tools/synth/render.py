"""Drawing clips from their ground truth with numpy (shapes are anti-aliased by 4x supersampling with PIL).

`render_clip(clip)` is a pure function of the ground-truth dict, so a clip can be redrawn from `meta.jsonl`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data_tools.synth.world import BG_TONES, COLORS

SUPERSAMPLE = 4


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices of a shape with circumradius <= 1 around (0, 0), y down."""
    if shape == "square":
        return [(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)]
    if shape == "triangle":
        return [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (-90, 30, 150)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)]
    if shape == "star":
        return [
            ((1.0 if k % 2 == 0 else 0.45) * math.cos(math.radians(-90 + 36 * k)),
             (1.0 if k % 2 == 0 else 0.45) * math.sin(math.radians(-90 + 36 * k)))
            for k in range(10)
        ]
    if shape == "cross":
        w, a = 0.3, 0.95
        return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
    raise ValueError(f"no polygon for shape {shape!r}")


_POLYGONS = {s: _unit_polygon(s) for s in ("square", "triangle", "diamond", "star", "cross")}


def _coverage(draw_fn, x0: float, y0: float, x1: float, y1: float, size: int) -> tuple[np.ndarray, int, int] | None:
    """Anti-aliased coverage [h, w] in [0, 1] of what `draw_fn(draw, to_canvas)` fills inside the box (x0..x1, y0..y1)."""
    ix0, iy0 = max(0, int(math.floor(x0)) - 1), max(0, int(math.floor(y0)) - 1)
    ix1, iy1 = min(size, int(math.ceil(x1)) + 2), min(size, int(math.ceil(y1)) + 2)
    if ix1 <= ix0 or iy1 <= iy0:
        return None
    w, h = ix1 - ix0, iy1 - iy0
    img = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)

    def to_canvas(x: float, y: float) -> tuple[float, float]:
        return (x - ix0) * SUPERSAMPLE - 0.5, (y - iy0) * SUPERSAMPLE - 0.5

    draw_fn(ImageDraw.Draw(img), to_canvas)
    a = np.asarray(img.reduce(SUPERSAMPLE), dtype=np.float32) * (1.0 / 255.0)  # box average of each 4x4 block
    return a, ix0, iy0


def shape_coverage(shape: str, cx: float, cy: float, radius: float, angle: float, size: int):
    """Coverage of a shape of circumradius `radius` centred at (cx, cy), turned `angle` degrees clockwise."""
    if shape == "circle":
        r = 0.85 * radius

        def draw(d: ImageDraw.ImageDraw, tc) -> None:
            (ax, ay), (bx, by) = tc(cx - r, cy - r), tc(cx + r, cy + r)
            d.ellipse([ax, ay, bx, by], fill=255)
    else:
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        pts = [(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in _POLYGONS[shape]]

        def draw(d: ImageDraw.ImageDraw, tc) -> None:
            d.polygon([tc(x, y) for x, y in pts], fill=255)
    return _coverage(draw, cx - radius, cy - radius, cx + radius, cy + radius, size)


def rect_coverage(x0: float, y0: float, x1: float, y1: float, size: int):
    """Coverage of an axis-aligned rectangle."""

    def draw(d: ImageDraw.ImageDraw, tc) -> None:
        (ax, ay), (bx, by) = tc(x0, y0), tc(x1, y1)
        d.rectangle([ax, ay, bx - 1, by - 1], fill=255)
    return _coverage(draw, x0, y0, x1, y1, size)


def _composite(frame: np.ndarray, cov, rgb: np.ndarray, opacity: float = 1.0) -> None:
    if cov is None or opacity <= 0:
        return
    a, x0, y0 = cov
    h, w = a.shape
    region = frame[y0:y0 + h, x0:x0 + w]
    region += (rgb - region) * (a * opacity)[..., None]


def background_image(bg: dict[str, Any], size: int) -> np.ndarray:
    """The static background picture, float32 [S, S, 3] in 0..255."""
    tones = [np.array(BG_TONES[t], dtype=np.float32) for t in bg["tones"]]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = bg["kind"]
    if kind == "solid":
        return np.broadcast_to(tones[0], (size, size, 3)).copy()
    orient = bg.get("orientation", "vertical")
    if kind == "gradient":
        t = {"vertical": yy, "horizontal": xx, "diagonal": (xx + yy) / 2}[orient] / (size - 1)
        return tones[0] * (1 - t[..., None]) + tones[1] * t[..., None]
    if kind == "noise":
        rng = np.random.default_rng(bg["seed"])
        coarse_n = max(2, size // 6)
        coarse = Image.fromarray(rng.normal(0.0, 1.0, (coarse_n, coarse_n)).astype(np.float32), mode="F")
        smooth = np.asarray(coarse.resize((size, size), Image.BILINEAR), dtype=np.float32)
        fine = rng.normal(0.0, 0.5, (size, size)).astype(np.float32)
        return tones[0] + (bg["amplitude"] * (smooth + fine))[..., None]
    if kind == "stripes":
        u = {"vertical": xx, "horizontal": yy, "diagonal": (xx + yy) / math.sqrt(2)}[orient]
        t = 0.5 + 0.5 * np.clip(4.0 * np.sin(2 * math.pi * u / bg["period"]), -1.0, 1.0)
        return tones[0] * (1 - t[..., None]) + tones[1] * t[..., None]
    raise ValueError(f"unknown background kind {kind!r}")


def _draw_box(frame: np.ndarray, obj: dict[str, Any], k: int, size: int) -> None:
    """A box of the shuffle scenario: a dark outline, the body, and a darker lid band on top."""
    tr = obj["track"]
    cx, cy = tr["x"][k], tr["y"][k]
    hw, hh = obj["width"] / 2, obj["height"] / 2
    rgb = np.array(COLORS[tr["color"][k]], dtype=np.float32)
    _composite(frame, rect_coverage(cx - hw, cy - hh, cx + hw, cy + hh, size), rgb * 0.35)
    inset = max(1.0, size / 128)
    _composite(frame, rect_coverage(cx - hw + inset, cy - hh + inset, cx + hw - inset, cy + hh - inset, size), rgb)
    lid = 0.25 * obj["height"]
    _composite(frame, rect_coverage(cx - hw + inset, cy - hh + inset, cx + hw - inset, cy - hh + lid, size), rgb * 0.7)


def render_clip(clip: dict[str, Any]) -> np.ndarray:
    """All frames of a clip, uint8 [T, S, S, 3]."""
    T, S = clip["num_frames"], clip["size"]
    bg0 = background_image(clip["background"], S)
    change = next((e for e in clip["events"] if e["type"] == "background_change"), None)
    bg1 = background_image(clip["background_after"], S) if change else None
    objects = clip["objects"]
    boxes = [o for o in objects if o["shape"] == "box"]
    others = [o for o in objects if o["shape"] != "box"]
    out = np.empty((T, S, S, 3), dtype=np.uint8)
    cache: dict[tuple, Any] = {}  # still objects look the same in every frame: draw them once
    for k in range(T):
        if change is None or k < change["start_frame"]:
            frame = bg0.copy()
        else:
            fade = change["end_frame"] - change["start_frame"]
            w = min(1.0, (k - change["start_frame"] + 1) / (fade + 1))
            frame = bg0 * (1 - w) + bg1 * w
        for obj in others:
            tr = obj["track"]
            if tr["opacity"][k] <= 0:
                continue
            key = (obj["shape"], tr["x"][k], tr["y"][k], obj["radius"] * tr["scale"][k], tr["angle"][k])
            if key not in cache:
                cache[key] = shape_coverage(*key, S)
            cov = cache[key]
            _composite(frame, cov, np.array(COLORS[tr["color"][k]], dtype=np.float32), tr["opacity"][k])
        for obj in sorted(boxes, key=lambda o: o["track"]["y"][k]):  # lower boxes are nearer: drawn last
            _draw_box(frame, obj, k, S)
        out[k] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return out
