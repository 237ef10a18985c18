"""The benchmark tasks (modelled on MVBench's): each turns one clip's ground truth into a multiple-choice question.

A task function returns a `Question` (question, answer, three distractors, optional time window) or None when the
clip does not support it. Where the correct option goes (A-D) is decided later, across all items of a task, by
`place_answers`, so positions are balanced.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from data_tools.synth.language import (
    ANTONYMS, Phrase, article, box_ordinal, fake_instants, false_actions, movers, object_action, objects_by_id,
    stills, the, timeline, unique_texts,
)
from data_tools.synth.world import COLORS, NUM_BOXES, SHAPES, background_mean, sample_background

LETTERS = "ABCD"


@dataclass
class Question:
    """A multiple-choice question before its options are ordered."""

    task: str  # task key, e.g. "moving_direction"
    question: str
    answer: str
    distractors: list[str]
    start: float | None = None  # seconds; only for tasks with a time window
    end: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        opts = [self.answer, *self.distractors]
        if len(self.distractors) != 3 or len(set(opts)) != 4:
            raise ValueError(f"{self.task}: need 3 distinct distractors different from the answer, got {opts}")


@dataclass(frozen=True)
class Task:
    name: str  # display name, as in MVBench ("Moving Direction")
    key: str  # file stem ("moving_direction")
    bound: bool  # items carry start/end seconds
    build: Callable[[dict[str, Any], np.random.Generator], Question | None]
    # can the average of all frames answer it? "no" | "partly" (docs/SYNTHETIC.md explains each; the
    # frame-average baseline of scripts/bench_quickstart.py groups tasks by it)
    mean_frame: str = "no"


def _choice(rng: np.random.Generator, items: list[Any]) -> Any:
    return items[int(rng.integers(0, len(items)))]


def _fill(answer: str, preferred: list[str], pool: list[str], rng: np.random.Generator, n: int = 3) -> list[str] | None:
    """n distinct distractors: `preferred` first (in order), then random ones from `pool`; never the answer."""
    out: list[str] = []
    for d in preferred:
        if d != answer and d not in out:
            out.append(d)
        if len(out) == n:
            return out
    rest = [d for d in pool if d != answer and d not in out]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    out += rest[: n - len(out)]
    return out if len(out) == n else None


def _scene_objects(clip: dict[str, Any]) -> list[dict[str, Any]]:
    return [o for o in clip["objects"] if o["role"] not in ("box", "ball")]


# ------------------------------------------------------------------------------------------------------------------
# The tasks
# ------------------------------------------------------------------------------------------------------------------

DIRECTION_OPTIONS = ["left", "right", "up", "down"]


def moving_direction(clip: dict[str, Any], rng: np.random.Generator) -> Question | None:
    """Which way an object moves (or, for a bouncing object, which way it moves at first)."""
    objs = objects_by_id(clip)
    moves = [e for e in clip["events"] if e["type"] == "move"]
    if moves:
        ev = _choice(rng, moves)
        name, answer = the(objs[ev["object"]]), ev["direction"]
        q = _choice(rng, [f"In which direction does {name} move?", f"Which way is {name} moving in the video?",
                          f"What direction does {name} travel in?"])
    else:
        bouncers = [o for o in clip["objects"] if o.get("initial_direction")]
        if not bouncers:
            return None
        o = bouncers[0]
        name, answer = the(o), o["initial_direction"]
        q = f"In which direction is {name} moving at the beginning of the video?"
    return Question("moving_direction", q, answer, [d for d in DIRECTION_OPTIONS if d != answer])


def action_sequence(clip: dict[str, Any], rng: np.random.Generator) -> Question | None:
    """What happens first / last / right after a given event."""
    tl = timeline(clip)
    if len(tl) < 2:
        return None
    uniq = unique_texts(tl)
    text = [p["phrase"].text for p in tl]
    variants: list[tuple[str, int]] = []
    if text[0] in uniq and tl[0]["frame"] < tl[1]["frame"] and tl[0]["kind"] != "cover":  # covering is always first
        variants.append(("first", 0))
    if text[-1] in uniq and tl[-2]["frame"] < tl[-1]["frame"]:
        variants.append(("last", len(tl) - 1))
    for i in range(len(tl) - 1):
        if text[i] in uniq and text[i + 1] in uniq and tl[i]["frame"] < tl[i + 1]["frame"]:
            variants.append(("after", i))
    if not variants:
        return None
    kind, i = _choice(rng, variants)
    if kind == "first":
        q = _choice(rng, ["What happens first in the video?", "Which of these events happens first?"])
        answer, target, preferred = text[0], tl[0], text[1:]
    elif kind == "last":
        q = _choice(rng, ["What happens last in the video?", "Which of these events happens last?"])
        answer, target, preferred = text[-1], tl[-1], text[:-1][::-1]
    else:
        q = _choice(rng, [f"What happens right after {text[i]}?", f"What is the next thing that happens after {text[i]}?"])
        answer, target, preferred = text[i + 1], tl[i + 1], text[:i][::-1]
    preferred = [t for t in preferred if t != answer]
    fakes = fake_instants(clip, rng, 3, like=target, exclude=set(preferred))
    distractors = _fill(answer, preferred[:2], fakes + preferred[2:], rng)
    return None if distractors is None else Question("action_sequence", q, answer, distractors)


def _absent_objects(clip: dict[str, Any], rng: np.random.Generator) -> list[str]:
    """'a red square'-style names of colour/shape pairs no object of the clip ever has, similar ones first."""
    objs = _scene_objects(clip)
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
    objs = _scene_objects(clip)
    T = clip["num_frames"]
    name = lambda o: article(f"{o['track']['color'][0]} {o['shape']}")  # noqa: E731
    arrive = [o for o in objs if not o["track"]["visible"][0] and o["track"]["visible"][T - 1]]
    leave = [o for o in objs if o["track"]["visible"][0] and not o["track"]["visible"][T - 1]]
    steady = [o for o in objs if o["track"]["visible"][0] and o["track"]["visible"][T - 1]]
    absent = _absent_objects(clip, rng)
    variants = ["any"] + ["arrive"] * bool(arrive) + ["leave"] * bool(leave)
    kind = _choice(rng, variants)
    if kind == "any":
        transient = arrive + leave
        target = _choice(rng, transient) if transient else _choice(rng, objs)
        q = _choice(rng, ["Which of the following objects appears in the video at some point?",
                          "Which of these objects can be seen in the video?"])
        preferred: list[str] = []
    else:
        target = _choice(rng, arrive if kind == "arrive" else leave)
        q = ("Which object is visible at the end of the video but not at the start?" if kind == "arrive"
             else "Which object is visible at the start of the video but no longer at the end?")
        preferred = [name(o) for o in steady]
    d = _fill(name(target), preferred[:1], absent[:6], rng)
    return None if d is None else Question("object_existence", q, name(target), d)


def moving_count(clip: dict[str, Any], rng: np.random.Generator) -> Question | None:
    """How many objects change position."""
    if clip["label"] == "shuffling":
        return None
    n = len(movers(clip))
    # Most clips have no mover and most others one: thin those answers out so no count dominates.
    if (n == 0 and rng.random() > 0.3) or (n == 1 and rng.random() > 0.5):
        return None
    q = _choice(rng, ["How many objects move from one place to another in the video?",
                      "How many objects change their position during the video?"])
    return Question("moving_count", q, str(n), [str(k) for k in range(4) if k != n])


def state_change(clip: dict[str, Any], rng: np.random.Generator) -> Question | None:
    """How an object's colour, size or visibility changes over time."""
    objs = _scene_objects(clip)
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
    kind = _choice(rng, sorted(by_type))
    o = _choice(rng, by_type[kind])
    if kind == "color":
        seq = [o["track"]["color"][0]] + [e["to_color"] for e in clip["events"]
                                          if e["type"] == "color_change" and e["object"] == o["id"]]
        others = [c for c in COLORS if c not in seq]
        if len(seq) == 2:
            a, b = seq
            c1, c2 = _choice(rng, others), _choice(rng, others)
            q = _choice(rng, [f"How does the color of the {o['shape']} change?",
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
        q = _choice(rng, ["How many times do the boxes swap places?", "How many swaps of two boxes happen in the video?"])
        return Question("action_count", q, str(n), [str(k) for k in range(1, 5) if k != n])
    if label not in ("bouncing", "changing color"):
        return None
    actors = [o for o in _scene_objects(clip) if object_action(clip, o)]
    st = stills(clip)
    o = _choice(rng, st) if st and rng.random() < 0.2 else _choice(rng, actors)
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
        variants.append((st[0], mv, _choice(rng, ["stays still", "does not move"])))
    if not variants:
        return None
    target, others, desc = _choice(rng, variants)
    attr = _choice(rng, ["color", "shape"])
    value = lambda o: o["track"]["color"][0] if attr == "color" else o["shape"]  # noqa: E731
    pool = list(COLORS) if attr == "color" else list(SHAPES)
    d = _fill(value(target), [value(o) for o in others], pool, rng)
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
    q = _choice(rng, [f"Where is the {sh['ball_color']} ball at the end of the video?",
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
    q = _choice(rng, ["How does the background change in the video?", "Which option describes how the scene changes?"])
    return Question("scene_transition", q, opt(x, y), [opt(y, x), opt(x, others[0]), opt(others[1], y)])


PARTS = ["at the beginning of the video", "in the middle of the video", "at the end of the video",
         "throughout the entire video"]


def action_localization(clip: dict[str, Any], rng: np.random.Generator) -> Question | None:
    """During which part of the clip (beginning / middle / end / throughout) something happens."""
    T = clip["num_frames"]
    objs = objects_by_id(clip)
    by_part: dict[str, list[Phrase]] = {}
    tl = timeline(clip)
    uniq = unique_texts(tl)
    for p in tl:
        if p["phrase"].text not in uniq or p["kind"] == "cover":  # covering the ball always comes first
            continue
        pos = p["frame"] / (T - 1)
        part = PARTS[0] if pos < 0.28 else PARTS[1] if 0.38 <= pos <= 0.62 else PARTS[2] if pos > 0.72 else None
        if part:
            by_part.setdefault(part, []).append(p["phrase"])
    for ev in clip["events"]:
        if ev["start_frame"] == 0 and ev["end_frame"] == T - 1 and ev["type"] in ("move", "rotate", "grow", "shrink"):
            o = objs[ev["object"]]
            direction = ev.get("direction")
            rest = {"move": f" to the {direction}" if direction in ("left", "right") else f" {direction}",
                    "rotate": f" {direction}", "grow": " larger", "shrink": ""}[ev["type"]]
            verb = {"move": "move", "rotate": "rotate", "grow": "grow", "shrink": "shrink"}[ev["type"]]
            by_part.setdefault(PARTS[3], []).append(Phrase(the(o), verb + "s", verb, rest))
    for o in clip["objects"]:
        if o.get("initial_direction"):
            by_part.setdefault(PARTS[3], []).append(Phrase(the(o), "bounces", "bounce", " back and forth"))
    if not by_part:
        return None
    part = _choice(rng, sorted(by_part))
    phrase = _choice(rng, by_part[part])
    q = phrase.question("During which part of the video")
    return Question("action_localization", q, part, [p for p in PARTS if p != part])


def _window_time(frame: int, fps: float, lo: float, hi: float, rng: np.random.Generator) -> float:
    """A round time t with lo <= t * fps <= hi (0.1 s grid if possible, else 0.05 s, else exact)."""
    for step in (0.1, 0.05):
        k0, k1 = math.ceil(lo / fps / step - 1e-9), math.floor(hi / fps / step + 1e-9)
        ks = [k for k in range(k0, k1 + 1) if lo - 1e-9 <= k * step * fps <= hi + 1e-9]
        if ks:
            return round(_choice(rng, ks) * step, 2)
    return round(frame / fps, 3)


def action_window(clip: dict[str, Any], rng: np.random.Generator) -> Question | None:
    """What happens inside a time window [start, end] (s) that holds exactly one event."""
    tl = timeline(clip)
    if len(tl) < 2:
        return None
    T, fps = clip["num_frames"], clip["fps"]
    uniq = unique_texts(tl)
    order = rng.permutation(len(tl))
    for i in order:
        p = tl[int(i)]
        if p["phrase"].text not in uniq:
            continue
        a, b = p["frame"] - 1, p["end"]  # the change is seen between frames a and b
        before = [q["end"] for q in tl if q is not p and q["end"] < a]
        after = [q["frame"] - 1 for q in tl if q is not p and q["frame"] - 1 > b]
        clash = [q for q in tl if q is not p and not (q["end"] < a or q["frame"] - 1 > b)]
        if clash or a < 0:
            continue
        lo_f, hi_f = (max(before) + 1 if before else 0), (min(after) - 1 if after else T - 1)
        # The window holds frames a..b and none of lo_f-1 / hi_f+1, both for a reader that rounds t * fps to a
        # frame index and for one that keeps the frames whose time lies in [start, end].
        start = _window_time(a, fps, max(0.0, lo_f - 0.49), a, rng)
        end = _window_time(b, fps, b, min(T - 1.0, hi_f + 0.49), rng)
        answer = p["phrase"].text
        preferred = [q["phrase"].text for q in tl if q["phrase"].text != answer]
        fakes = fake_instants(clip, rng, 3, like=p, exclude=set(preferred))
        d = _fill(answer, preferred[:2], fakes + preferred[2:], rng)
        if d is None:
            return None
        fmt = lambda t: f"{t:g}"  # noqa: E731
        q = _choice(rng, [f"What happens between {fmt(start)} s and {fmt(end)} s?",
                          f"Which event takes place between second {fmt(start)} and second {fmt(end)} of the video?"])
        return Question("action_window", q, answer, d, start=start, end=end)
    return None


def fine_grained_action(clip: dict[str, Any], rng: np.random.Generator) -> Question | None:
    """What an object does; the opposite action (left/right, appears/disappears, ...) is always an option."""
    actors = [(o, object_action(clip, o)) for o in _scene_objects(clip)]
    actors = [(o, a) for o, a in actors if a]
    if not actors:
        return None
    o, act = _choice(rng, actors)
    false = false_actions(clip, o)
    anti = ANTONYMS.get(act)
    d = _fill(act, [anti] if anti in false else [], false, rng)
    q = _choice(rng, [f"What does {the(o)} do in the video?", f"Which action does {the(o)} perform?"])
    return None if d is None else Question("fine_grained_action", q, act, d, extra={"object": o["id"]})


TASKS: tuple[Task, ...] = (
    Task("Moving Direction", "moving_direction", False, moving_direction),
    Task("Action Sequence", "action_sequence", False, action_sequence),
    Task("Object Existence", "object_existence", False, object_existence, "partly"),
    Task("Moving Count", "moving_count", False, moving_count, "partly"),
    Task("State Change", "state_change", False, state_change),
    Task("Action Count", "action_count", False, action_count),
    Task("Moving Attribute", "moving_attribute", False, moving_attribute, "partly"),
    Task("Object Shuffle", "object_shuffle", False, object_shuffle),
    Task("Scene Transition", "scene_transition", False, scene_transition),
    Task("Action Localization", "action_localization", False, action_localization),
    Task("Action Window", "action_window", True, action_window, "partly"),
    Task("Fine-grained Action", "fine_grained_action", False, fine_grained_action, "partly"),
)
TASKS_BY_KEY = {t.key: t for t in TASKS}


def clip_questions(clip: dict[str, Any], rng: np.random.Generator) -> dict[str, Question]:
    """At most one question per task for a clip, {task key: Question}."""
    out = {}
    for task in TASKS:
        q = task.build(clip, rng)
        if q is not None:
            out[task.key] = q
    return out


class AnswerPlacer:
    """Decides the correct option's position per stream so positions are balanced (max - min count <= 1).

    The k-th question of a stream takes position perm[k % 4] of a permutation drawn per block of 4 from
    default_rng([seed, crc32(stream), block]): the same for any number of worker processes.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.counts: dict[str, int] = {}
        self.histogram: dict[str, dict[str, int]] = {}

    def place(self, stream: str, q: Question, rng: np.random.Generator) -> tuple[list[str], int]:
        """(candidates, answer index): distractors in a random order, answer at the stream's next position."""
        k = self.counts.get(stream, 0)
        self.counts[stream] = k + 1
        perm = np.random.default_rng([self.seed, zlib.crc32(stream.encode()), k // 4]).permutation(4)
        pos = int(perm[k % 4])
        d = [q.distractors[i] for i in rng.permutation(3)]
        cands = d[:pos] + [q.answer] + d[pos:]
        hist = self.histogram.setdefault(stream, {c: 0 for c in LETTERS})
        hist[LETTERS[pos]] += 1
        return cands, pos
