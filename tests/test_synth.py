"""The synthetic temporal-video generator: determinism, file formats, benchmark hygiene, ground truth vs pixels."""

from __future__ import annotations

import filecmp
import os
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_tools.synth import CLASSES, generate
from data_tools.synth.contact_sheet import decode_frames
from data_tools.synth.generate import class_of, event_word, motion_word, size_word, split_of
from data_tools.synth.language import movers, object_action, timeline
from data_tools.synth.render import render_clip
from data_tools.synth.scenarios import sample_clip
from data_tools.synth.tasks import TASKS, AnswerPlacer, Question, clip_questions
from data_tools.synth.world import BG_TONES, COLORS

NUM, FRAMES, SIZE, SEED, EVAL = 12, 16, 112, 7, 0.34  # 4 test clips


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """The same dataset generated twice: in-process (workers=1) and with a pool of 2 workers."""
    a, b = tmp_path_factory.mktemp("synth_w1"), tmp_path_factory.mktemp("synth_w2")
    summary = generate(a, NUM, SEED, frames=FRAMES, size=SIZE, eval_fraction=EVAL, workers=1, progress=False)
    generate(b, NUM, SEED, frames=FRAMES, size=SIZE, eval_fraction=EVAL, workers=2, progress=False)
    return a, b, summary


@pytest.fixture(scope="module")
def out(runs: tuple[Path, Path, dict]) -> Path:
    return runs[0]


def _load(path: Path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return json.loads(path.read_text(encoding="utf-8"))


def _meta(out: Path) -> list[dict]:
    return _load(out / "meta.jsonl")


def test_identical_for_any_worker_count(runs: tuple[Path, Path, dict]) -> None:
    a, b, _ = runs
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    differ = [str(f) for f in files if f.name != "summary.json" and not filecmp.cmp(a / f, b / f, shallow=False)]
    assert differ == []  # videos, contact sheet and every data file are byte-identical
    sa, sb = _load(a / "summary.json"), _load(b / "summary.json")
    for s in (sa, sb):
        s.pop("timing")
        s["settings"].pop("workers")
    assert sa == sb


def test_other_seed_other_data(out: Path, tmp_path: Path) -> None:
    generate(tmp_path, 3, SEED + 1, frames=FRAMES, size=SIZE, eval_fraction=EVAL, workers=1, progress=False)
    assert _meta(tmp_path)[0]["objects"] != _meta(out)[0]["objects"]


def test_every_file_exists_and_parses(out: Path, runs: tuple[Path, Path, dict]) -> None:
    summary = runs[2]
    for name in ("meta.jsonl", "captions_train.json", "instruct_train.json", "instruct_test.json", "qa_train.json",
                 "qa_test.json", "retrieval_train.json",
                 "retrieval_test.json", "classes.json", "classification_train.jsonl", "classification_test.jsonl",
                 "mvbench/tasks.json", "summary.json", "regions_train.json", "regions_test.json"):
        assert isinstance(_load(out / name), list if name != "summary.json" else dict), name
    assert summary == {**_load(out / "summary.json"), "timing": summary["timing"]}
    for name, n in summary["files"].items():
        assert len(_load(out / name)) == n, name
    meta = _meta(out)
    assert [m["id"] for m in meta] == [f"c{i:06d}" for i in range(NUM)]
    for m in meta:
        assert (out / m["video"]).is_file()
        assert m["video"].startswith("videos/" if m["split"] == "train" else "mvbench/video/")
        assert m["num_frames"] == FRAMES and m["size"] == SIZE and m["fps"] == 8.0
        for o in m["objects"]:
            assert all(len(v) == FRAMES for v in o["track"].values())
        for e in m["events"]:
            assert 0 <= e["start_frame"] <= e["end_frame"] < FRAMES
            assert e["start_s"] == round(e["start_frame"] / m["fps"], 3)
    assert sum(m["split"] == "test" for m in meta) == 4
    png = (out / "contact_sheet.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_llava_records(out: Path) -> None:
    for name in ("captions_train.json", "instruct_train.json", "instruct_test.json"):
        records = _load(out / name)
        assert records, name
        assert len({r["id"] for r in records}) == len(records)
        for r in records:
            conv = r["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and conv
            texts = [t["value"] for t in conv]
            assert sum(t.count("<video>") for t in texts) == 1, r["id"]
            first = texts[0]
            assert first.startswith("<video>\n") or first.endswith("\n<video>"), r["id"]
            assert (out / r["video"]).is_file()
            assert all(t.strip() for t in texts)
    starts = Counter(r["conversations"][0]["value"].startswith("<video>") for r in _load(out / "instruct_train.json"))
    assert starts[True] and starts[False]  # both placements occur
    kinds = Counter(r["id"].split("_")[1].rstrip("0123456789") for r in _load(out / "instruct_train.json"))
    assert kinds["qa"] and kinds["mcq"] and kinds["multi"]


def test_instruction_mcqs_are_well_formed(out: Path) -> None:
    for r in _load(out / "instruct_train.json"):
        for human, gpt in zip(r["conversations"][::2], r["conversations"][1::2]):
            text = human["value"].replace("<video>", "").strip()
            options = [line[4:] for line in text.splitlines() if line[:3] in ("(A)", "(B)", "(C)", "(D)")]
            if not options:
                continue
            assert len(options) == 4 and len(set(options)) == 4
            letter, answer = gpt["value"][1], gpt["value"][4:]
            assert gpt["value"][0] == "(" and options["ABCD".index(letter)] == answer


def test_benchmark_items(out: Path) -> None:
    manifest = _load(out / "mvbench/tasks.json")
    assert len(manifest) >= 8 and [t["task"] for t in manifest] == [t.name for t in TASKS]
    test_ids = {m["id"] for m in _meta(out) if m["split"] == "test"}
    total = 0
    for entry in manifest:
        assert entry["prefix"] == "video/" and entry["data_type"] == "video"
        items = _load(out / "mvbench/json" / entry["json"])
        total += len(items)
        for it in items:
            assert len(it["candidates"]) == 4 and len(set(it["candidates"])) == 4
            assert it["answer"] in it["candidates"]
            assert it["video"][:-4] in test_ids
            assert (out / "mvbench" / entry["prefix"] / it["video"]).is_file()
            if entry["bound"]:
                assert 0 <= it["start"] < it["end"] <= FRAMES / 8.0
            else:
                assert "start" not in it
    assert total >= 3 * 4  # several tasks per test clip


def _instruct_letters(out: Path, split: str) -> Counter:
    """The letters of the correct options of every MCQ turn in instruct_<split>.json, read from the turns."""
    letters: Counter = Counter()
    for r in _load(out / f"instruct_{split}.json"):
        for human, gpt in zip(r["conversations"][::2], r["conversations"][1::2]):
            options = [line[4:] for line in human["value"].splitlines() if line[:3] in ("(A)", "(B)", "(C)", "(D)")]
            if options:
                letter = gpt["value"][1]
                assert options["ABCD".index(letter)] == gpt["value"][4:], r["id"]  # the letter names the answer
                letters[letter] += 1
    return letters


def test_answer_positions_balanced(out: Path, runs: tuple[Path, Path, dict]) -> None:
    """Where the correct option sits, recounted from the written files (not taken from the summary)."""
    summary = runs[2]
    manifest = _load(out / "mvbench" / "tasks.json")
    assert [t["json"] for t in manifest] == [f"{key}.json" for key in summary["tasks"]]
    total = 0
    for entry in manifest:
        key = entry["json"][: -len(".json")]
        items = _load(out / "mvbench" / "json" / entry["json"])
        positions = Counter("ABCD"[it["candidates"].index(it["answer"])] for it in items)
        counts = [positions[c] for c in "ABCD"]
        assert sum(counts) == len(items) and max(counts) - min(counts) <= 1, (key, counts)
        assert summary["tasks"][key]["answer_positions"] == dict(zip("ABCD", counts)), key  # the summary is true
        assert summary["tasks"][key]["items"] == len(items)
        total += len(items)
    assert total >= 3 * 4
    # Instruction MCQs: each (split, task) stream is balanced; their sum, recounted from the files, is what the
    # summary's per-stream histograms add up to, so it is balanced to within one per task.
    for split in ("train", "test"):
        recounted = _instruct_letters(out, split)
        streams = {k: h for k, h in summary["instruct_answer_positions"].items() if k.startswith(f"instruct_{split}/")}
        assert streams and all(max(h.values()) - min(h.values()) <= 1 for h in streams.values()), split
        assert {c: recounted[c] for c in "ABCD"} == {c: sum(h[c] for h in streams.values()) for c in "ABCD"}, split
        assert max(recounted.values()) - min(recounted.values()) <= len(streams), (split, recounted)
    # And at scale: 1000 questions of one stream spread evenly over A-D, with the answer where it says.
    placer, rng = AnswerPlacer(0), np.random.default_rng(0)
    q = Question("t", "q?", "yes", ["a", "b", "c"])
    positions = Counter()
    for _ in range(1001):
        cands, pos = placer.place("s", q, rng)
        assert cands[pos] == "yes" and sorted(cands) == ["a", "b", "c", "yes"]
        positions[pos] += 1
    assert sorted(positions) == [0, 1, 2, 3] and max(positions.values()) - min(positions.values()) <= 1


def test_test_clips_never_in_train_files(out: Path) -> None:
    test_videos = {m["video"] for m in _meta(out) if m["split"] == "test"}
    train_videos = {m["video"] for m in _meta(out) if m["split"] == "train"}
    assert test_videos and train_videos
    for name in ("captions_train.json", "instruct_train.json", "retrieval_train.json", "qa_train.json", "regions_train.json"):
        assert {r["video"] for r in _load(out / name)} <= train_videos, name
    assert {r["video"] for r in _load(out / "classification_train.jsonl")} <= train_videos
    for name in ("instruct_test.json", "retrieval_test.json", "qa_test.json", "regions_test.json"):
        assert {r["video"] for r in _load(out / name)} <= test_videos, name
    assert sorted(p.name for p in (out / "videos").iterdir()) == sorted(v.split("/")[-1] for v in train_videos)


def test_classes_and_retrieval(out: Path) -> None:
    classes = _load(out / "classes.json")
    assert classes == list(CLASSES)
    for split in ("train", "test"):
        for r in _load(out / f"classification_{split}.jsonl"):
            assert classes[r["label_id"]] == r["label"]
        for r in _load(out / f"retrieval_{split}.json"):
            assert len(r["captions"]) >= 3 and len(set(r["captions"])) == len(r["captions"])


def test_split_and_class_schedule() -> None:
    splits = [split_of(i, 0.2) for i in range(1000)]
    assert splits.count("test") == 200
    per_split = Counter((split_of(i, 0.2), class_of(i, 0, 0.2)) for i in range(1200))
    train = [per_split["train", c] for c in CLASSES]
    test = [per_split["test", c] for c in CLASSES]
    assert max(train) - min(train) <= 1 and max(test) - min(test) <= 1


def test_backgrounds_never_look_like_object_colors() -> None:
    for tone in BG_TONES.values():
        for color in COLORS.values():
            assert np.linalg.norm(np.subtract(tone, color)) > 100


def _nearest_color(rgb: np.ndarray) -> str:
    return min(COLORS, key=lambda c: np.abs(np.subtract(COLORS[c], rgb, dtype=float)).sum())


def test_ground_truth_matches_decoded_pixels(out: Path) -> None:
    """At every fully visible object's ground-truth centre the decoded pixel has the object's colour."""
    checked = 0
    for m in _meta(out):
        frames = decode_frames(out / m["video"])
        assert frames.shape == (FRAMES, SIZE, SIZE, 3)
        for o in m["objects"]:
            if o["role"] in ("box", "ball"):
                continue
            tr = o["track"]
            for k in range(FRAMES):
                if tr["opacity"][k] == 1.0:
                    x, y = round(tr["x"][k]), round(tr["y"][k])
                    assert _nearest_color(frames[k, y, x]) == tr["color"][k], (m["id"], o["id"], k)
                    checked += 1
                elif tr["opacity"][k] == 0.0:  # hidden: what is there is not the object's colour
                    pixel = frames[k, round(tr["y"][k]), round(tr["x"][k])].astype(int)
                    assert np.abs(pixel - COLORS[tr["color"][k]]).max() > 60, (m["id"], o["id"], k)
    assert checked > 100


def test_regions_are_the_ground_truth_in_the_quickstart_words(out: Path) -> None:
    """Every clip's per-frame annotations: the frame's time, the background seen then (its tones and pattern), each
    object drawn at half opacity or more at its centre; in the vocabulary of recipes/quickstart.yaml's word_slots
    connector (a colour, shape or tone added to the world without the recipe fails here)."""
    import yaml

    from vlm.data import parse_record
    from vlm.data.regions import region_problems

    connector = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "quickstart.yaml").read_text())["model"]["connector"]
    metas = {m["video"]: m for m in _meta(out)}
    records = _load(out / "regions_train.json") + _load(out / "regions_test.json")
    assert sorted(r["video"] for r in records) == sorted(metas)
    for i, r in enumerate(records):
        parse_record(r, f"regions[{i}]")  # a valid LLaVA record (the clip's caption) carrying regions
        assert region_problems(r["regions"], connector["scene"], connector["objects"] | connector["motion"]) == [], r["id"]
        m = metas[r["video"]]
        assert [f["t"] for f in r["regions"]] == [round(k / m["fps"], 4) for k in range(FRAMES)]
        for k, frame in enumerate(r["regions"]):
            bg = m["background"]
            change = [e for e in m["events"] if e["type"] == "background_change"]
            if change and k >= change[0]["start_frame"] + (change[0]["end_frame"] - change[0]["start_frame"]) // 2:
                bg = m["background_after"]  # the new one from the middle of the cross-fade (a cut: at once)
            assert frame["scene"] == {"tone": bg["tones"][0], "tone2": (bg["tones"] + ["none"])[1],
                                      "pattern": {"noise": "noisy", "stripes": "striped"}.get(bg["kind"], bg["kind"])}
            drawn = [o for o in m["objects"] if o["track"]["visible"][k] and o["track"]["opacity"][k] >= 0.5]
            assert [(f["color"], f["shape"]) for f in frame["objects"]] == [(o["track"]["color"][k], o["shape"]) for o in drawn]
            for f, o in zip(frame["objects"], drawn):
                assert f["center"][0] == pytest.approx(min(1, max(0, o["track"]["x"][k] / SIZE)), abs=1e-4)
                assert f["action"] == motion_word(o["track"], k) and f["event"] == event_word(m, o["id"], k)
                assert f["size"] == size_word(o["radius"], o["track"]["scale"][k], SIZE)
    # what an object does agrees with the events in the middle of each movement, growth and rotation
    checked = 0
    for m in metas.values():
        for e in m["events"]:
            if e["type"] in ("move", "grow", "shrink", "rotate") and e["object"] is not None:
                word = {"move": f"moves {e.get('direction')}", "grow": "grows", "shrink": "shrinks",
                        "rotate": f"rotates {e.get('direction')}"}[e["type"]]
                track = m["objects"][e["object"]]["track"]
                assert motion_word(track, (e["start_frame"] + e["end_frame"]) // 2) == word, (m["id"], e)
                checked += 1
    assert checked > 0
    # an object that grows is small when it starts and large when it ends, and one that shrinks the other way round
    for m in metas.values():
        for e in m["events"]:
            if e["type"] in ("grow", "shrink"):
                o = m["objects"][e["object"]]
                ends = [size_word(o["radius"], o["track"]["scale"][k], SIZE) for k in (e["start_frame"], e["end_frame"])]
                assert ends == (["small", "large"] if e["type"] == "grow" else ["large", "small"]), (m["id"], e)
    # each one-off event is named at its frame (and the frames next to it) on its object
    for m in metas.values():
        for e in m["events"]:
            if e["type"] == "bounce":
                same = {x["type"] for x in m["events"] if x.get("object") == e["object"]
                        and x["start_frame"] <= e["start_frame"] <= x["end_frame"]}
                word = event_word(m, e["object"], e["start_frame"])
                assert word == "bounces" or word != "none" and len(same) > 1, (m["id"], e)
    # at a bounce the object moves, the way it leaves: a story told from sampled frames says "bounces off", not
    # "stops moving" then "starts moving"
    bounces = 0
    for m in metas.values():
        for e in m["events"]:
            k = e["start_frame"]
            if e["type"] == "bounce" and 0 < k < int(m["num_frames"]) - 1:
                tr = m["objects"][e["object"]]["track"]
                out = (tr["x"][k + 1] - tr["x"][k], tr["y"][k + 1] - tr["y"][k])
                way = ("right" if out[0] > 0 else "left") if abs(out[0]) >= abs(out[1]) else ("down" if out[1] > 0 else "up")
                assert motion_word(tr, k) == f"moves {way}" != motion_word(tr, k - 1), (m["id"], e)
                bounces += 1
    assert bounces > 0


@pytest.mark.parametrize("direction", ["left", "right", "up", "down"])
def test_moving_object_moves_in_pixels(tmp_path: Path, direction: str) -> None:
    """The decoded mask of a 'moving <direction>' object's colour travels that way."""
    from vlm.video.encode import write_video

    clip = sample_clip(np.random.default_rng([1, 2]), f"moving {direction}", 24, 128, 8.0)
    write_video(tmp_path / "c.mp4", render_clip(clip), 8.0)
    frames = decode_frames(tmp_path / "c.mp4").astype(int)
    mover = movers(clip)[0]
    target = np.array(COLORS[mover["color"]])
    ev = next(e for e in clip["events"] if e["type"] == "move" and e["object"] == mover["id"])
    centres = []
    for k in (ev["start_frame"], ev["end_frame"]):
        mask = np.abs(frames[k] - target).max(axis=-1) < 40
        ys, xs = np.nonzero(mask)
        centres.append((xs.mean(), ys.mean()))
    (x0, y0), (x1, y1) = centres
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    assert (x1 - x0) * dx + (y1 - y0) * dy > 0.25 * 128
    assert abs((x1 - x0) * dy) + abs((y1 - y0) * dx) < 3


def test_ground_truth_is_self_consistent() -> None:
    """Facts re-derived from the per-frame tracks agree with the events, for many clips of every class and size."""
    for i in range(96):
        T, S = [(16, 112), (24, 128), (32, 224)][i % 3]
        clip = sample_clip(np.random.default_rng([11, i]), CLASSES[i % len(CLASSES)], T, S, 8.0)
        objs = [o for o in clip["objects"] if o["role"] not in ("box", "ball")]
        assert len({o["shape"] for o in objs}) == len(objs)
        worn = [c for o in objs for c in dict.fromkeys(o["track"]["color"])]
        assert len(worn) == len(set(worn))  # no colour is ever shared by two objects
        for o in objs:
            x, y = np.array(o["track"]["x"]), np.array(o["track"]["y"])
            r = o["radius"] * np.array(o["track"]["scale"])
            assert np.all(x - r >= 0) and np.all(x + r <= S) and np.all(y - r >= 0) and np.all(y + r <= S)
            kinds = {e["type"] for e in clip["events"] if e["object"] == o["id"]} - {"start", "stop"}
            assert len(kinds) <= 1
            moved = np.ptp(x) > 1 or np.ptp(y) > 1
            assert moved == (o in movers(clip))
            if "bounce" in kinds:  # velocity reversals in the track = the bounce events, at their frames
                v = np.diff(x if o["axis"] == "x" else y)
                flips = [k + 1 for k in range(len(v) - 1) if v[k] * v[k + 1] < 0]
                assert flips == [e["start_frame"] for e in clip["events"] if e["type"] == "bounce"]
                assert o["bounces"] == len(flips)
        for e in clip["events"]:
            if e["type"] == "move":
                o = next(o for o in objs if o["id"] == e["object"])
                d = {"left": -np.diff(o["track"]["x"]), "right": np.diff(o["track"]["x"]),
                     "up": -np.diff(o["track"]["y"]), "down": np.diff(o["track"]["y"])}[e["direction"]]
                assert np.all(d >= -1e-6) and d.sum() > 0.25 * S
            if e["type"] == "color_change":
                tr = next(o for o in objs if o["id"] == e["object"])["track"]["color"]
                assert tr[e["start_frame"] - 1] == e["from_color"] and tr[e["start_frame"]] == e["to_color"]
        frames = [p["frame"] for p in timeline(clip)]
        assert all(b - a >= 2 for a, b in zip(frames, frames[1:]))
        if clip["label"] == "shuffling":
            sh = clip["shuffle"]
            pos = sh["start_position"]
            swaps = [e for e in clip["events"] if e["type"] == "swap"]
            assert [e["positions"] for e in swaps] == sh["swaps"]
            for (i_, j_), e in zip(sh["swaps"], swaps):
                assert e["ball_moved"] == (pos in (i_, j_))
                pos = j_ if pos == i_ else i_ if pos == j_ else pos
            assert pos == sh["end_position"]
            boxes = [o for o in clip["objects"] if o["role"] == "box"]  # the box over the ball's final slot
            final_x = clip["objects"][0]["track"]["x"][-1]
            assert sorted(round(b["track"]["x"][-1]) for b in boxes).index(round(final_x)) + 1 == pos
            ball = clip["objects"][0]
            assert ball["track"]["visible"][0] and not ball["track"]["visible"][-1]


def test_distractors_are_never_true() -> None:
    """Checks, per task, that no distractor is also a correct answer."""
    seen = Counter()
    for i in range(120):
        clip = sample_clip(np.random.default_rng([12, i]), CLASSES[i % len(CLASSES)], 24, 128, 8.0)
        objs = [o for o in clip["objects"] if o["role"] not in ("box", "ball")]
        worn = {f"{c} {o['shape']}" for o in objs for c in o["track"]["color"]}
        for key, q in clip_questions(clip, np.random.default_rng([13, i])).items():
            seen[key] += 1
            if key == "object_existence":
                steady = {f"{o['color']} {o['shape']}" for o in objs
                          if o["track"]["visible"][0] and o["track"]["visible"][-1]}
                for d in q.distractors:  # absent objects, or (for arrive / leave questions) ones there all along
                    assert d.split(" ", 1)[1] not in worn or (q.question.startswith("Which object is visible")
                                                             and d.split(" ", 1)[1] in steady)
            elif key == "fine_grained_action":
                o = next(o for o in objs if o["id"] == q.extra["object"])
                assert q.answer == object_action(clip, o) and q.answer not in q.distractors
                if o.get("axis"):  # a bouncer does move both ways along its axis: never offered as wrong
                    along = ("left", "right") if o["axis"] == "x" else ("up", "down")
                    assert not any(d.endswith(along) for d in q.distractors)
            elif key == "moving_count":
                assert q.answer == str(len(movers(clip)))
            elif key in ("action_sequence", "action_window"):
                texts = [p["phrase"].text for p in timeline(clip)]
                assert texts.count(q.answer) == 1
                if key == "action_window":  # the window shows exactly one change, the answer's, however it is read
                    exact = {k for k in range(24) if q.start <= k / 8 + 1e-9 and k / 8 <= q.end + 1e-9}
                    rounded = set(range(round(q.start * 8), round(q.end * 8) + 1))
                    for shown in (exact, rounded):
                        seen_here = [p["phrase"].text for p in timeline(clip) if {p["frame"] - 1, p["frame"]} <= shown]
                        assert seen_here == [q.answer]
            elif key == "scene_transition":
                assert q.distractors[0] != q.answer and "from" in q.distractors[0]
    assert len(seen) == len(TASKS)


def test_all_sizes_and_lengths_sample() -> None:
    for frames, size in ((16, 112), (32, 224)):
        for label in CLASSES:
            clip = sample_clip(np.random.default_rng([3, CLASSES.index(label)]), label, frames, size, 8.0)
            assert render_clip(clip).shape == (frames, size, size, 3)


def test_cloze_qa_records_hold_the_benchmark_questions_with_option_text_answers(out: Path) -> None:
    """qa_test.json asks, for each test clip, the questions its benchmark items ask, answered with the item's
    answer text (no options, no letters): the cloze-form training data matches the cloze evaluation profile."""
    items = {}
    for task in _load(out / "mvbench" / "tasks.json"):
        for it in _load(out / "mvbench" / "json" / task["json"]):
            items.setdefault("mvbench/video/" + it["video"], {})[it["question"]] = it["answer"]
    records = _load(out / "qa_test.json")
    assert {r["video"] for r in records} == set(items)
    for r in records:
        conv = r["conversations"]
        humans, answers = [t["value"] for t in conv[::2]], [t["value"] for t in conv[1::2]]
        assert [t["from"] for t in conv] == ["human", "gpt"] * len(humans)
        assert sum(h.count("<video>") for h in humans) == 1 and "<video>" in humans[0]
        asked = {h.replace("<video>", "").strip(): a for h, a in zip(humans, answers)}
        assert asked == items[r["video"]], r["id"]
        assert not any(a.startswith("(") for a in answers)


def test_extra_questions_add_training_turns_and_change_nothing_else(out: Path, tmp_path: Path) -> None:
    """extra_questions asks training clips more questions of a task, each with an answer the clip was not yet asked
    for; the benchmark and every other file stay byte-identical, and unknown tasks or counts are refused."""
    summary = generate(tmp_path, NUM, SEED, frames=FRAMES, size=SIZE, eval_fraction=EVAL, workers=1, progress=False,
                       extra_questions={"action_window": 2})
    assert summary["settings"]["extra_questions"] == {"action_window": 2}
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != "summary.json")
    differ = [str(f) for f in files if not filecmp.cmp(out / f, tmp_path / f, shallow=False)]
    assert differ == ["qa_train.json"]

    def windows(folder: Path) -> dict[str, list[tuple[str, str]]]:
        got: dict[str, list[tuple[str, str]]] = {}
        for r in _load(folder / "qa_train.json"):
            conv = r["conversations"]
            for h, a in zip(conv[::2], conv[1::2]):
                if " between " in h["value"]:
                    got.setdefault(r["id"], []).append((h["value"].replace("<video>", "").strip(), a["value"]))
        return got

    before, after = windows(out), windows(tmp_path)
    assert sum(map(len, after.values())) > sum(map(len, before.values()))
    for rid, asked in after.items():
        assert set(before.get(rid, [])) <= set(asked) and len(asked) <= 3, rid
        assert len({a for _, a in asked}) == len(asked), rid  # every extra question has another answer
    for bad in ({"no_such_task": 1}, {"action_window": -1}):
        with pytest.raises(ValueError, match="extra_questions"):
            generate(tmp_path / "bad", 1, extra_questions=bad)
    from vlm.cli import main

    for bad in ("action_window", "no_such_task=1"):  # the command line says what is wrong in one line
        with pytest.raises(SystemExit, match="extra.questions"):
            main(["data", "synth", "--out", str(tmp_path / "bad"), "--num", "1", "--extra-questions", bad])
    with pytest.raises(SystemExit, match="extra.questions"):  # not silently ignored by the long world
        main(["data", "synth", "--out", str(tmp_path / "bad"), "--num", "1", "--long", "--extra-questions", "action_window=1"])


def test_text_oracle_twins(out: Path, tmp_path: Path) -> None:
    """write_oracle: every training file gets a text-only twin whose <video> is the clip's ground-truth
    description (timed events, duration); descriptions.json is keyed by clip id."""
    import shutil

    from data_tools.synth.oracle import ORACLE_FILES, describe, write_oracle

    root = tmp_path / "w"
    shutil.copytree(out, root)
    counts = write_oracle(root)
    meta = {m["video"]: m for m in _meta(root)}
    texts = _load(root / "oracle" / "descriptions.json")
    assert set(texts) == {m["id"] for m in meta.values()}
    for name in ORACLE_FILES:
        src, twin = _load(root / name), _load(root / "oracle" / name)
        assert len(twin) == len(src) == counts[name]
        for a, b in zip(src, twin):
            assert "video" not in b and b["id"] == a["id"]
            first = b["conversations"][0]["value"]
            description = describe(meta[a["video"]])
            assert "<video>" not in first and f"Video description: {description}" in first
            assert b["conversations"][1:] == a["conversations"][1:]
    timed = [(m, e) for m in meta.values() if m["label"] != "shuffling" for e in m["events"] if e["start_frame"] > 0]
    assert timed
    for m, e in timed:
        text = describe(m)
        assert text.endswith(f"The video lasts {m['duration_s']:.1f} seconds.")
        assert f"At {e['start_frame'] / m['fps']:.1f} seconds," in text


def test_frame_oracle_states_what_each_sampled_frame_shows(out: Path, tmp_path: Path) -> None:
    """write_oracle(style="frames"): per sampled frame, its time and every visible object's colour, shape and
    centre, read from the ground truth; an object moving between frames is at different places."""
    import re
    import shutil

    from data_tools.synth.oracle import describe_frames, write_oracle
    from vlm.video.sampling import sample_indices

    root = tmp_path / "w"
    shutil.copytree(out, root)
    counts = write_oracle(root, "frames", num_frames=4)
    texts = _load(root / "oracle_frames" / "descriptions.json")
    assert counts["descriptions.json"] == len(texts) and not (root / "oracle").exists()
    for m in _meta(root):
        text = texts[m["id"]]
        assert text == describe_frames(m, 4) and len(re.findall(r"\d\.\ds: ", text)) == 4
        frames = sample_indices(m["num_frames"], m["fps"], 4, "uniform").tolist()
        for obj in m["objects"]:
            tr = obj["track"]
            for k in frames:
                if tr["visible"][k] and tr["opacity"][k] >= 0.3:
                    assert f"{tr['color'][k]} {obj['shape']} at ({tr['x'][k]:.0f}, {tr['y'][k]:.0f})" in text
        movers = [o for o in m["objects"] if o["role"] == "mover"]
        for o in movers:
            spots = re.findall(rf"{o['shape']} at \((\d+), (\d+)\)", text)
            assert len(set(spots)) > 1, (m["id"], text)
    with pytest.raises(ValueError, match="oracle style"):
        write_oracle(root, "nope")


def test_long_world_needles_and_questions(tmp_path: Path) -> None:
    """`vlm data synth --long`: clips of the asked lengths at 1 fps, needles exactly where the ground truth puts
    them, questions whose answers follow from it, rotating answer positions, loadable as an MVBench benchmark,
    and the same world for the same seed."""
    from vlm.cli import main
    from vlm.data.mvbench import load_mvbench
    import yaml

    from vlm.data.regions import region_problems
    from vlm.video import VideoReader

    out = tmp_path / "long"
    assert main(["data", "synth", "--long", "--out", str(out), "--num", "8", "--durations", "20,45", "--train", "3"]) == 0
    metas = [m for m in _meta(out) if m["split"] == "test"]
    assert [m["duration_s"] for m in metas] == [20.0, 45.0] * 4
    train = [m for m in _meta(out) if m["split"] == "train"]
    records = json.loads((out / "qa_train.json").read_text())
    assert [r["video"] for r in records] == [m["video"] for m in train] == [f"videos/t{i:05d}.mp4" for i in range(3)]
    assert not {m["video"] for m in train} & {f"mvbench/{b}" for b in os.listdir(out / "mvbench" / "video")}
    for r, m in zip(records, train):
        turns = r["conversations"]
        assert turns[0]["value"].startswith("<video>\n") and all("<video>" not in t["value"] for t in turns[1:])
        count = sum(e["type"] == "flash" for e in m["events"])
        asked = {t["value"]: a["value"] for t, a in zip(turns[::2], turns[1::2])}
        assert asked[next(q for q in asked if "How many times" in q)] == ["once", "twice", "three times", "four times"][count - 1]
    opened = ["Answer with an interval of seconds." in t["value"] for r in records for t in r["conversations"][::2]]
    assert sum(opened) == 1  # the second of three clips asks Needle Time as grounding_test.json does
    for m in metas:
        with VideoReader(out / m["video"]) as reader:
            assert reader.info.num_frames == m["num_frames"] == round(m["duration_s"])
        flashes = [e for e in m["events"] if e["type"] == "flash"]
        assert flashes and 1 <= len(m["events"]) <= 4
        for e in flashes:
            visible = m["objects"][e["object"]]["track"]["visible"]
            assert [k for k, v in enumerate(visible) if v] == list(range(e["start_frame"], e["end_frame"] + 1))
        starts = [e["start_frame"] for e in m["events"]]
        assert starts == sorted(starts) and all(b - a >= 7 for a, b in zip(starts, starts[1:]))
    bench = load_mvbench(out / "mvbench")
    assert set(bench) == {"Needle Object", "Needle Time", "Event Count", "Event Order", "Last Event"}
    by_video = {Path(m["video"]).name: m for m in metas}
    for item in bench["Needle Time"]:
        m = by_video[Path(item.video).name]
        first = next(e for e in m["events"] if e["type"] == "flash")
        assert item.answer == f"from {first['start_s']:.0f} s to {(first['end_frame'] + 1) / m['fps']:.0f} s"
        assert len(set(item.candidates)) == 4
    for item in bench["Event Count"]:
        n = sum(e["type"] == "flash" for e in by_video[Path(item.video).name]["events"])
        assert item.answer == ["once", "twice", "three times", "four times"][n - 1]
    grounding = json.loads((out / "grounding_test.json").read_text())
    assert len(grounding) == len(bench["Needle Time"])
    for g, item in zip(grounding, bench["Needle Time"]):
        assert g["video"] == Path(item.video).name and g["answer"] == item.answer
    positions = [i.candidates.index(i.answer) for i in bench["Needle Object"]]
    assert len(set(positions)) == 4  # the answer's position rotates
    # per-frame ground truth for word-slot heads, as the short world writes it
    regions = {r["video"]: r for split in ("train", "test") for r in json.loads((out / f"regions_{split}.json").read_text())}
    assert set(regions) == {m["video"] for m in _meta(out)}
    connector = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "quickstart.yaml").read_text())["model"]["connector"]
    for r in regions.values():
        assert region_problems(r["regions"], connector["scene"], connector["objects"] | connector["motion"]) == [], r["id"]
    for m in metas:
        frames = regions[m["video"]]["regions"]
        assert [f["t"] for f in frames] == [k / m["fps"] for k in range(m["num_frames"])]
        for e in (e for e in m["events"] if e["type"] == "flash"):
            needle = m["objects"][e["object"]]
            seen = [k for k, f in enumerate(frames) if any(o["shape"] == needle["shape"] and o["color"] ==
                                                           needle["track"]["color"][k] for o in f["objects"])]
            assert set(range(e["start_frame"], e["end_frame"] + 1)) <= set(seen)
    again = tmp_path / "again"
    main(["data", "synth", "--long", "--out", str(again), "--num", "8", "--durations", "20,45", "--train", "3"])
    assert (again / "meta.jsonl").read_text() == (out / "meta.jsonl").read_text()
