"""The benchmark tasks that ask what the objects are and do: direction, existence, counts, state changes,
attributes, the shuffled ball, the background change, fine-grained actions."""

from __future__ import annotations

from typing import Any

import numpy as np

from data_tools.synth.language import (
    ANTONYMS, article, box_ordinal, false_actions, movers, object_action, objects_by_id, stills, the,
)
from data_tools.synth.question import Question, choose, fill_distractors, scene_objects
from data_tools.synth.world import COLORS, NUM_BOXES, SHAPES, background_mean, sample_background


DIRECTION_OPTIONS = ["left", "right", "up", "down"]


def moving_direction(clip: dict[str, Any], rng: np.random.Generator) -> Question | None:
    """Which way an object moves (or, for a bouncing object, which way it moves at first)."""
    objs = objects_by_id(clip)
    moves = [e for e in clip["events"] if e["type"] == "move"]
    if moves:
        ev = choose(rng, moves)
        name, answer = the(objs[ev["object"]]), ev["direction"]
        q = choose(rng, [f"In which direction does {name} move?", f"Which way is {name} moving in the video?",
                         f"What direction does {name} travel in?"])
    else:
        bouncers = [o for o in clip["objects"] if o.get("initial_direction")]
        if not bouncers:
            return None
        o = bouncers[0]
        name, answer = the(o), o["initial_direction"]
        q = f"In which direction is {name} moving at the beginning of the video?"
    return Question("moving_direction", q, answer, [d for d in DIRECTION_OPTIONS if d != answer])


def _absent_objects(clip: dict[str, Any], rng: np.random.Generator) -> list[str]:
    """'a red square'-style names of colour/shape pairs no object of the clip ever has, similar ones first."""
    objs = scene_objects(clip)
    worn = {(c, o["shape"]) for o in objs for c in o["track"]["color"]}
    colors = {c for o in objs for c in o["track"]["color"]}
    shapes = {o["shape"] for o in objs}
    scored = []
    for c in COLORS:
        for s in SHAPES:
            if (c, s) not in worn:
                scored.append(((c in colors) + (s in shapes) + rng.random(), article(f"{c} {s}")))
    scored.sort(key=lambda x: -x[0])
    return [n for _, n in scored]


def object_existence(clip: dict[str, Any], rng: np.random.Generator) -> Question | None:
    """Which object is in the video at some point / arrives / leaves (options never worn by any object are false)."""
    if clip["label"] == "shuffling":
        return None
    objs = scene_objects(clip)
    T = clip["num_frames"]
    name = lambda o: article(f"{o['track']['color'][0]} {o['shape']}")  # noqa: E731
    arrive = [o for o in objs if not o["track"]["visible"][0] and o["track"]["visible"][T - 1]]
    leave = [o for o in objs if o["track"]["visible"][0] and not o["track"]["visible"][T - 1]]
    steady = [o for o in objs if o["track"]["visible"][0] and o["track"]["visible"][T - 1]]
    absent = _absent_objects(clip, rng)
    variants = ["any"] + ["arrive"] * bool(arrive) + ["leave"] * bool(leave)
    kind = choose(rng, variants)
    if kind == "any":
        transient = arrive + leave
        target = choose(rng, transient) if transient else choose(rng, objs)
        q = choose(rng, ["Which of the following objects appears in the video at some point?",
                         "Which of these objects can be seen in the video?"])
        preferred: list[str] = []
    else:
        target = choose(rng, arrive if kind == "arrive" else leave)
        q = ("Which object is visible at the end of the video but not at the start?" if kind == "arrive"
             else "Which object is visible at the start of the video but no longer at the end?")
        preferred = [name(o) for o in steady]
    d = fill_distractors(name(target), preferred[:1], absent[:6], rng)
    return None if d is None else Question("object_existence", q, name(target), d)


def moving_count(clip: dict[str, Any], rng: np.random.Generator) -> Question | None:
    """How many objects change position."""
    if clip["label"] == "shuffling":
        return None
    n = len(movers(clip))
    # Most clips have no mover and most others one: thin those answers out so no count dominates.
    if (n == 0 and rng.random() > 0.3) or (n == 1 and rng.random() > 0.5):
        return None
    q = choose(rng, ["How many objects move from one place to another in the video?",
                     "How many objects change their position during the video?"])
    return Question("moving_count", q, str(n), [str(k) for k in range(4) if k != n])


def state_change(clip: dict[str, Any], rng: np.random.Generator) -> Question | None:
    """How an object's colour, size or visibility changes over time."""
    objs = scene_objects(clip)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for o in objs:
        act = object_action(clip, o)
        if act == "changes color":
            by_type.setdefault("color", []).append(o)
        elif act in ("grows larger", "shrinks"):
            by_type.setdefault("size", []).append(o)
        elif act in ("appears", "disappears"):
            by_type.setdefault("visibility", []).append(o)
    if not by_type:
        return None
    kind = choose(rng, sorted(by_type))
    o = choose(rng, by_type[kind])
    if kind == "color":
        seq = [o["track"]["color"][0]] + [e["to_color"] for e in clip["events"]
                                          if e["type"] == "color_change" and e["object"] == o["id"]]
        others = [c for c in COLORS if c not in seq]
        if len(seq) == 2:
            a, b = seq
            c1, c2 = choose(rng, others), choose(rng, others)
            q = choose(rng, [f"How does the color of the {o['shape']} change?",
                             f"What color change happens to the {o['shape']}?"])
            d = [f"from {b} to {a}", f"from {a} to {c1}", f"from {c2} to {b}"]
            return Question("state_change", q, f"from {a} to {b}", d)
        perms = [p for p in _permutations(seq) if p != seq]
        d = [", then ".join(p) for p in (perms[i] for i in rng.permutation(len(perms))[:3])]
        q = f"Which sequence of colors does the {o['shape']} show, in order?"
        return Question("state_change", q, ", then ".join(seq), d)
    if kind == "size":
        grow = object_action(clip, o) == "grows larger"
        answer = "it gets bigger" if grow else "it gets smaller"
        d = ["it gets smaller" if grow else "it gets bigger", "it stays the same size",
             "it gets bigger, then smaller again" if grow else "it gets smaller, then bigger again"]
        return Question("state_change", f"How does the size of {the(o)} change?", answer, d)
    appear = object_action(clip, o) == "appears"
    answer = "it appears during the video" if appear else "it disappears during the video"
    d = ["it disappears during the video" if appear else "it appears during the video",
         "it stays visible the whole time",
         "it appears, then disappears again" if appear else "it disappears, then appears again"]
    return Question("state_change", f"How does the visibility of {the(o)} change?", answer, d)


def _permutations(seq: list[str]) -> list[list[str]]:
    if len(seq) <= 1:
        return [list(seq)]
    return [[x, *rest] for i, x in enumerate(seq) for rest in _permutations(seq[:i] + seq[i + 1:])]


def action_count(clip: dict[str, Any], rng: np.random.Generator) -> Question | None:
    """How many times something happens: bounces, colour changes, box swaps."""
    label = clip["label"]
    if label == "shuffling":
        n = len(clip["shuffle"]["swaps"])
        q = choose(rng, ["How many times do the boxes swap places?", "How many swaps of two boxes happen in the video?"])
        return Question("action_count", q, str(n), [str(k) for k in range(1, 5) if k != n])
    if label not in ("bouncing", "changing color"):
        return None
    actors = [o for o in scene_objects(clip) if object_action(clip, o)]
    st = stills(clip)
    o = choose(rng, st) if st and rng.random() < 0.2 else choose(rng, actors)
    if label == "bouncing":
        n = sum(e["type"] == "bounce" and e["object"] == o["id"] for e in clip["events"])
        q = f"How many times does {the(o)} bounce off a wall?"
    else:
        n = sum(e["type"] == "color_change" and e["object"] == o["id"] for e in clip["events"])
        q = f"How many times does the {o['shape']} change color?"
    return Question("action_count", q, str(n), [str(k) for k in range(4) if k != n])


def moving_attribute(clip: dict[str, Any], rng: np.random.Generator) -> Question | None:
    """The colour or shape of the one object that moves (or of the one that stays still)."""
    if clip["label"] == "shuffling":
        return None
    mv, st = movers(clip), stills(clip)
    variants = []
    if len(mv) == 1 and st:
        act = object_action(clip, mv[0])
        desc = "bounces off the walls" if act.startswith("bounces") else act
        variants.append((mv[0], st, desc))
    if len(st) == 1 and mv:
        variants.append((st[0], mv, choose(rng, ["stays still", "does not move"])))
    if not variants:
        return None
    target, others, desc = choose(rng, variants)
    attr = choose(rng, ["color", "shape"])
    value = lambda o: o["track"]["color"][0] if attr == "color" else o["shape"]  # noqa: E731
    pool = list(COLORS) if attr == "color" else list(SHAPES)
    d = fill_distractors(value(target), [value(o) for o in others], pool, rng)
    if d is None:
        return None
    return Question("moving_attribute", f"What {attr} is the object that {desc}?", value(target), d)


def object_shuffle(clip: dict[str, Any], rng: np.random.Generator) -> Question | None:
    """Under which box the ball ends up."""
    if clip["label"] != "shuffling":
        return None
    sh = clip["shuffle"]
    opts = [f"under {box_ordinal(k)}" for k in range(1, NUM_BOXES + 1)]
    answer = opts[sh["end_position"] - 1]
    q = choose(rng, [f"Where is the {sh['ball_color']} ball at the end of the video?",
                     "Which box is the ball under when the video ends?"])
    return Question("object_shuffle", q, answer, [o for o in opts if o != answer][:3])


def scene_transition(clip: dict[str, Any], rng: np.random.Generator) -> Question | None:
    """How the background changes (the reversed change is always an option)."""
    after = clip.get("background_after")
    if not after:
        return None
    x, y = clip["background"]["name"], after["name"]
    others: list[str] = []
    for _ in range(500):  # made-up backgrounds clearly unlike both real ones
        z = sample_background(rng, clip["size"])
        far = min(np.linalg.norm(background_mean(z) - background_mean(b)) for b in (clip["background"], after))
        if z["name"] not in (x, y, *others) and far >= 40:
            others.append(z["name"])
            if len(others) == 2:
                break
    else:
        return None
    bg = lambda n: article(f"{n} background")  # noqa: E731
    opt = lambda a, b: f"from {bg(a)} to {bg(b)}"  # noqa: E731
    q = choose(rng, ["How does the background change in the video?", "Which option describes how the scene changes?"])
    return Question("scene_transition", q, opt(x, y), [opt(y, x), opt(x, others[0]), opt(others[1], y)])


def fine_grained_action(clip: dict[str, Any], rng: np.random.Generator) -> Question | None:
    """What an object does; the opposite action (left/right, appears/disappears, ...) is always an option."""
    actors = [(o, object_action(clip, o)) for o in scene_objects(clip)]
    actors = [(o, a) for o, a in actors if a]
    if not actors:
        return None
    o, act = choose(rng, actors)
    false = false_actions(clip, o)
    anti = ANTONYMS.get(act)
    d = fill_distractors(act, [anti] if anti in false else [], false, rng)
    q = choose(rng, [f"What does {the(o)} do in the video?", f"Which action does {the(o)} perform?"])
    return None if d is None else Question("fine_grained_action", q, act, d, extra={"object": o["id"]})
