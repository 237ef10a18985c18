"""Words for clips: naming objects and events, the phrases of a clip's instants, and each object's action.

Everything here reads a clip's ground truth (see `world.py`) and an rng; nothing looks at pixels. Captions
(`captions.py`), open-ended questions (`qa.py`) and the benchmark tasks (`tasks.py`) are written with these words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from data_tools.synth.world import BG_TONES, COLORS, NUM_BOXES, instants

ORDINALS = ("first", "second", "third", "fourth", "fifth")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
TIMES = {1: "once", 2: "twice"}


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


def and_list(items: list[str]) -> str:
    """'a, b and c'."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


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
        return Phrase(subj, "starts", "start", f" moving {direction_words(ev['direction'])}")
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


def direction_words(direction: str) -> str:
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
            return "moves " + direction_words(ev["direction"])
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


__all__ = [
    "ACTIONS", "ANTONYMS", "NUMBER_WORDS", "ORDINALS", "Phrase", "and_list", "article", "bg_noun", "box_ordinal",
    "cap", "count_words", "direction_words", "fake_instants", "false_actions", "instant_key", "instant_phrase",
    "movers", "obj_noun", "object_action", "objects_by_id", "seconds", "stills", "the", "timeline", "unique_texts",
]
