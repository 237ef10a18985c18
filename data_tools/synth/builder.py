"""Building one clip: objects with per-frame tracks, the layout rules they obey, and the events they make.

A scenario (`scenarios.py`) fills a `ClipBuilder` with objects and events, or raises `Retry` when what it drew
breaks a rule (an object leaves the frame, two visible objects come closer than GAP px, colours run out).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_tools.synth.world import COLORS, SHAPES, SIZES

MARGIN = 1.0  # px kept between an object and the frame border
GAP = 3.0  # px kept between two visible objects


class Retry(Exception):
    """The sampled layout violated a constraint; sample again."""


class TrackedObject:
    """An object under construction: attributes plus per-frame arrays."""

    def __init__(self, oid: int, shape: str, color: str, size: str, frame_size: int, num_frames: int, role: str):
        self.id, self.shape, self.color, self.size, self.role = oid, shape, color, size, role
        self.radius = SIZES[size] * frame_size
        t = num_frames
        self.x = np.zeros(t)
        self.y = np.zeros(t)
        self.scale = np.ones(t)
        self.angle = np.zeros(t)
        self.opacity = np.ones(t)
        self.colors = [color] * t
        self.extra: dict[str, Any] = {}

    def extent(self) -> np.ndarray:
        """Per-frame circumradius in px."""  # [T]
        return self.radius * self.scale

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id, "shape": self.shape, "color": self.color, "size": self.size, "role": self.role,
            "radius": round(float(self.radius), 2),
        }
        d.update(self.extra)
        d["track"] = {
            "x": [round(float(v), 2) for v in self.x],
            "y": [round(float(v), 2) for v in self.y],
            "visible": [bool(v >= 0.5) for v in self.opacity],
            "opacity": [round(float(v), 3) for v in self.opacity],
            "color": list(self.colors),
            "scale": [round(float(v), 3) for v in self.scale],
            "angle": [round(float(v), 1) for v in self.angle],
        }
        return d


class ClipBuilder:
    """Accumulates the objects and events of one clip."""

    def __init__(self, rng: np.random.Generator, num_frames: int, frame_size: int, fps: float):
        self.rng, self.T, self.S, self.fps = rng, num_frames, frame_size, fps
        self.objects: list[TrackedObject] = []
        self.events: list[dict[str, Any]] = []
        self.used_colors: set[str] = set()
        self.used_shapes: set[str] = set()
        self.extra: dict[str, Any] = {}

    # --- attributes -------------------------------------------------------------------------------------------
    def new_color(self, exclude: tuple[str, ...] = ()) -> str:
        free = [c for c in COLORS if c not in self.used_colors and c not in exclude]
        if not free:
            raise Retry("out of colours")
        c = str(self.rng.choice(free))
        self.used_colors.add(c)
        return c

    def new_object(self, role: str, *, shapes: tuple[str, ...] = SHAPES, size: str | None = None) -> TrackedObject:
        free = [s for s in shapes if s not in self.used_shapes]
        if not free:
            raise Retry("out of shapes")
        shape = str(self.rng.choice(free))
        self.used_shapes.add(shape)
        size = size or str(self.rng.choice(list(SIZES)))
        obj = TrackedObject(len(self.objects), shape, self.new_color(), size, self.S, self.T, role)
        self.objects.append(obj)
        return obj

    # --- geometry ---------------------------------------------------------------------------------------------
    def lo_hi(self, r: float) -> tuple[float, float]:
        """Range of centre coordinates that keeps a circumradius `r` inside the frame."""
        return r + MARGIN, self.S - r - MARGIN

    def fits(self, obj: TrackedObject) -> bool:
        """Inside the frame in every frame, and apart from every other object whenever both are visible."""
        ext = obj.extent()
        if np.any(obj.x - ext < MARGIN - 1e-6) or np.any(obj.x + ext > self.S - MARGIN + 1e-6):
            return False
        if np.any(obj.y - ext < MARGIN - 1e-6) or np.any(obj.y + ext > self.S - MARGIN + 1e-6):
            return False
        for other in self.objects:
            if other is obj:
                continue
            both = (obj.opacity > 0) & (other.opacity > 0)
            if not np.any(both):
                continue
            dist = np.hypot(obj.x - other.x, obj.y - other.y)
            if np.any((dist < ext + other.extent() + GAP)[both]):
                return False
        return True

    def place_still(self, obj: TrackedObject, tries: int = 60) -> None:
        """Put `obj` at one random position for the whole clip, clear of the others."""
        r = float(obj.extent().max())
        lo, hi = self.lo_hi(r)
        for _ in range(tries):
            obj.x[:] = self.rng.uniform(lo, hi)
            obj.y[:] = self.rng.uniform(lo, hi)
            if self.fits(obj):
                return
        raise Retry("no room for a still object")

    # --- events -----------------------------------------------------------------------------------------------
    def event(self, etype: str, obj: TrackedObject | None, start: int, end: int, **attrs: Any) -> None:
        self.events.append({
            "type": etype, "object": None if obj is None else obj.id,
            "start_frame": int(start), "end_frame": int(end),
            "start_s": round(start / self.fps, 3), "end_s": round(end / self.fps, 3), **attrs,
        })

    def frames_apart(self, n: int, lo: int, hi: int, gap: int, tries: int = 200) -> list[int]:
        """n sorted frames in [lo, hi], pairwise at least `gap` apart."""
        if n == 0:
            return []
        for _ in range(tries):
            f = np.sort(self.rng.choice(np.arange(lo, hi + 1), size=n, replace=False)) if hi - lo + 1 >= n else None
            if f is not None and (n == 1 or np.diff(f).min() >= gap):
                return [int(v) for v in f]
        raise Retry(f"cannot fit {n} events {gap} frames apart in [{lo}, {hi}]")
