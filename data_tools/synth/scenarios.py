"""Sampling one clip: a scenario per class fills a `ClipBuilder`, then `sample_clip` adds a scene change and
checks the instants are apart.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from data_tools.synth.builder import ClipBuilder, Retry, TrackedObject
from data_tools.synth.world import (
    CLASSES, DIRECTIONS, NUM_BOXES, ROTATABLE, background_mean, instants, sample_background,
)


# ------------------------------------------------------------------------------------------------------------------
# Scenarios: one per class; each fills the builder or raises Retry
# ------------------------------------------------------------------------------------------------------------------

def _stills(b: ClipBuilder, n: int) -> None:
    for _ in range(n):
        b.place_still(b.new_object("still"))


def _num_objects(b: ClipBuilder, weights: tuple[float, float, float] = (0.25, 0.45, 0.3)) -> int:
    return int(b.rng.choice([1, 2, 3], p=list(weights)))


def _span(b: ClipBuilder, min_len: int) -> tuple[int, int]:
    """Start/end frames of an action: the whole clip, or starting late and/or stopping early."""
    T = b.T
    mode = str(b.rng.choice(["full", "late", "early", "both"], p=[0.4, 0.2, 0.2, 0.2]))
    s = int(b.rng.integers(2, max(3, T // 3) + 1)) if mode in ("late", "both") else 0
    e = int(b.rng.integers(2 * T // 3, T - 3 + 1)) if mode in ("early", "both") else T - 1
    if e - s < min_len:
        s, e = 0, T - 1
    return s, e


def _move(direction: str) -> Callable[[ClipBuilder], None]:
    def build(b: ClipBuilder) -> None:
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


def _bounce(b: ClipBuilder) -> None:
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


def _color_change(b: ClipBuilder) -> None:
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


def _appear_or_disappear(appear: bool) -> Callable[[ClipBuilder], None]:
    def build(b: ClipBuilder) -> None:
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


def _rotate(b: ClipBuilder) -> None:
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


def _resize(grow: bool) -> Callable[[ClipBuilder], None]:
    def build(b: ClipBuilder) -> None:
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


def _shuffle(b: ClipBuilder) -> None:
    """A ball is shown, covered by one of NUM_BOXES identical boxes, and the boxes swap places in pairs."""
    T, S = b.T, b.S
    rng = b.rng
    ball = TrackedObject(0, "circle", b.new_color(), "small", S, T, "ball")
    ball.radius = 0.055 * S
    box_color = b.new_color()
    slots = S * np.linspace(0.2, 0.8, NUM_BOXES)
    rest_y, half_w, half_h = 0.62 * S, 0.085 * S, 0.1 * S
    lift = 0.32 * S
    boxes = []
    for i in range(NUM_BOXES):
        box = TrackedObject(1 + i, "box", box_color, "large", S, T, "box")
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


SCENARIOS: dict[str, Callable[[ClipBuilder], None]] = {
    "moving left": _move("left"), "moving right": _move("right"), "moving up": _move("up"),
    "moving down": _move("down"), "bouncing": _bounce, "changing color": _color_change,
    "appearing": _appear_or_disappear(True), "disappearing": _appear_or_disappear(False),
    "rotating": _rotate, "growing": _resize(True), "shrinking": _resize(False), "shuffling": _shuffle,
}
assert tuple(SCENARIOS) == CLASSES


# ------------------------------------------------------------------------------------------------------------------
# Entry point: a clip of a given class, sometimes with a change of background
# ------------------------------------------------------------------------------------------------------------------

def _add_scene_change(b: ClipBuilder, bg: dict[str, Any]) -> None:
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


def _check_instants(clip: dict[str, Any], gap: int = 2) -> None:
    frames = [p["frame"] for p in instants(clip)]
    if any(b_ - a < gap for a, b_ in zip(frames, frames[1:])):
        raise Retry("events too close in time")


def sample_clip(rng: np.random.Generator, label: str, num_frames: int, frame_size: int, fps: float,
                scene_change_p: float = 0.25, max_tries: int = 100) -> dict[str, Any]:
    """Sample one clip of class `label`: background, objects with per-frame tracks, events and their timing."""
    if label not in SCENARIOS:
        raise ValueError(f"unknown class {label!r}; known: {CLASSES}")
    if not 8 <= num_frames <= 256:
        raise ValueError(f"num_frames must be in [8, 256], got {num_frames}")
    last: Exception | None = None
    for _ in range(max_tries):
        b = ClipBuilder(rng, num_frames, frame_size, fps)
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
