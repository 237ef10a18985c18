"""The synthetic world: vocabularies, and sampling of one clip's scene and events with exact per-frame ground truth.

A clip is a plain dict (JSON-ready) built by `sample_clip`. Coordinates are pixels, x to the right and y down,
(x, y) is an object's centre; frame k is shown at k / fps seconds. Every object keeps one action type (or none),
shapes are distinct within a clip and no colour is ever worn by two objects of a clip (not even at different
times), so "the red circle" or "the circle" always names one object.
"""

from __future__ import annotations

import math
from typing import Any, Callable

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
MARGIN = 1.0  # px kept between an object and the frame border
GAP = 3.0  # px kept between two visible objects


class Retry(Exception):
    """The sampled layout violated a constraint; sample again."""


class _Obj:
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


class _Builder:
    """Accumulates the objects and events of one clip."""

    def __init__(self, rng: np.random.Generator, num_frames: int, frame_size: int, fps: float):
        self.rng, self.T, self.S, self.fps = rng, num_frames, frame_size, fps
        self.objects: list[_Obj] = []
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

    def new_object(self, role: str, *, shapes: tuple[str, ...] = SHAPES, size: str | None = None) -> _Obj:
        free = [s for s in shapes if s not in self.used_shapes]
        if not free:
            raise Retry("out of shapes")
        shape = str(self.rng.choice(free))
        self.used_shapes.add(shape)
        size = size or str(self.rng.choice(list(SIZES)))
        obj = _Obj(len(self.objects), shape, self.new_color(), size, self.S, self.T, role)
        self.objects.append(obj)
        return obj

    # --- geometry ---------------------------------------------------------------------------------------------
    def lo_hi(self, r: float) -> tuple[float, float]:
        """Range of centre coordinates that keeps a circumradius `r` inside the frame."""
        return r + MARGIN, self.S - r - MARGIN

    def fits(self, obj: _Obj) -> bool:
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

    def place_still(self, obj: _Obj, tries: int = 60) -> None:
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
    def event(self, etype: str, obj: _Obj | None, start: int, end: int, **attrs: Any) -> None:
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


def _add_scene_change(b: _Builder, bg: dict[str, Any]) -> None:
    """Switch to a clearly different background at a random frame (a cut or a short cross-fade)."""
    for _ in range(50):
        new = sample_background(b.rng, b.S)
        if new["name"] != bg["name"] and np.linalg.norm(background_mean(new) - background_mean(bg)) >= 45:
            break
    else:
        return
    fade = int(b.rng.choice([0, 2]))
    f = int(b.rng.integers(max(2, b.T // 4), 3 * b.T // 4 - fade + 1))
    b.extra["background_after"] = new
    b.event("background_change", None, f, f + fade, from_background=bg["name"], to_background=new["name"])


# ------------------------------------------------------------------------------------------------------------------
# Scenarios: one per class; each fills the builder or raises Retry
# ------------------------------------------------------------------------------------------------------------------

def _stills(b: _Builder, n: int) -> None:
    for _ in range(n):
        b.place_still(b.new_object("still"))


def _num_objects(b: _Builder, weights: tuple[float, float, float] = (0.25, 0.45, 0.3)) -> int:
    return int(b.rng.choice([1, 2, 3], p=list(weights)))


def _span(b: _Builder, min_len: int) -> tuple[int, int]:
    """Start/end frames of an action: the whole clip, or starting late and/or stopping early."""
    T = b.T
    mode = str(b.rng.choice(["full", "late", "early", "both"], p=[0.4, 0.2, 0.2, 0.2]))
    s = int(b.rng.integers(2, max(3, T // 3) + 1)) if mode in ("late", "both") else 0
    e = int(b.rng.integers(2 * T // 3, T - 3 + 1)) if mode in ("early", "both") else T - 1
    if e - s < min_len:
        s, e = 0, T - 1
    return s, e


def _move(direction: str) -> Callable[[_Builder], None]:
    def build(b: _Builder) -> None:
        T, S = b.T, b.S
        n = _num_objects(b, (0.2, 0.4, 0.4))
        movers = 1 if n == 1 else int(b.rng.choice(np.arange(1, n + 1), p=[0.45, 0.55] if n == 2 else [0.3, 0.35, 0.35]))
        dx, dy = DIRECTIONS[direction]
        vmax = 0.1 * S  # px per frame
        for _ in range(movers):
            obj = b.new_object("mover")
            r = obj.radius
            lo, hi = b.lo_hi(r)
            for _try in range(60):
                s, e = _span(b, T // 2)
                dmax = min(0.75 * S, hi - lo, vmax * (e - s))
                if dmax < 0.3 * S:
                    raise Retry("no room to move")
                dist = float(b.rng.uniform(0.3 * S, dmax))
                start = b.rng.uniform(lo + dist, hi) if (dx < 0 or dy < 0) else b.rng.uniform(lo, hi - dist)
                across = b.rng.uniform(lo, hi)
                p = np.clip((np.arange(T) - s) / (e - s), 0.0, 1.0)
                along = start + (dx + dy) * dist * p
                obj.x[:], obj.y[:] = (along, across) if dx else (across, along)
                if b.fits(obj):
                    break
            else:
                raise Retry("movers collide")
            b.event("move", obj, s, e, direction=direction, distance_px=round(dist, 1))
            if s > 0:
                b.event("start", obj, s, s, action="move", direction=direction)
            if e < T - 1:
                b.event("stop", obj, e, e, action="move", direction=direction)
        _stills(b, n - movers)
    return build


def _bounce(b: _Builder) -> None:
    T, S = b.T, b.S
    obj = b.new_object("bouncer")
    r = obj.radius
    lo, hi = b.lo_hi(r)
    L = hi - lo
    vmax = 0.16 * S
    # Bounces at integer frames b1, b1 + p, ...: the object touches the wall exactly on a frame.
    # No extra bounce before b1 or after the last one: b1 and the tail are in [2, p - 1].
    options = []
    for count in (1, 2, 3):
        for p in range(max(3, math.ceil(L / vmax)), T):  # p < T: the object travels at least one width
            for b1 in range(2, p):
                tail = T - 1 - b1 - (count - 1) * p
                if 2 <= tail <= p - 1:
                    options.append((count, p, b1))
    if not options:
        raise Retry("no feasible bounce")
    counts = sorted({o[0] for o in options})
    count = int(b.rng.choice(counts))
    count, p, b1 = options[int(b.rng.choice([i for i, o in enumerate(options) if o[0] == count]))]
    v = L / p
    axis = str(b.rng.choice(["x", "y"]))
    walls = ("left", "right") if axis == "x" else ("top", "bottom")
    first = int(b.rng.integers(0, 2))  # index of the first wall hit
    t = np.arange(T)
    phase = np.mod(v * (t - b1), 2 * L)
    from_wall = np.where(phase <= L, phase, 2 * L - phase)
    along = lo + from_wall if first == 0 else hi - from_wall
    across = float(b.rng.uniform(lo, hi))
    obj.x[:], obj.y[:] = (along, across) if axis == "x" else (across, along)
    initial = {("x", 0): "left", ("x", 1): "right", ("y", 0): "up", ("y", 1): "down"}[(axis, first)]
    obj.extra.update(bounces=count, initial_direction=initial, axis=axis)
    for k in range(count):
        f = b1 + k * p
        b.event("bounce", obj, f, f, wall=walls[(first + k) % 2], index=k + 1, count=count)
    if not b.fits(obj):
        raise Retry("bouncer out of frame")
    _stills(b, _num_objects(b, (0.3, 0.45, 0.25)) - 1)


def _color_change(b: _Builder) -> None:
    T = b.T
    n = _num_objects(b)
    changers = [b.new_object("changer") for _ in range(1 if n == 1 else int(b.rng.integers(1, 3)))]
    for obj in changers:
        b.place_still(obj)
    per = [int(b.rng.choice([1, 2], p=[0.6, 0.4])) for _ in changers]
    while sum(per) > 3:
        per[per.index(max(per))] -= 1
    frames = b.frames_apart(sum(per), 2, T - 3, max(3, T // 6))
    owners = [i for i, k in enumerate(per) for _ in range(k)]
    b.rng.shuffle(owners)
    for f, i in zip(frames, owners):
        obj = changers[i]
        old, new = obj.colors[f], b.new_color()
        obj.colors[f:] = [new] * (T - f)
        b.event("color_change", obj, f, f, from_color=old, to_color=new)
    _stills(b, n - len(changers))


def _appear_or_disappear(appear: bool) -> Callable[[_Builder], None]:
    def build(b: _Builder) -> None:
        T = b.T
        n = _num_objects(b)
        count = 1 if n == 1 else int(b.rng.integers(1, 3))
        actors = [b.new_object("appearer" if appear else "disappearer") for _ in range(count)]
        lo, hi = (max(2, T // 5), 2 * T // 3) if appear else (T // 3, 4 * T // 5)
        frames = b.frames_apart(len(actors), lo, hi, max(3, T // 6))
        for obj, f in zip(actors, frames):
            fade = int(b.rng.choice([0, 2]))  # 0: pops in/out at once; 2: fades over three frames
            ramp = np.clip((np.arange(T) - f + 1) / (fade + 1), 0.0, 1.0)
            obj.opacity[:] = ramp if appear else 1.0 - ramp
            b.event("appear" if appear else "disappear", obj, f, f + fade, style="fade" if fade else "pop")
            b.place_still(obj)
        _stills(b, n - len(actors))
    return build


def _rotate(b: _Builder) -> None:
    obj = b.new_object("rotator", shapes=ROTATABLE)
    b.place_still(obj)
    s, e = _span(b, b.T // 2)
    speed = float(b.rng.uniform(5.0, 10.0))  # degrees per frame, below half of every shape's symmetry angle
    direction = str(b.rng.choice(["clockwise", "counterclockwise"]))
    sign = 1.0 if direction == "clockwise" else -1.0
    a0 = float(b.rng.uniform(0, 360))
    obj.angle[:] = np.mod(a0 + sign * speed * np.clip(np.arange(b.T) - s, 0, e - s), 360.0)
    b.event("rotate", obj, s, e, direction=direction, degrees=round(speed * (e - s), 1))
    _stills(b, _num_objects(b, (0.3, 0.45, 0.25)) - 1)


def _resize(grow: bool) -> Callable[[_Builder], None]:
    def build(b: _Builder) -> None:
        obj = b.new_object("grower" if grow else "shrinker", size="small" if grow else "large")
        s, e = _span(b, b.T // 3)
        target = float(b.rng.uniform(1.8, 2.0) if grow else b.rng.uniform(0.4, 0.5))
        obj.scale[:] = 1.0 + (target - 1.0) * np.clip((np.arange(b.T) - s) / (e - s), 0.0, 1.0)
        b.place_still(obj)
        b.event("grow" if grow else "shrink", obj, s, e, from_scale=1.0, to_scale=round(target, 3))
        _stills(b, _num_objects(b, (0.3, 0.45, 0.25)) - 1)
    return build


def _smooth(p: np.ndarray) -> np.ndarray:
    return p * p * (3 - 2 * p)


def _shuffle(b: _Builder) -> None:
    """A ball is shown, covered by one of NUM_BOXES identical boxes, and the boxes swap places in pairs."""
    T, S = b.T, b.S
    rng = b.rng
    ball = _Obj(0, "circle", b.new_color(), "small", S, T, "ball")
    ball.radius = 0.055 * S
    box_color = b.new_color()
    slots = S * np.linspace(0.2, 0.8, NUM_BOXES)
    rest_y, half_w, half_h = 0.62 * S, 0.085 * S, 0.1 * S
    lift = 0.32 * S
    boxes = []
    for i in range(NUM_BOXES):
        box = _Obj(1 + i, "box", box_color, "large", S, T, "box")
        box.radius = half_h
        box.extra.update(width=round(2 * half_w, 2), height=round(2 * half_h, 2))
        box.x[:], box.y[:] = slots[i], rest_y
        boxes.append(box)
    start_slot = int(rng.integers(0, NUM_BOXES))
    final_slot = int(rng.integers(0, NUM_BOXES))  # drawn independently of the start: no shortcut
    shown = int(rng.integers(2, 4))  # frames with the box held up
    lower = 3
    covered = shown + lower  # first frame with the box down
    avail = T - 1 - covered
    max_swaps = min(4, avail // 4)
    if max_swaps < 1:
        raise Retry("clip too short for a shuffle")
    for _ in range(400):
        n_swaps = int(rng.integers(1, max_swaps + 1))
        pairs = [tuple(sorted(int(v) for v in rng.choice(NUM_BOXES, 2, replace=False))) for _ in range(n_swaps)]
        pos = start_slot
        for i, j in pairs:
            pos = j if pos == i else i if pos == j else pos
        if pos == final_slot and any(start_slot in p_ for p_ in pairs):  # the ball's box moves at least once
            break
    else:
        raise Retry("no swap sequence")
    dur = max(3, min(5, avail // n_swaps))
    # Box holding the ball: raised at first, lowered over it.
    holder = boxes[start_slot]
    k = np.arange(T)
    down = _smooth(np.clip((k - shown + 1) / lower, 0.0, 1.0))
    holder.y[:] = rest_y - lift * (1.0 - down)
    ball.x[:] = slots[start_slot]
    ball.y[:] = rest_y + half_h - ball.radius - 2.0
    b.event("cover", ball, shown, covered - 1, box_position=start_slot + 1)
    occupant = list(range(NUM_BOXES))  # occupant[slot] = box index
    ball_slot = start_slot
    f = covered + int(rng.integers(0, avail - n_swaps * dur + 1))  # swaps end by the last frame
    for i, j in pairs:
        a, c = boxes[occupant[i]], boxes[occupant[j]]
        p = _smooth(np.clip((k - f) / dur, 0.0, 1.0))
        arc = np.sin(np.pi * p)
        live = k >= f
        a.x[live] = (slots[i] + (slots[j] - slots[i]) * p)[live]
        a.y[live] = (rest_y - 0.2 * S * arc)[live]
        c.x[live] = (slots[j] + (slots[i] - slots[j]) * p)[live]
        c.y[live] = (rest_y + 0.15 * S * arc)[live]
        occupant[i], occupant[j] = occupant[j], occupant[i]
        b.event("swap", None, f, f + dur, positions=[i + 1, j + 1], ball_moved=ball_slot in (i, j))
        ball_slot = j if ball_slot == i else i if ball_slot == j else ball_slot
        f += dur
    # The ball travels with its box (hidden); GT keeps its position.
    hb = boxes[start_slot]
    ball.x[covered:] = hb.x[covered:]
    ball.y[covered:] = hb.y[covered:] + half_h - ball.radius - 2.0
    box_bottom = hb.y + half_h
    ball.opacity[:] = np.where(box_bottom < ball.y, 1.0, 0.0)  # visible while the box bottom is above its centre
    b.objects = [ball, *boxes]
    b.extra["shuffle"] = {
        "boxes": NUM_BOXES, "ball_color": ball.color, "box_color": box_color,
        "start_position": start_slot + 1, "end_position": final_slot + 1, "swaps": [[i + 1, j + 1] for i, j in pairs],
    }


SCENARIOS: dict[str, Callable[[_Builder], None]] = {
    "moving left": _move("left"), "moving right": _move("right"), "moving up": _move("up"),
    "moving down": _move("down"), "bouncing": _bounce, "changing color": _color_change,
    "appearing": _appear_or_disappear(True), "disappearing": _appear_or_disappear(False),
    "rotating": _rotate, "growing": _resize(True), "shrinking": _resize(False), "shuffling": _shuffle,
}
assert tuple(SCENARIOS) == CLASSES


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


def _check_instants(clip: dict[str, Any], gap: int = 2) -> None:
    frames = [p["frame"] for p in instants(clip)]
    if any(b_ - a < gap for a, b_ in zip(frames, frames[1:])):
        raise Retry("events too close in time")


# ------------------------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------------------------

def sample_clip(rng: np.random.Generator, label: str, num_frames: int, frame_size: int, fps: float,
                scene_change_p: float = 0.25, max_tries: int = 100) -> dict[str, Any]:
    """Sample one clip of class `label`: background, objects with per-frame tracks, events and their timing."""
    if label not in SCENARIOS:
        raise ValueError(f"unknown class {label!r}; known: {CLASSES}")
    if not 8 <= num_frames <= 256:
        raise ValueError(f"num_frames must be in [8, 256], got {num_frames}")
    last: Exception | None = None
    for _ in range(max_tries):
        b = _Builder(rng, num_frames, frame_size, fps)
        try:
            bg = sample_background(rng, frame_size)
            SCENARIOS[label](b)
            if label != "shuffling" and rng.random() < scene_change_p:
                _add_scene_change(b, bg)
            clip = {
                "num_frames": num_frames, "fps": fps, "size": frame_size, "duration_s": round(num_frames / fps, 3),
                "label": label, "label_id": CLASSES.index(label), "background": bg, **b.extra,
                "objects": [o.to_dict() for o in b.objects],
                "events": sorted(b.events, key=lambda e: (e["start_frame"], e["object"] if e["object"] is not None else -1)),
            }
            _check_instants(clip)
            return clip
        except Retry as e:
            last = e
    raise RuntimeError(f"could not sample a '{label}' clip ({num_frames} frames, {frame_size} px): {last}")
