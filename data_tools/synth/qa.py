"""Open-ended questions: every (question, answer) pair a clip's ground truth supports."""

from __future__ import annotations

from typing import Any

import numpy as np

from data_tools.synth.language import (
    NUMBER_WORDS, and_list, article, bg_noun, box_ordinal, cap, count_words, direction_words, movers, obj_noun,
    object_action, seconds, the, timeline, unique_texts,
)
from data_tools.synth.world import NUM_BOXES


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
                   f"{cap(NUMBER_WORDS[len(objs)])}: {and_list([article(obj_noun(o, 0, size=True)) for o in objs])}."))
        qa.append(("How many objects move from one place to another?",
                   "None of them." if not mv else f"{cap(NUMBER_WORDS[len(mv)])}: {and_list([the(o) for o in mv])}."))
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
                qa.append((f"In which direction does {name} move?", cap(direction_words(e["direction"])) + "."))
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
                       cap(direction_words(o["initial_direction"])) + "."))
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
