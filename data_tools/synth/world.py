"""The synthetic world: its vocabularies, backgrounds, and the instants of a clip.

A clip is a plain dict (JSON-ready) built by `scenarios.sample_clip`. Coordinates are pixels, x to the right and
y down, (x, y) is an object's centre; frame k is shown at k / fps seconds. Every object keeps one action type (or
none), shapes are distinct within a clip and no colour is ever worn by two objects of a clip (not even at
different times), so "the red circle" or "the circle" always names one object.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
# Shapes with a visible orientation (a rotating circle would look still).
ROTATABLE: tuple[str, ...] = ("square", "triangle", "diamond", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (45, 100, 245),
    "yellow": (245, 225, 40),
    "purple": (165, 70, 220),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "cyan": (40, 215, 225),
}
# Dark, muted background tones: far (RGB distance > 100) from every object colour, so never confusable.
BG_TONES: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 12),
    "dark gray": (62, 62, 64),
    "gray": (112, 112, 114),
    "navy": (18, 26, 86),
    "brown": (98, 60, 28),
    "dark teal": (8, 76, 76),
    "maroon": (92, 14, 36),
    "olive": (76, 82, 18),
}
BG_KINDS: tuple[str, ...] = ("solid", "gradient", "noise", "stripes")
SIZES: dict[str, float] = {"small": 0.06, "large": 0.1}  # circumradius as a fraction of the frame size
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "up": "down", "down": "up"}
# One dominant action per clip; index = label id.
CLASSES: tuple[str, ...] = (
    "moving left", "moving right", "moving up", "moving down", "bouncing", "changing color",
    "appearing", "disappearing", "rotating", "growing", "shrinking", "shuffling",
)
NUM_BOXES = 4  # boxes of the shuffle scenario


# ------------------------------------------------------------------------------------------------------------------
# Backgrounds
# ------------------------------------------------------------------------------------------------------------------

def sample_background(rng: np.random.Generator, frame_size: int) -> dict[str, Any]:
    """A background spec: kind, tones, a readable name ("navy-to-black gradient") and drawing parameters."""
    kind = str(rng.choice(BG_KINDS, p=[0.35, 0.25, 0.2, 0.2]))
    tones = [str(t) for t in rng.choice(list(BG_TONES), size=2, replace=False)]
    bg: dict[str, Any] = {"kind": kind}
    if kind == "solid":
        bg.update(tones=tones[:1], name=tones[0])
    elif kind == "gradient":
        bg.update(tones=tones, name=f"{tones[0]}-to-{tones[1]} gradient",
                  orientation=str(rng.choice(["vertical", "horizontal", "diagonal"])))
    elif kind == "noise":
        bg.update(tones=tones[:1], name=f"noisy {tones[0]}", seed=int(rng.integers(0, 2**31 - 1)), amplitude=9.0)
    else:
        bg.update(tones=tones, name=f"{tones[0]}-and-{tones[1]} striped",
                  orientation=str(rng.choice(["vertical", "horizontal", "diagonal"])),
                  period=round(float(rng.uniform(0.1, 0.2) * frame_size), 1))
    return bg


def background_mean(bg: dict[str, Any]) -> np.ndarray:
    """Approximate mean RGB of a background."""
    return np.mean([BG_TONES[t] for t in bg["tones"]], axis=0)


# ------------------------------------------------------------------------------------------------------------------
# Instants: the point-like happenings of a clip, in time order (what "first / next / between" questions use)
# ------------------------------------------------------------------------------------------------------------------

def instants(clip: dict[str, Any]) -> list[dict[str, Any]]:
    """Point-like events sorted by frame: the instant events plus the late starts / early ends of long actions.

    Each is {"frame", "event" (the event dict), "kind"}: kind is the event type, or "begin_<type>" / "end_<type>"
    for rotations and size changes that start late or stop early.
    """
    T = clip["num_frames"]
    out = []
    for ev in clip["events"]:
        t = ev["type"]
        if t in ("rotate", "grow", "shrink"):
            if ev["start_frame"] > 0:
                out.append({"frame": ev["start_frame"], "event": ev, "kind": f"begin_{t}"})
            if ev["end_frame"] < T - 1:
                out.append({"frame": ev["end_frame"], "event": ev, "kind": f"end_{t}"})
        elif t != "move":
            out.append({"frame": ev["start_frame"], "event": ev, "kind": t})
    out.sort(key=lambda p: (p["frame"], p["event"]["object"] if p["event"]["object"] is not None else -1))
    return out
