"""Words for clips: naming objects and events, captions in several phrasings, and open-ended questions.

Everything here reads a clip's ground truth (see `world.py`) and an rng; nothing looks at pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from data_tools.synth.world import BG_TONES, COLORS, NUM_BOXES, instants

ORDINALS = ("first", "second", "third", "fourth", "fifth")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
TIMES = {1: "once", 2: "twice"}

CAPTION_REQUESTS = (
    "Describe what happens in the video.",
    "What is happening in this video?",
    "Give a short description of the video.",
    "Describe the video in one or two sentences.",
    "Summarize the events of this clip in order.",
    "What do you see in this clip? Describe it briefly.",
    "Write a caption for this video.",
    "Explain what the objects in the video do.",
)
MCQ_INSTRUCTIONS = (
    "Answer with the option's letter from the given choices directly.",
    "Answer with the option's letter from the given choices directly.",
    "Only give the best option.",
    "Answer with the letter of the correct option.",
)


# ------------------------------------------------------------------------------------------------------------------
# Naming
# ------------------------------------------------------------------------------------------------------------------

def article(noun: str) -> str:
    """'a' or 'an' + noun."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def obj_noun(obj: dict[str, Any], frame: int = 0, size: bool = False) -> str:
    """'red circle' (colour at `frame`), optionally with its size ('small red circle'); boxes and the ball by role."""
    color = obj["track"]["color"][frame]
    if obj["role"] == "ball":
        return f"{color} ball"
    if obj["role"] == "box":
        return f"{color} box"
    return f"{obj['size']} {color} {obj['shape']}" if size else f"{color} {obj['shape']}"


def the(obj: dict[str, Any], frame: int = 0, size: bool = False) -> str:
    return "the " + obj_noun(obj, frame, size)


def bg_noun(bg: dict[str, Any]) -> str:
    """'a navy-to-black gradient background'."""
    return article(f"{bg['name']} background")


def seconds(frame: int, fps: float) -> str:
    """'1.5 seconds' for a frame index."""
    t = frame / fps
    return f"{t:.1f} seconds"


def box_ordinal(position: int) -> str:
    """'the second box from the left' for a 1-based position."""
    return f"the {ORDINALS[position - 1]} box from the left"


def count_words(n: int) -> str:
    return TIMES.get(n, f"{NUMBER_WORDS[n]} times" if n < len(NUMBER_WORDS) else f"{n} times")


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# ------------------------------------------------------------------------------------------------------------------
# Event phrases
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phrase:
    """A clause 'subject verb rest' that can also be turned into 'when does subject verb-base rest?'."""

    subject: str
    verb: str  # third person: "turns"
    base: str  # base form: "turn"
    rest: str = ""  # " green"
    plural: bool = False

    @property
    def text(self) -> str:
        return f"{self.subject} {self.base if self.plural else self.verb}{self.rest}"

    def predicate(self) -> str:
        return f"{self.base if self.plural else self.verb}{self.rest}"

    def question(self, lead: str) -> str:
        """`lead` + 'does the red circle turn green?' ('When', 'During which part of the video')."""
        return f"{lead} {'do' if self.plural else 'does'} {self.subject} {self.base}{self.rest}?"


def objects_by_id(clip: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {o["id"]: o for o in clip["objects"]}


def instant_phrase(clip: dict[str, Any], kind: str, ev: dict[str, Any]) -> Phrase:
    """The phrase of an instant (see `world.instants`), or of a made-up one built the same way."""
    objs = objects_by_id(clip)
    obj = objs.get(ev["object"]) if ev.get("object") is not None else None
    before = max(0, ev.get("start_frame", 0) - 1)
    subj = the(obj, before) if obj is not None else ""
    if kind == "start":
        return Phrase(subj, "starts", "start", f" moving {_dir_words(ev['direction'])}")
    if kind == "stop":
        return Phrase(subj, "stops", "stop", " moving")
    if kind == "bounce":
        return Phrase(subj, "bounces", "bounce", f" off the {ev['wall']} wall")
    if kind == "color_change":
        subj = f"the {ev['from_color']} {obj['shape']}"
        return Phrase(subj, "turns", "turn", f" {ev['to_color']}")
    if kind == "appear":
        return Phrase(subj, "appears", "appear")
    if kind == "disappear":
        return Phrase(subj, "disappears", "disappear")
    if kind in ("begin_rotate", "begin_grow", "begin_shrink"):
        what = {"begin_rotate": f"rotating {ev.get('direction', 'clockwise')}", "begin_grow": "growing",
                "begin_shrink": "shrinking"}[kind]
        return Phrase(subj, "starts", "start", f" {what}")
    if kind in ("end_rotate", "end_grow", "end_shrink"):
        what = {"end_rotate": "rotating", "end_grow": "growing", "end_shrink": "shrinking"}[kind]
        return Phrase(subj, "stops", "stop", f" {what}")
    if kind == "background_change":
        return Phrase("the background", "changes", "change", f" to {article(ev['to_background'] + ' background')}")
    if kind == "cover":
        box = next(o for o in clip["objects"] if o["role"] == "box")
        return Phrase(the(box), "covers", "cover", f" {the(obj)}")
    if kind == "swap":
        i, j = ev["positions"]
        return Phrase(f"the {ORDINALS[i - 1]} and {ORDINALS[j - 1]} boxes", "swap", "swap", " places", plural=True)
    raise ValueError(f"no phrase for instant kind {kind!r}")


def _dir_words(direction: str) -> str:
    return {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}[direction]


def instant_key(kind: str, ev: dict[str, Any]) -> tuple:
    """What makes two instants 'the same happening' regardless of time (used to keep made-up ones false)."""
    attr = {
        "start": ev.get("direction"), "bounce": ev.get("wall"), "color_change": ev.get("to_color"),
        "background_change": ev.get("to_background"),
        "swap": tuple(ev.get("positions", ())), "begin_rotate": None,
    }.get(kind)
    return kind, ev.get("object"), attr


def timeline(clip: dict[str, Any]) -> list[dict[str, Any]]:
    """The clip's instants with their phrases: [{"frame", "end", "kind", "event", "phrase", "key"}], in time order."""
    out = []
    for p in instants(clip):
        ev = p["event"]
        end = ev["end_frame"] if p["kind"] in ("appear", "disappear", "background_change", "cover", "swap") else p["frame"]
        out.append({**p, "end": end, "phrase": instant_phrase(clip, p["kind"], ev), "key": instant_key(p["kind"], ev)})
    return out


def unique_texts(tl: list[dict[str, Any]]) -> set[str]:
    """Phrase texts that occur exactly once in a timeline."""
    texts = [p["phrase"].text for p in tl]
    return {t for t in texts if texts.count(t) == 1}


def fake_instants(clip: dict[str, Any], rng: np.random.Generator, n: int, *, like: dict[str, Any] | None = None,
                  exclude: set[str] = frozenset()) -> list[str]:
    """Up to n phrases of happenings that do NOT occur in the clip, preferring the kind and object of `like`."""
    T = clip["num_frames"]
    true_keys = {p["key"] for p in timeline(clip)}
    true_texts = {p["phrase"].text for p in timeline(clip)}
    pool: list[tuple[str, dict[str, Any]]] = []
    worn = {c for o in clip["objects"] for c in o["track"]["color"]}
    for obj in clip["objects"]:
        if obj["role"] in ("box", "ball"):
            continue
        act = object_action(clip, obj) or ""
        tr = obj["track"]
        base = {"object": obj["id"], "start_frame": 0}
        for c in COLORS:
            if c not in worn:
                pool.append(("color_change", {**base, "from_color": tr["color"][0], "to_color": c}))
        if not act.startswith(("moves", "bounces")):
            for d in ("left", "right", "up", "down"):
                pool.append(("start", {**base, "direction": d}))
            if not act.startswith(("rotates", "grows", "shrinks")):  # 'stops moving' is too close to those
                pool.append(("stop", base))
        walls = ("left", "right", "top", "bottom")
        if act.startswith("bounces"):
            walls = ("top", "bottom") if obj.get("axis") == "x" else ("left", "right")
        for w in walls:
            pool.append(("bounce", {**base, "wall": w}))
        if tr["visible"][0] and act != "appears":
            pool.append(("appear", base))
        if tr["visible"][T - 1] and act != "disappears":
            pool.append(("disappear", base))
        if not act.startswith("rotates") and obj["shape"] != "circle":
            pool.append(("begin_rotate", {**base, "direction": str(rng.choice(["clockwise", "counterclockwise"]))}))
        if act not in ("grows larger", "shrinks"):
            pool.append(("begin_grow", base))
            pool.append(("begin_shrink", base))
    if clip["label"] == "shuffling":
        for i in range(1, NUM_BOXES + 1):
            for j in range(i + 1, NUM_BOXES + 1):
                pool.append(("swap", {"object": None, "positions": [i, j]}))
    else:
        used = set(clip["background"]["tones"]) | set(clip.get("background_after", {}).get("tones", []))
        for tone in BG_TONES:
            if tone not in used:
                pool.append(("background_change", {"object": None, "to_background": tone}))
    scored = []
    for kind, ev in pool:
        if instant_key(kind, ev) in true_keys:
            continue
        text = instant_phrase(clip, kind, ev).text
        if text in true_texts or text in exclude:
            continue
        score = 0.0
        if like is not None:
            score += 2.0 * (kind == like["kind"]) + 1.0 * (ev.get("object") == like["event"].get("object"))
        scored.append((score + rng.random(), text))
    scored.sort(key=lambda s: -s[0])
    out: list[str] = []
    for _, text in scored:
        if text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out


# ------------------------------------------------------------------------------------------------------------------
# Actions (one per object)
# ------------------------------------------------------------------------------------------------------------------

ACTIONS: tuple[str, ...] = (
    "moves to the left", "moves to the right", "moves up", "moves down", "bounces back and forth between two walls",
    "changes color", "appears", "disappears", "rotates clockwise", "rotates counterclockwise", "grows larger", "shrinks",
)
ANTONYMS: dict[str, str] = {
    "moves to the left": "moves to the right", "moves to the right": "moves to the left", "moves up": "moves down",
    "moves down": "moves up", "appears": "disappears", "disappears": "appears", "grows larger": "shrinks",
    "shrinks": "grows larger", "rotates clockwise": "rotates counterclockwise",
    "rotates counterclockwise": "rotates clockwise",
}


def object_action(clip: dict[str, Any], obj: dict[str, Any]) -> str | None:
    """The one action an object performs, as a phrase from ACTIONS (None for still objects, boxes and the ball)."""
    for ev in clip["events"]:
        if ev.get("object") != obj["id"]:
            continue
        t = ev["type"]
        if t == "move":
            return "moves " + _dir_words(ev["direction"])
        if t == "bounce":
            return ACTIONS[4]
        if t == "color_change":
            return "changes color"
        if t in ("appear", "disappear"):
            return t + "s"
        if t == "rotate":
            return f"rotates {ev['direction']}"
        if t == "grow":
            return "grows larger"
        if t == "shrink":
            return "shrinks"
    return None


def false_actions(clip: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """Actions that are certainly untrue of `obj` (a bouncer does move along its axis, so those are left out)."""
    true = object_action(clip, obj)
    out = [a for a in ACTIONS if a != true]
    if obj.get("axis") == "x":
        out = [a for a in out if a not in ("moves to the left", "moves to the right")]
    elif obj.get("axis") == "y":
        out = [a for a in out if a not in ("moves up", "moves down")]
    if obj["shape"] == "circle":
        out = [a for a in out if not a.startswith("rotates")]
    return out


def movers(clip: dict[str, Any]) -> list[dict[str, Any]]:
    """Objects that change position (move or bounce); never the shuffle boxes."""
    ids = {e["object"] for e in clip["events"] if e["type"] in ("move", "bounce")}
    return [o for o in clip["objects"] if o["id"] in ids and o["role"] not in ("box", "ball")]


def stills(clip: dict[str, Any]) -> list[dict[str, Any]]:
    """Objects that do nothing at all."""
    return [o for o in clip["objects"] if o["role"] == "still"]


# ------------------------------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------------------------------

def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _clauses(clip: dict[str, Any]) -> list[tuple[int, str, str]]:
    """(frame, subject, predicate) of everything that happens, in time order; spans from frame 0 come first."""
    objs = objects_by_id(clip)
    out: list[tuple[int, str, str]] = []
    # Actions under way from the first frame.
    moving0: dict[str, list[str]] = {}
    for ev in clip["events"]:
        if ev["start_frame"] != 0 or ev.get("object") is None:
            continue
        obj = objs[ev["object"]]
        if ev["type"] == "move":
            moving0.setdefault(ev["direction"], []).append(the(obj))
        elif ev["type"] == "rotate":
            out.append((0, the(obj), f"rotates {ev['direction']}"))
        elif ev["type"] in ("grow", "shrink"):
            out.append((0, the(obj), "grows larger" if ev["type"] == "grow" else "shrinks"))
    for d, names in moving0.items():
        out.append((0, _join(names), ("move " if len(names) > 1 else "moves ") + _dir_words(d)))
    for o in clip["objects"]:
        if o.get("initial_direction"):
            out.append((0, the(o), "moves " + _dir_words(o["initial_direction"])))
    for p in timeline(clip):
        ph = p["phrase"]
        kind, ev = p["kind"], p["event"]
        if kind == "appear":
            obj = objs[ev["object"]]
            out.append((p["frame"], article(obj_noun(obj, p["frame"], size=True)),
                        "fades in" if ev["style"] == "fade" else "appears"))
        elif kind == "disappear":
            out.append((p["frame"], ph.subject, "fades out" if ev["style"] == "fade" else "disappears"))
        else:
            out.append((p["frame"], ph.subject, ph.predicate()))
    out.sort(key=lambda c: c[0])
    return out


def _narrate(clauses: list[tuple[int, str, str]], style: int) -> str:
    """Clauses joined in time order; a repeated subject becomes 'it'."""
    parts = []
    prev = None
    for _, subj, pred in clauses:
        parts.append(f"it {pred}" if subj == prev else f"{subj} {pred}")
        prev = subj
    if not parts:
        return ""
    if len(parts) == 1:
        return cap(parts[0]) + "."
    if style == 0:
        mid = "".join(f", then {p}" for p in parts[1:-1])
        last = f", and finally {parts[-1]}" if len(parts) > 2 else f", then {parts[-1]}"
        return cap(parts[0]) + mid + last + "."
    if style == 1:
        mid = "".join(f" Then {p}." for p in parts[1:-1])
        return f"First, {parts[0]}.{mid} Finally, {parts[-1]}." if len(parts) > 2 else f"First, {parts[0]}. Then {parts[1]}."
    return cap(parts[0]) + "." + "".join(f" After that, {p}." for p in parts[1:])


def _intro(clip: dict[str, Any], style: int) -> str:
    bg = bg_noun(clip["background"])
    shown = [o for o in clip["objects"] if o["track"]["visible"][0] and o["role"] not in ("box", "ball")]
    if not shown:
        return f"The video starts with {bg} and no objects."
    names = _join([article(obj_noun(o, 0, size=True)) for o in shown])
    verb = "is" if len(shown) == 1 else "are"
    if style == 0:
        return cap(f"{names} {verb} on {bg}.")
    if style == 1:
        return f"On {bg}, there {verb} {names}."
    return f"The video shows {names} on {bg}."


def _still_note(clip: dict[str, Any]) -> str:
    st = [o for o in stills(clip) if movers(clip)]
    if not st:
        return ""
    names = _join([the(o) for o in st])
    return f" {cap(names)} {'stays' if len(st) == 1 else 'stay'} still."


def _shuffle_caption(clip: dict[str, Any], style: int, timed: bool = False) -> str:
    sh = clip["shuffle"]
    bg = bg_noun(clip["background"])
    n = len(sh["swaps"])
    ball = f"{sh['ball_color']} ball"
    start, end = box_ordinal(sh["start_position"]), box_ordinal(sh["end_position"])
    swaps = "once" if n == 1 else f"{NUMBER_WORDS[n]} times"
    if timed:
        sw = [e for e in clip["events"] if e["type"] == "swap"]
        times = _join([f"{e['start_s']:.1f}" for e in sw])
        return (f"On {bg}, {article(ball)} is placed under {start} of {NUMBER_WORDS[NUM_BOXES]} {sh['box_color']} boxes. "
                f"The boxes swap places at {times} seconds, and the ball ends up under {end}.")
    if style == 1:
        return (f"{cap(article(ball))} is hidden under one of {NUMBER_WORDS[NUM_BOXES]} identical {sh['box_color']} "
                f"boxes on {bg}: it starts under {start}. After the boxes swap places {swaps}, the ball is under {end}.")
    return (f"{cap(article(ball))} sits on {bg} under {start} of {NUMBER_WORDS[NUM_BOXES]} {sh['box_color']} boxes. "
            f"The box is lowered over the ball, then the boxes swap places {swaps}. At the end, the ball is under {end}.")


def caption(clip: dict[str, Any], style: int = 0) -> str:
    """A full caption: the scene, then every event in temporal order (style 0-2 vary the phrasing)."""
    if clip["label"] == "shuffling":
        return _shuffle_caption(clip, style)
    story = _narrate(_clauses(clip), style)
    return " ".join(s for s in (_intro(clip, style), story) if s) + _still_note(clip)


def timed_caption(clip: dict[str, Any]) -> str:
    """A caption that states when each instant happens."""
    if clip["label"] == "shuffling":
        return _shuffle_caption(clip, 0, timed=True)
    parts = []
    for frame, subj, pred in _clauses(clip):
        when = "From the start" if frame == 0 else f"At {frame / clip['fps']:.1f} seconds"
        parts.append(f"{when}, {subj} {pred}.")
    return " ".join([_intro(clip, 0), *parts])


def short_caption(clip: dict[str, Any]) -> str:
    """One sentence about the dominant action only."""
    label = clip["label"]
    if label == "shuffling":
        ball = article(f"{clip['shuffle']['ball_color']} ball")
        return f"{cap(ball)} is hidden under one of {NUMBER_WORDS[NUM_BOXES]} boxes that are shuffled."
    actors = [o for o in clip["objects"] if object_action(clip, o)]
    if label == "bouncing":
        o = actors[0]
        return f"{cap(article(obj_noun(o, 0, size=True)))} bounces off the walls {count_words(o['bounces'])}."
    if label == "changing color":
        n = sum(e["type"] == "color_change" for e in clip["events"])
        who = "An object" if len(actors) == 1 else f"{cap(NUMBER_WORDS[len(actors)])} objects"
        return f"{who} {'changes' if len(actors) == 1 else 'change'} color {count_words(n)} in total."
    names = _join([article(obj_noun(o, 0, size=True)) for o in actors])
    act = object_action(clip, actors[0])
    if len(actors) > 1:
        act = {"moves": "move", "appears": "appear", "disappears": "disappear"}.get(act.split()[0], act.split()[0]) + \
            act[len(act.split()[0]):]
    return cap(f"{names} {act}.")


def retrieval_captions(clip: dict[str, Any], rng: np.random.Generator) -> list[str]:
    """Several distinct captions of one clip: two narrative phrasings, a timed one and a one-sentence summary."""
    styles = rng.permutation(3)[:2]
    out = []
    for c in (caption(clip, int(styles[0])), caption(clip, int(styles[1])), timed_caption(clip), short_caption(clip)):
        if c not in out:
            out.append(c)
    return out


# ------------------------------------------------------------------------------------------------------------------
# Open-ended questions
# ------------------------------------------------------------------------------------------------------------------

def open_questions(clip: dict[str, Any], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Every open-ended (question, answer) pair the ground truth supports for this clip."""
    fps = clip["fps"]
    qa: list[tuple[str, str]] = []
    objs = [o for o in clip["objects"] if o["role"] not in ("box", "ball")]
    mv = movers(clip)
    if clip["label"] == "shuffling":
        sh = clip["shuffle"]
        n = len(sh["swaps"])
        qa += [
            ("Under which box is the ball at the end of the video?", cap(f"Under {box_ordinal(sh['end_position'])}.")),
            ("Where is the ball hidden when the video ends?", cap(f"It is under {box_ordinal(sh['end_position'])}.")),
            ("Under which box is the ball placed at the beginning?", cap(f"Under {box_ordinal(sh['start_position'])}.")),
            ("How many times do the boxes swap places?", f"{cap(count_words(n))}."),
            ("What color is the ball?", f"It is {sh['ball_color']}."),
            ("How many boxes are there?", f"There are {NUMBER_WORDS[NUM_BOXES]} {sh['box_color']} boxes."),
        ]
    else:
        qa.append(("How many objects are there in the video?",
                   f"{cap(NUMBER_WORDS[len(objs)])}: {_join([article(obj_noun(o, 0, size=True)) for o in objs])}."))
        qa.append(("How many objects move from one place to another?",
                   "None of them." if not mv else f"{cap(NUMBER_WORDS[len(mv)])}: {_join([the(o) for o in mv])}."))
        if clip.get("background_after"):
            ev = next(e for e in clip["events"] if e["type"] == "background_change")
            qa.append(("Does the background change during the video?",
                       f"Yes. It changes from {bg_noun(clip['background'])} to {bg_noun(clip['background_after'])} "
                       f"at about {seconds(ev['start_frame'], fps)}."))
        else:
            qa.append(("What does the background look like?",
                       f"It is {bg_noun(clip['background'])}, and it does not change."))
    for o in objs:
        act = object_action(clip, o)
        evs = [e for e in clip["events"] if e.get("object") == o["id"]]
        name = the(o)
        if act is None:
            qa.append((f"What does {name} do?", "It stays still the whole time."))
            continue
        qa.append((f"What does {name} do in the video?", f"It {act}."))
        for e in evs:
            if e["type"] == "move":
                qa.append((f"In which direction does {name} move?", cap(_dir_words(e["direction"])) + "."))
            elif e["type"] == "start":
                qa.append((f"When does {name} start moving?", f"At about {seconds(e['start_frame'], fps)}."))
            elif e["type"] == "stop":
                qa.append((f"Does {name} keep moving until the end?",
                           f"No, it stops at about {seconds(e['start_frame'], fps)}."))
            elif e["type"] == "rotate":
                qa.append((f"Which way does {name} rotate?", cap(e["direction"]) + "."))
            elif e["type"] in ("grow", "shrink"):
                qa.append((f"Does {name} get bigger or smaller?",
                           "It gets bigger." if e["type"] == "grow" else "It gets smaller."))
            elif e["type"] == "appear":
                how = "fades in" if e["style"] == "fade" else "appears"
                qa.append((f"Is {name} visible at the start of the video?",
                           f"No, it {how} at about {seconds(e['start_frame'], fps)}."))
            elif e["type"] == "disappear":
                how = "fades out" if e["style"] == "fade" else "disappears"
                qa.append((f"Is {name} still visible at the end of the video?",
                           f"No, it {how} at about {seconds(e['start_frame'], fps)}."))
        if act.startswith("bounces"):
            walls = [e["wall"] for e in evs if e["type"] == "bounce"]
            qa.append((f"How many times does {name} bounce off a wall?", f"{cap(count_words(len(walls)))}."))
            qa.append((f"Which wall does {name} hit first?", f"The {walls[0]} wall."))
            qa.append((f"In which direction is {name} moving at the beginning?",
                       cap(_dir_words(o["initial_direction"])) + "."))
        if act == "changes color":
            colors = [o["track"]["color"][0]] + [e["to_color"] for e in evs if e["type"] == "color_change"]
            shape = f"the {o['shape']}"
            qa.append((f"What color is {shape} at the end of the video?", f"{cap(colors[-1])}."))
            qa.append((f"How does the color of {shape} change?", cap(", then ".join(colors)) + "."))
            qa.append((f"How many times does {shape} change color?", f"{cap(count_words(len(colors) - 1))}."))
    tl = timeline(clip)
    uniq = unique_texts(tl)
    if len(tl) >= 2:
        if tl[0]["phrase"].text in uniq and tl[0]["frame"] < tl[1]["frame"]:
            qa.append(("What happens first in the video?", cap(tl[0]["phrase"].text) + "."))
        if tl[-1]["phrase"].text in uniq and tl[-2]["frame"] < tl[-1]["frame"]:
            qa.append(("What is the last thing that happens?", cap(tl[-1]["phrase"].text) + "."))
        i = int(rng.integers(0, len(tl) - 1))
        if tl[i]["phrase"].text in uniq and tl[i + 1]["phrase"].text in uniq:
            qa.append((f"What happens right after {tl[i]['phrase'].text}?", cap(tl[i + 1]["phrase"].text) + "."))
    for p in tl:
        if p["phrase"].text in uniq:
            qa.append((p["phrase"].question("When"), f"At about {seconds(p['frame'], fps)}."))
    return qa


# ------------------------------------------------------------------------------------------------------------------
# Multiple-choice text
# ------------------------------------------------------------------------------------------------------------------

def format_mcq(question: str, candidates: list[str], style: int = 0, instruction: str = MCQ_INSTRUCTIONS[0]) -> str:
    """The multiple-choice prompt in the benchmark's style: question, '(A) ...' lines, an instruction."""
    options = "\n".join(f"({'ABCDEFGH'[i]}) {c}" for i, c in enumerate(candidates))
    if style == 0:
        return f"Question: {question}\nOptions:\n{options}\n{instruction}"
    return f"{question}\n{options}\n{instruction}"


def with_video(text: str, video_first: bool) -> str:
    """Put the single <video> placeholder at the start or the end of the first human turn."""
    return f"<video>\n{text}" if video_first else f"{text}\n<video>"


__all__ = [
    "ACTIONS", "ANTONYMS", "CAPTION_REQUESTS", "MCQ_INSTRUCTIONS", "Phrase", "article", "bg_noun", "box_ordinal",
    "cap", "caption", "count_words", "fake_instants", "false_actions", "format_mcq", "instant_phrase", "movers",
    "obj_noun", "object_action", "open_questions", "retrieval_captions", "short_caption", "stills", "the", "timeline",
    "timed_caption", "unique_texts", "with_video",
]
