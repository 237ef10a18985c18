"""The long-video world: minutes of an uneventful scene at low fps with a few "needle" events at known times.

A clip is a still scene (a background and one or two still objects) of 30 s to 10 min at 1 fps by default, in
which 1 to 4 one-off events happen, each at least 2 s clear of the next (Video-NIAH's needles in a long stretch):

- flash: a new object is shown for 2-4 s, then is gone;
- color_change: a still object turns another colour for the rest of the clip;
- move: a new object crosses part of the frame in one direction over 3-5 s, then is gone.

Every clip has at least one flash. The benchmark (MVBench layout: `tasks.json`, `json/<task>.json`, `video/`)
asks what needs the whole video:

| task | question | options |
|---|---|---|
| Needle Object | which object appears for a moment without moving | the flashed object, the scene's still objects, unseen ones |
| Needle Time | when is the flashed object visible | 4 disjoint intervals of its duration, in seconds |
| Event Count | how many times an object appears for a moment without moving | once .. four times |
| Event Order | which of the clip's events happens first | the clip's events (clips with >= 2) |
| Last Event | which of the clip's events happens last | the clip's events (clips with >= 2) |

Answer positions rotate over the options, so each letter is right equally often (to within one) per task.
`grounding_test.json` asks Needle Time as an open question (the answer: the interval, "from 12 s to 15 s"), scored
by temporal IoU (`vlm eval openqa --judge iou`). `--train N` adds N clips of the same world for training, with
`qa_train.json` in the cloze form (every question of a clip answered with the answer's own text; every other clip
asks Needle Time in the open form too).
Clips are drawn by `render.render_clip` from the same ground-truth format as the short world (`meta.jsonl`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_tools.synth.builder import ClipBuilder, Retry
from data_tools.synth.generate import frame_regions
from data_tools.synth.render import render_clip
from data_tools.synth.world import COLORS, DIRECTIONS, SHAPES, sample_background
from vlm.video.encode import write_video

log = logging.getLogger(__name__)

LONG_TASKS = {"Needle Object": "needle_object", "Needle Time": "needle_time", "Event Count": "event_count",
              "Event Order": "event_order", "Last Event": "last_event"}
DURATIONS_S = (30, 60, 120, 300, 600)
COUNT_WORDS = ("once", "twice", "three times", "four times")
OPEN_TIME = " Answer with an interval of seconds."  # Needle Time as an open grounding question


def _hidden(obj: Any) -> None:
    obj.opacity[:] = 0.0


def sample_long_clip(rng: np.random.Generator, seconds: float, fps: float = 1.0, size: int = 128) -> dict[str, Any]:
    """One long clip's ground truth (objects with per-frame tracks, events with frames and seconds)."""
    for _ in range(50):
        try:
            return _try_long_clip(rng, seconds, fps, size)
        except Retry:
            continue
    raise RuntimeError(f"could not lay out a {seconds}s clip")


def _try_long_clip(rng: np.random.Generator, seconds: float, fps: float, size: int) -> dict[str, Any]:
    T = max(8, int(round(seconds * fps)))
    b = ClipBuilder(rng, T, size, fps)
    background = sample_background(rng, size)
    stills = [b.new_object("still") for _ in range(int(rng.integers(1, 3)))]
    for obj in stills:
        b.place_still(obj)
    kinds = ["flash"] + [str(k) for k in rng.choice(["flash", "color_change", "move"], size=int(rng.integers(0, 4)))]
    rng.shuffle(kinds)
    longest = int(np.ceil(5 * fps))
    starts = b.frames_apart(len(kinds), 1, T - longest - 1, gap=longest + int(np.ceil(2 * fps)))
    changed: set[int] = set()
    for kind, start in zip(kinds, starts):
        if kind == "color_change" and len(changed) < len(stills):
            obj = next(o for o in stills if o.id not in changed)
            changed.add(obj.id)
            new = b.new_color()
            before = obj.colors[start]
            obj.colors[start:] = [new] * (T - start)
            b.event("color_change", obj, start, start, from_color=before, to_color=new)
            continue
        obj = b.new_object("needle")
        if kind == "move":
            frames = int(round(rng.uniform(3, 5) * fps))
            direction = str(rng.choice(list(DIRECTIONS)))
            dx, dy = DIRECTIONS[direction]
            r = float(obj.extent().max())
            lo, hi = b.lo_hi(r)
            span = (hi - lo) * 0.6
            x0, y0 = rng.uniform(lo, hi), rng.uniform(lo, hi)
            x0 = x0 if dx == 0 else (lo + 0.1 * (hi - lo) if dx > 0 else hi - 0.1 * (hi - lo))
            y0 = y0 if dy == 0 else (lo + 0.1 * (hi - lo) if dy > 0 else hi - 0.1 * (hi - lo))
            steps = np.linspace(0, span, frames)
            obj.x[:], obj.y[:] = x0, y0
            obj.x[start:start + frames] = x0 + dx * steps
            obj.y[start:start + frames] = y0 + dy * steps
            _hidden(obj)
            obj.opacity[start:start + frames] = 1.0
            if not b.fits(obj):
                raise Retry("a moving needle collides")
            b.event("move", obj, start, start + frames - 1, direction=direction)
        else:
            frames = int(round(rng.uniform(2, 4) * fps))
            _hidden(obj)
            obj.opacity[start:start + frames] = 1.0
            r = float(obj.extent().max())
            lo, hi = b.lo_hi(r)
            for _ in range(60):
                obj.x[:], obj.y[:] = rng.uniform(lo, hi), rng.uniform(lo, hi)
                if b.fits(obj):
                    break
            else:
                raise Retry("no room for a flash")
            b.event("flash", obj, start, start + frames - 1)
    b.events.sort(key=lambda e: e["start_frame"])
    return {"num_frames": T, "fps": fps, "size": size, "duration_s": round(T / fps, 3), "background": background,
            "objects": [o.to_dict() for o in b.objects], "events": b.events}


# ------------------------------------------------------------------------------------------------------------------
# Questions
# ------------------------------------------------------------------------------------------------------------------

def _name(obj: dict[str, Any], frame: int = 0) -> str:
    return f"{obj['track']['color'][frame]} {obj['shape']}"


def describe_event(clip: dict[str, Any], e: dict[str, Any]) -> str:
    obj = clip["objects"][e["object"]]
    if e["type"] == "flash":
        return f"a {_name(obj, e['start_frame'])} appears for a moment"
    if e["type"] == "move":
        return f"a {_name(obj, e['start_frame'])} passes by, moving {e['direction']}"
    return f"the {obj['shape']} turns from {e['from_color']} to {e['to_color']}"


def _interval(a: float, b: float) -> str:
    return f"from {a:.0f} s to {b:.0f} s"


def long_questions(clip: dict[str, Any], rng: np.random.Generator) -> dict[str, tuple[str, str, list[str]]]:
    """task -> (question, answer, distractors) for the tasks that apply to this clip."""
    events, objects = clip["events"], clip["objects"]
    flashes = [e for e in events if e["type"] == "flash"]
    out: dict[str, tuple[str, str, list[str]]] = {}
    needle = objects[flashes[0]["object"]]
    seen = {(o["shape"], c) for o in objects for c in set(o["track"]["color"])}
    unseen = [f"{c} {s}" for c in COLORS for s in SHAPES if (s, c) not in seen]
    stills = [_name(o) for o in objects if o["role"] == "still"]
    others = stills + [str(u) for u in rng.choice(unseen, size=3, replace=False)]
    out["Needle Object"] = ("Which object appears for a moment without moving?", _name(needle, flashes[0]["start_frame"]),
                            others[:3])
    fps, length = clip["fps"], clip["duration_s"]
    s0, s1 = flashes[0]["start_frame"] / fps, (flashes[0]["end_frame"] + 1) / fps
    width = s1 - s0
    slots = [t for t in np.arange(0, length - width + 1e-9, width) if abs(t - s0) >= width]
    if len(slots) >= 3:
        picks = rng.choice(len(slots), size=3, replace=False)
        out["Needle Time"] = (f"When is the {_name(needle, flashes[0]['start_frame'])} visible?", _interval(s0, s1),
                              [_interval(slots[i], slots[i] + width) for i in picks])
    n = len(flashes)
    out["Event Count"] = ("How many times does an object appear for a moment without moving?", COUNT_WORDS[n - 1],
                          [w for w in COUNT_WORDS if w != COUNT_WORDS[n - 1]])
    if len(events) >= 2:
        texts = [describe_event(clip, e) for e in events]
        out["Event Order"] = ("Which of these happens first?", texts[0], texts[1:])
        out["Last Event"] = ("What happens last in the video?", texts[-1], texts[:-1])
    return out


# ------------------------------------------------------------------------------------------------------------------
# Writing a long world
# ------------------------------------------------------------------------------------------------------------------

def generate_long(out: str | Path, num: int, seed: int = 0, *, durations: tuple[float, ...] = DURATIONS_S,
                  fps: float = 1.0, size: int = 128, train: int = 0, progress: bool = True) -> dict[str, Any]:
    """Write `num` long clips (durations cycling through `durations`) and their benchmark under `out`:
    meta.jsonl, regions_test.json (and regions_train.json: per-frame ground truth for word-slot heads, as the
    short world writes), mvbench/{tasks.json, json/<task>.json, video/<id>.mp4}, grounding_test.json (each benchmark clip's
    "when is the needle visible" as an open question whose answer is an interval of seconds, for `vlm eval openqa
    --judge iou`); and `train` more clips drawn from their own
    random stream (videos/<id>.mp4) with `qa_train.json`: each clip's questions in one multi-turn record, answered
    with the answer's own text (the cloze form the short world's qa_train.json has). Same seed, same world."""
    out = Path(out)
    (out / "mvbench" / "json").mkdir(parents=True, exist_ok=True)
    (out / "mvbench" / "video").mkdir(parents=True, exist_ok=True)
    per_task: dict[str, list[dict[str, Any]]] = {t: [] for t in LONG_TASKS}
    metas, records, grounding = [], [], []
    regions: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    jobs = [("test", i, f"l{i:05d}", f"mvbench/video/l{i:05d}.mp4", [seed, 0x10C6, i]) for i in range(num)]
    jobs += [("train", i, f"t{i:05d}", f"videos/t{i:05d}.mp4", [seed, 0x7EA1, i]) for i in range(train)]
    for split, i, cid, video, stream in tqdm(jobs, desc="long clips", disable=not progress):
        rng = np.random.default_rng(stream)
        clip = sample_long_clip(rng, float(durations[i % len(durations)]), fps, size)
        clip = {"id": cid, "split": split, "video": video, **clip}
        (out / video).parent.mkdir(parents=True, exist_ok=True)
        write_video(out / video, render_clip(clip), fps=fps, gop=int(max(1, 10 * fps)))
        metas.append(clip)
        story = "; ".join(f"at {e['start_s']:.0f} s {describe_event(clip, e)}" for e in clip["events"]) + "."
        regions[split].append({"id": f"{cid}_regions", "video": video, "conversations": [
            {"from": "human", "value": "<video>\nWhat happens in the video?"}, {"from": "gpt", "value": story}],
            "regions": frame_regions(clip)})
        questions = long_questions(clip, rng)
        if split == "train":
            conv = []
            for t, task in enumerate(rng.permutation(sorted(questions))):
                question = questions[task][0]
                if task == "Needle Time" and i % 2:  # every other clip asks it as grounding_test.json does
                    question += OPEN_TIME
                question = f"<video>\n{question}" if t == 0 else question
                conv += [{"from": "human", "value": question}, {"from": "gpt", "value": questions[task][1]}]
            records.append({"id": f"{cid}_cloze", "video": video, "conversations": conv})
            continue
        if "Needle Time" in questions:
            question, answer, _ = questions["Needle Time"]
            grounding.append({"id": f"{cid}_when", "video": Path(video).name,
                              "question": question + OPEN_TIME, "answer": answer})
        for task, (question, answer, distractors) in questions.items():
            rows = per_task[task]
            options = [str(d) for d in rng.permutation(distractors)]
            options.insert(len(rows) % (len(options) + 1), answer)  # rotate the answer's position
            rows.append({"video": Path(clip["video"]).name, "question": question, "candidates": options,
                         "answer": answer, "duration_s": clip["duration_s"]})
    (out / "meta.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metas), encoding="utf-8")
    if train:
        (out / "qa_train.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    (out / "grounding_test.json").write_text(json.dumps(grounding, indent=1), encoding="utf-8")
    for split, rows in regions.items():  # per-frame ground truth (`vlm.data.regions`), as the short world writes
        if rows:
            (out / f"regions_{split}.json").write_text(json.dumps(rows), encoding="utf-8")
    manifest = []
    for task, key in LONG_TASKS.items():
        (out / "mvbench" / "json" / f"{key}.json").write_text(json.dumps(per_task[task], indent=1), encoding="utf-8")
        manifest.append({"task": task, "json": f"{key}.json", "prefix": "video/", "data_type": "video", "bound": False})
    (out / "mvbench" / "tasks.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    summary = {"clips": num, "train_clips": train, "seed": seed, "fps": fps, "size": size, "durations_s": list(durations),
               "questions": {t: len(r) for t, r in per_task.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
