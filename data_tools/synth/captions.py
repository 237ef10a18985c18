"""Captions of a clip: the scene, then every event in temporal order, in several phrasings (plain, timed, one
sentence), read from the ground truth alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_tools.synth.language import (
    NUMBER_WORDS, and_list, article, bg_noun, box_ordinal, cap, count_words, direction_words, movers, obj_noun,
    object_action, objects_by_id, stills, the, timeline,
)
from data_tools.synth.world import NUM_BOXES


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
        out.append((0, and_list(names), ("move " if len(names) > 1 else "moves ") + direction_words(d)))
    for o in clip["objects"]:
        if o.get("initial_direction"):
            out.append((0, the(o), "moves " + direction_words(o["initial_direction"])))
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
    names = and_list([article(obj_noun(o, 0, size=True)) for o in shown])
    verb = "is" if len(shown) == 1 else "are"
    if style == 0:
        return cap(f"{names} {verb} on {bg}.")
    if style == 1:
        return f"On {bg}, there {verb} {names}."
    return f"The video shows {names} on {bg}."


def still_note(clip: dict[str, Any]) -> str:
    st = [o for o in stills(clip) if movers(clip)]
    if not st:
        return ""
    names = and_list([the(o) for o in st])
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
        times = and_list([f"{e['start_s']:.1f}" for e in sw])
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
    return " ".join(s for s in (_intro(clip, style), story) if s) + still_note(clip)


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
    names = and_list([article(obj_noun(o, 0, size=True)) for o in actors])
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
