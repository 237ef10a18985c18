"""The benchmark tasks that ask when things happen: their order, the part of the video, a time window."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from data_tools.synth.language import Phrase, fake_instants, objects_by_id, the, timeline, unique_texts
from data_tools.synth.question import Question, choose, fill_distractors


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
    kind, i = choose(rng, variants)
    if kind == "first":
        q = choose(rng, ["What happens first in the video?", "Which of these events happens first?"])
        answer, target, preferred = text[0], tl[0], text[1:]
    elif kind == "last":
        q = choose(rng, ["What happens last in the video?", "Which of these events happens last?"])
        answer, target, preferred = text[-1], tl[-1], text[:-1][::-1]
    else:
        q = choose(rng, [f"What happens right after {text[i]}?", f"What is the next thing that happens after {text[i]}?"])
        answer, target, preferred = text[i + 1], tl[i + 1], text[:i][::-1]
    preferred = [t for t in preferred if t != answer]
    fakes = fake_instants(clip, rng, 3, like=target, exclude=set(preferred))
    distractors = fill_distractors(answer, preferred[:2], fakes + preferred[2:], rng)
    return None if distractors is None else Question("action_sequence", q, answer, distractors)


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
    part = choose(rng, sorted(by_part))
    phrase = choose(rng, by_part[part])
    q = phrase.question("During which part of the video")
    return Question("action_localization", q, part, [p for p in PARTS if p != part])


def _window_time(frame: int, fps: float, lo: float, hi: float, rng: np.random.Generator) -> float:
    """A round time t with lo <= t * fps <= hi (0.1 s grid if possible, else 0.05 s, else exact)."""
    for step in (0.1, 0.05):
        k0, k1 = math.ceil(lo / fps / step - 1e-9), math.floor(hi / fps / step + 1e-9)
        ks = [k for k in range(k0, k1 + 1) if lo - 1e-9 <= k * step * fps <= hi + 1e-9]
        if ks:
            return round(choose(rng, ks) * step, 2)
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
        d = fill_distractors(answer, preferred[:2], fakes + preferred[2:], rng)
        if d is None:
            return None
        fmt = lambda t: f"{t:g}"  # noqa: E731
        q = choose(rng, [f"What happens between {fmt(start)} s and {fmt(end)} s?",
                         f"Which event takes place between second {fmt(start)} and second {fmt(end)} of the video?"])
        return Question("action_window", q, answer, d, start=start, end=end)
    return None
