"""Generating a synthetic dataset: clips in parallel workers, then the data files written by the parent.

Each clip is made from `numpy.random.default_rng([seed, clip_index])` alone (its class and split come from the
seed and index too), and everything that spans clips (answer positions, file order) is decided in the parent in
clip order, so the output is the same for any number of workers.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_tools.synth.captions import caption, retrieval_captions
from data_tools.synth.prompts import CAPTION_REQUESTS, MCQ_INSTRUCTIONS, format_mcq, with_video
from data_tools.synth.qa import open_questions
from data_tools.synth.render import render_clip
from data_tools.synth.scenarios import sample_clip
from data_tools.synth.tasks import TASKS, TASKS_BY_KEY, AnswerPlacer, Question, clip_questions
from data_tools.synth.world import CLASSES, SIZES
from vlm.video.encode import write_video

log = logging.getLogger(__name__)

VIDEO_DIRS = {"train": "videos", "test": "mvbench/video"}
FORMAT_VERSION = 4  # 2: per-frame scene words follow a background change and name its second tone and pattern;
                    # 3: per-frame objects carry a size word; 4: at a bounce an object moves (the way it leaves)


def clip_id(index: int) -> str:
    return f"c{index:06d}"


def split_of(index: int, eval_fraction: float) -> str:
    """'test' for exactly floor(n * eval_fraction) of the first n clips, spread evenly; a function of the index only."""
    f = Fraction(eval_fraction).limit_denominator(10_000)
    return "test" if int((index + 1) * f) > int(index * f) else "train"


def class_of(index: int, seed: int, eval_fraction: float) -> str:
    """The clip's class: within each split, classes come in shuffled blocks of len(CLASSES), so both splits
    hold every class equally often (to within one)."""
    f = Fraction(eval_fraction).limit_denominator(10_000)
    split = split_of(index, eval_fraction)
    rank = int(index * f) if split == "test" else index - int(index * f)  # position of the clip within its split
    n = len(CLASSES)
    perm = np.random.default_rng([seed, 0xC1A55, split == "test", rank // n]).permutation(n)
    return CLASSES[int(perm[rank % n])]


# ------------------------------------------------------------------------------------------------------------------
# Worker: one clip
# ------------------------------------------------------------------------------------------------------------------

def _question_dict(q: Question) -> dict[str, Any]:
    return {"task": q.task, "question": q.question, "answer": q.answer, "distractors": q.distractors,
            "start": q.start, "end": q.end}


def _conversation_plan(clip: dict[str, Any], caption_text: str, qa: list[tuple[str, str]],
                       questions: dict[str, Question], rng: np.random.Generator) -> list[dict[str, Any]]:
    """Instruction records of one clip, as turn lists; an MCQ turn names its task and is rendered by the parent."""

    def mcq_turn(key: str) -> dict[str, Any]:
        return {"mcq": key, "style": int(rng.integers(0, 2)), "instruction": str(rng.choice(MCQ_INSTRUCTIONS))}

    records: list[dict[str, Any]] = []
    order = rng.permutation(len(qa)) if qa else []
    picks = [qa[int(i)] for i in order]
    keys = [str(k) for k in rng.permutation(sorted(questions))] if questions else []
    if picks:
        records.append({"kind": "qa", "turns": [{"q": picks[0][0], "a": picks[0][1]}]})
    for key in keys[:2]:
        records.append({"kind": "mcq", "turns": [mcq_turn(key)]})
    if rng.random() < 0.4 and len(picks) >= 2:
        turns: list[dict[str, Any]] = [{"q": str(rng.choice(CAPTION_REQUESTS)), "a": caption_text}]
        turns += [{"q": q, "a": a} for q, a in picks[1:1 + int(rng.integers(1, 3))]]
        if len(keys) > 2:
            turns.append(mcq_turn(keys[2]))
        records.append({"kind": "multi", "turns": turns})
    for r in records:
        r["video_first"] = bool(rng.random() < 0.7)
    return records


def more_questions(clip: dict[str, Any], questions: dict[str, Question], index: int, seed: int,
                   extra: dict[str, int], tries: int = 8) -> dict[str, Question]:
    """Up to `extra[task]` more questions of each task for a training clip, each with an answer that no question of
    that task already asked of the clip has: {"<task>+<n>": Question}. They come from their own random stream
    ([seed, index, 0xE47A, task, try]), so the clip and its first questions are the same with or without them."""
    out: dict[str, Question] = {}
    for key, limit in extra.items():
        task, n = TASKS_BY_KEY[key], 0
        asked = {questions[key].answer} if key in questions else set()
        for t in range(tries):
            if n == limit:
                break
            q = task.build(clip, np.random.default_rng([seed, index, 0xE47A, TASKS.index(task), t]))
            if q is not None and q.answer not in asked:
                asked.add(q.answer)
                n += 1
                out[f"{key}+{n}"] = q
    return out


def make_clip(job: tuple[int, int, int, int, float, float, str, dict[str, int]]) -> dict[str, Any]:
    """Sample, render, encode and describe clip `index`; returns its metadata and raw language material."""
    index, seed, frames, size, fps, eval_fraction, out, extra = job
    rng = np.random.default_rng([seed, index])
    cid, split = clip_id(index), split_of(index, eval_fraction)
    video = f"{VIDEO_DIRS[split]}/{cid}.mp4"
    try:
        clip = sample_clip(rng, class_of(index, seed, eval_fraction), frames, size, fps)
        write_video(Path(out) / video, render_clip(clip), fps, reproducible=True)  # the same bytes in any worker
    except Exception as e:  # name the clip: a worker's traceback alone does not say which one
        raise RuntimeError(f"{Path(out) / video}: clip {cid} (seed {seed}) failed: {e}") from e
    style = int(rng.integers(0, 3))
    main_caption = caption(clip, style)
    retrieval = retrieval_captions(clip, rng)
    qa = open_questions(clip, rng)
    questions = clip_questions(clip, rng)
    plan = _conversation_plan(clip, main_caption, qa, questions, rng)
    more = more_questions(clip, questions, index, seed, extra) if split == "train" and extra else {}
    meta = {"id": cid, "index": index, "split": split, "video": video, **clip, "caption": main_caption}
    return {
        "index": index, "id": cid, "split": split, "video": video, "meta": meta,
        "caption_request": {"text": str(rng.choice(CAPTION_REQUESTS)), "video_first": bool(rng.random() < 0.7)},
        "caption": main_caption, "retrieval": retrieval, "plan": plan,
        "questions": {k: _question_dict(q) for k, q in questions.items()},
        "extra_questions": {k: _question_dict(q) for k, q in more.items()},
    }


# ------------------------------------------------------------------------------------------------------------------
# Parent: assembling the files
# ------------------------------------------------------------------------------------------------------------------

def _as_question(d: dict[str, Any]) -> Question:
    return Question(d["task"], d["question"], d["answer"], list(d["distractors"]), d["start"], d["end"])


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def _conversations(res: dict[str, Any], placer: AnswerPlacer, seed: int) -> list[dict[str, Any]]:
    """The LLaVA records of one clip's instruction plan, with MCQ answers placed."""
    rng = np.random.default_rng([seed, res["index"], 0x1A57])
    out = []
    for n, rec in enumerate(res["plan"]):
        conv = []
        for t, turn in enumerate(rec["turns"]):
            if "mcq" in turn:
                q = _as_question(res["questions"][turn["mcq"]])
                cands, pos = placer.place(f"instruct_{res['split']}/{q.task}", q, rng)
                human = format_mcq(q.question, cands, turn["style"], turn["instruction"])
                gpt = f"({'ABCD'[pos]}) {q.answer}"
            else:
                human, gpt = turn["q"], turn["a"]
            if t == 0:
                human = with_video(human, rec["video_first"])
            conv += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
        out.append({"id": f"{res['id']}_{rec['kind']}{n}", "video": res["video"], "conversations": conv})
    return out


def _cloze_record(res: dict[str, Any], seed: int) -> dict[str, Any] | None:
    """Every benchmark-style question of one clip (and its extra ones) as one multi-turn record, answered with the
    option text itself (cloze form: no options, no letters), in a seeded order; None for a clip without questions."""
    questions = {**res["questions"], **res["extra_questions"]}
    if not questions:
        return None
    rng = np.random.default_rng([seed, res["index"], 0xC102E])
    keys = [str(k) for k in rng.permutation(sorted(questions))]
    conv = []
    for t, key in enumerate(keys):
        q = questions[key]
        human = with_video(q["question"], bool(rng.random() < 0.7)) if t == 0 else q["question"]
        conv += [{"from": "human", "value": human}, {"from": "gpt", "value": q["answer"]}]
    return {"id": f"{res['id']}_cloze", "video": res["video"], "conversations": conv}


MOTION_WORDS = ("still", "moves left", "moves right", "moves up", "moves down", "grows", "shrinks",
                "rotates clockwise", "rotates counterclockwise")


def _direction(dx: float, dy: float) -> str:
    return ("moves right" if dx > 0 else "moves left") if abs(dx) >= abs(dy) else ("moves down" if dy > 0 else "moves up")


def motion_word(track: dict[str, list], k: int) -> str:
    """What an object is doing at frame k, from its track around k (frames k-1 to k+1): moving (by its main axis,
    at least 1 px per frame), else growing or shrinking (at least 2% per frame), else rotating (at least 1 degree
    per frame; image y points down, so a growing angle turns clockwise), else still. At a bounce the way in and the
    way out cancel over k-1 to k+1; an object that moves at least 1 px per frame on both sides of k moves, the
    way it leaves (without this, half the bounces of 8 sampled frames read "stops moving", then "starts moving")."""
    x, y = track["x"], track["y"]
    a, b = max(0, k - 1), min(len(x) - 1, k + 1)
    span = max(1, b - a)
    dx, dy = (x[b] - x[a]) / span, (y[b] - y[a]) / span
    if max(abs(dx), abs(dy)) >= 1.0:
        return _direction(dx, dy)
    if a < k < b and min(max(abs(x[k] - x[a]), abs(y[k] - y[a])), max(abs(x[b] - x[k]), abs(y[b] - y[k]))) >= 1.0:
        return _direction(x[b] - x[k], y[b] - y[k])
    growth = (track["scale"][b] / max(1e-6, track["scale"][a])) ** (1 / span)
    if abs(growth - 1) >= 0.02:
        return "grows" if growth > 1 else "shrinks"
    turn = (track["angle"][b] - track["angle"][a]) / span
    if abs(turn) >= 1.0:
        return "rotates clockwise" if turn > 0 else "rotates counterclockwise"
    return "still"


SIZE_WORDS = ("small", "large")


def size_word(radius: float, scale: float, frame_size: float) -> str:
    """How large an object is drawn in a frame: "large" from halfway between the world's two sizes up (a small
    object that has grown to about twice its size is large, a large one shrunk to half is small)."""
    return "large" if radius * scale / frame_size >= (SIZES["small"] + SIZES["large"]) / 2 else "small"


EVENT_WORDS = ("none", "starts moving", "stops moving", "bounces", "changes color", "appears", "disappears")
_EVENT_OF = {"start": "starts moving", "stop": "stops moving", "bounce": "bounces", "color_change": "changes color",
             "appear": "appears", "disappear": "disappears"}


def event_word(meta: dict[str, Any], obj: int, k: int) -> str:
    """The one-off event of object `obj` at frame k: the nearest event within a frame of it (so that frames
    sampled every other frame still see it), else "none"."""
    near = [(max(e["start_frame"] - k, k - e["end_frame"], 0), e) for e in meta["events"]
            if e.get("object") == obj and e["type"] in _EVENT_OF and e["start_frame"] - 1 <= k <= e["end_frame"] + 1]
    return _EVENT_OF[min(near, key=lambda d: d[0])[1]["type"]] if near else "none"


PATTERN_WORDS = {"solid": "solid", "gradient": "gradient", "noise": "noisy", "stripes": "striped"}


def seen_background(meta: dict[str, Any], k: int) -> dict[str, Any]:
    """The background of frame k: after a background change the new one, from the first frame where it covers at
    least half of the cross-fade (as `render_clip` blends)."""
    change = next((e for e in meta["events"] if e["type"] == "background_change"), None)
    if change is not None and (k - change["start_frame"] + 1) / (change["end_frame"] - change["start_frame"] + 1) >= 0.5:
        return meta["background_after"]
    return meta["background"]


def scene_words(meta: dict[str, Any], k: int) -> dict[str, str]:
    """The background of frame k (`seen_background`) as the words its name uses ("navy-to-black gradient": tone
    navy, tone2 black, pattern gradient; "noisy gray": tone gray, tone2 none, pattern noisy)."""
    bg = seen_background(meta, k)
    tones = bg["tones"]
    return {"tone": tones[0], "tone2": tones[1] if len(tones) > 1 else "none", "pattern": PATTERN_WORDS[bg["kind"]]}


def frame_regions(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """A clip's ground truth as per-frame annotations (`vlm.data.regions`): per frame its time, the background's
    words (`scene_words`), and each object drawn at half opacity or more: centre in [0, 1], colour, shape (a
    shuffle scenario's boxes are the shape "box"), how large it is drawn (`size_word`), what it is doing
    (`motion_word`) and what happens to it (`event_word`)."""
    size, fps = float(meta["size"]), float(meta["fps"])
    frames = []
    for k in range(int(meta["num_frames"])):
        objects = []
        for o in meta["objects"]:
            tr = o["track"]
            if tr["visible"][k] and tr["opacity"][k] >= 0.5:
                centre = [round(min(1.0, max(0.0, tr[a][k] / size)), 4) for a in ("x", "y")]
                objects.append({"center": centre, "color": tr["color"][k], "shape": o["shape"],
                                "size": size_word(o["radius"], tr["scale"][k], size),
                                "action": motion_word(tr, k), "event": event_word(meta, o["id"], k)})
        frames.append({"t": round(k / fps, 4), "scene": scene_words(meta, k), "objects": objects})
    return frames


def _assemble(out: Path, results: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Write every data file from the clip results (in clip order); returns per-file counts and histograms."""
    train = [r for r in results if r["split"] == "train"]
    test = [r for r in results if r["split"] == "test"]
    counts: dict[str, int] = {}

    _write_jsonl(out / "meta.jsonl", [r["meta"] for r in results])
    counts["meta.jsonl"] = len(results)

    captions = [
        {"id": f"{r['id']}_cap", "video": r["video"], "conversations": [
            {"from": "human", "value": with_video(r["caption_request"]["text"], r["caption_request"]["video_first"])},
            {"from": "gpt", "value": r["caption"]}]}
        for r in train
    ]
    _write_json(out / "captions_train.json", captions)
    counts["captions_train.json"] = len(captions)

    for split, rows in (("train", train), ("test", test)):  # the caption records + per-frame ground truth
        regions = [{"id": f"{r['id']}_regions", "video": r["video"], "conversations": [
            {"from": "human", "value": with_video(r["caption_request"]["text"], r["caption_request"]["video_first"])},
            {"from": "gpt", "value": r["caption"]}], "regions": frame_regions(r["meta"])} for r in rows]
        _write_json(out / f"regions_{split}.json", regions)
        counts[f"regions_{split}.json"] = len(regions)

    placer = AnswerPlacer(seed)
    for split, rows in (("train", train), ("test", test)):
        records = [c for r in rows for c in _conversations(r, placer, seed)]
        _write_json(out / f"instruct_{split}.json", records)
        counts[f"instruct_{split}.json"] = len(records)
        qa = [rec for r in rows if (rec := _cloze_record(r, seed)) is not None]
        _write_json(out / f"qa_{split}.json", qa)
        counts[f"qa_{split}.json"] = len(qa)
        retrieval = [{"video": r["video"], "captions": r["retrieval"]} for r in rows]
        _write_json(out / f"retrieval_{split}.json", retrieval)
        counts[f"retrieval_{split}.json"] = len(retrieval)
        cls = [{"video": r["video"], "label": r["meta"]["label"], "label_id": r["meta"]["label_id"]} for r in rows]
        _write_jsonl(out / f"classification_{split}.jsonl", cls)
        counts[f"classification_{split}.jsonl"] = len(cls)
    _write_json(out / "classes.json", list(CLASSES))

    (out / "mvbench" / "json").mkdir(parents=True, exist_ok=True)
    manifest, task_summary = [], {}
    for task in TASKS:
        items = []
        for r in test:
            if task.key not in r["questions"]:
                continue
            q = _as_question(r["questions"][task.key])
            rng = np.random.default_rng([seed, r["index"], 0xBE4C, TASKS.index(task)])
            cands, _ = placer.place(f"mvbench/{task.key}", q, rng)
            item: dict[str, Any] = {"video": f"{r['id']}.mp4", "question": q.question, "candidates": cands,
                                    "answer": q.answer}
            if task.bound:
                item.update(start=q.start, end=q.end)
            items.append(item)
        _write_json(out / "mvbench" / "json" / f"{task.key}.json", items)
        manifest.append({"task": task.name, "json": f"{task.key}.json", "prefix": "video/", "data_type": "video",
                         "bound": task.bound})
        task_summary[task.key] = {
            "name": task.name, "items": len(items), "bound": task.bound,
            "answer_positions": placer.histogram.get(f"mvbench/{task.key}", {c: 0 for c in "ABCD"}),
        }
    _write_json(out / "mvbench" / "tasks.json", manifest)
    instruct_hist = {k: v for k, v in sorted(placer.histogram.items()) if k.startswith("instruct_")}
    return {"files": counts, "tasks": task_summary, "instruct_answer_positions": instruct_hist,
            "classes": {s: {c: sum(r["meta"]["label"] == c for r in rows) for c in CLASSES}
                        for s, rows in (("train", train), ("test", test))}}


def generate(out: str | Path, num: int, seed: int = 0, *, frames: int = 24, size: int = 128, fps: float = 8.0,
             eval_fraction: float = 0.2, workers: int = 2, progress: bool = True, data_format: str = "json",
             extra_questions: dict[str, int] | None = None) -> dict:
    """Generate `num` synthetic clips and every data file under `out`; returns the summary (also DIR/summary.json).
    data_format "hf" also writes the training and QA files as saved datasets beside their JSON
    (`data_tools.synth.hf_files`). extra_questions {task key: n} asks each training clip up to n more questions of
    that task with other answers, in its qa_train.json record only (the benchmark and every other file unchanged).

    Output is byte-identical for the same arguments whatever `workers` is (summary.json's timing aside).
    """
    from data_tools.synth.hf_files import FORMATS, write_hf

    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if not 16 <= frames <= 64:
        raise ValueError(f"frames must be in [16, 64], got {frames}")
    if not 96 <= size <= 512 or size % 2:
        raise ValueError(f"size must be even and in [96, 512] (H.264 needs even sizes), got {size}")
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    if data_format not in FORMATS:
        raise ValueError(f"data_format must be one of {FORMATS}, got {data_format!r}")
    extra = dict(extra_questions or {})
    unknown = sorted(set(extra) - set(TASKS_BY_KEY))
    if unknown or any(not isinstance(n, int) or n < 0 for n in extra.values()):
        raise ValueError(f"extra_questions must map task keys ({', '.join(TASKS_BY_KEY)}) to counts >= 0, got {extra}")
    out = Path(out)
    for d in VIDEO_DIRS.values():
        (out / d).mkdir(parents=True, exist_ok=True)
    ours = {f"{VIDEO_DIRS[split_of(i, eval_fraction)]}/{clip_id(i)}.mp4" for i in range(num)}
    stale = [p for d in VIDEO_DIRS.values() for p in sorted((out / d).glob("*.mp4")) if f"{d}/{p.name}" not in ours]
    if stale:
        log.warning("%s holds %d videos that this run does not write (e.g. %s): left in place, not listed in any file",
                    out, len(stale), stale[0].relative_to(out))
    t0 = time.perf_counter()
    jobs = [(i, int(seed), int(frames), int(size), float(fps), float(eval_fraction), str(out), extra)
            for i in range(num)]
    results: list[dict[str, Any]] = []
    with tqdm(total=num, desc="synth clips", unit="clip", disable=not progress) as bar:
        if workers <= 1:
            for job in jobs:
                results.append(make_clip(job))
                bar.update()
        else:
            # fork on Linux (like torch's DataLoader): works from scripts without a __main__ guard, notebooks and
            # stdin; spawn elsewhere, where fork is unsafe or missing.
            ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            with ctx.Pool(workers) as pool:
                for res in pool.imap(make_clip, jobs, chunksize=max(1, min(16, num // (workers * 8)))):
                    results.append(res)
                    bar.update()
    t_clips = time.perf_counter() - t0
    summary = _assemble(out, results, int(seed))
    if data_format == "hf":
        summary["hf_datasets"] = write_hf(out)
    from data_tools.synth.contact_sheet import make_contact_sheet

    make_contact_sheet(out, [r["meta"] for r in results], out / "contact_sheet.png")
    elapsed = time.perf_counter() - t0
    summary = {
        "format_version": FORMAT_VERSION, "seed": int(seed),
        "settings": {"num": num, "frames": frames, "size": size, "fps": fps, "eval_fraction": eval_fraction,
                     "workers": workers, **({"extra_questions": extra} if extra else {})},
        "clips": {"total": num, "train": sum(r["split"] == "train" for r in results),
                  "test": sum(r["split"] == "test" for r in results),
                  "video_dirs": {"train": VIDEO_DIRS["train"], "test": VIDEO_DIRS["test"]}},
        **summary,
        "timing": {"clips_seconds": round(t_clips, 2), "total_seconds": round(elapsed, 2),
                   "clips_per_second": round(num / t_clips, 2)},
    }
    _write_json(out / "summary.json", summary)
    log.info("synthetic data: %d clips (%d test) in %.1f s (%.1f clips/s) -> %s",
             num, summary["clips"]["test"], elapsed, num / t_clips, out)
    return summary
