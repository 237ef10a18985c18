"""LLaVA conversation records and the MVBench layout reader."""

import json

import pytest

from vlm.data import (
    DataFormatError,
    MediaPathError,
    load_conversations,
    load_mvbench,
    load_tasks,
    parse_record,
    record_problems,
    resolve_media,
)
from vlm.data.mvbench import OFFICIAL_TASKS


def conv(*turns):
    return [{"from": r, "value": v} for r, v in turns]


GOOD = {"id": "a", "video": "v.mp4", "conversations": conv(("human", "<video>\nWhat moves?"), ("gpt", "A ball."))}


def test_good_record_parses():
    s = parse_record(GOOD, "f.json[0]")
    assert s.media == "v.mp4" and s.media_type == "video" and s.placeholder == "<video>"
    assert [t.role for t in s.turns] == ["user", "assistant"]


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"id": "x", "video": "v.mp4", "conversations": conv(("human", "What?"), ("gpt", "A."))}, "no <video> placeholder"),
        ({"id": "x", "video": "v.mp4", "conversations": conv(("human", "<video><video>"), ("gpt", "A."))}, "appears 2 times"),
        ({"id": "x", "video": "v.mp4", "conversations": conv(("human", "<video> q"), ("gpt", " "))}, "is empty"),
        ({"id": "x", "video": "v.mp4", "conversations": conv(("gpt", "<video> q"), ("human", "a"))}, "was expected"),
        ({"id": "x", "video": "v.mp4", "conversations": conv(("human", "<video> q"), ("bot", "a"))}, "unknown role"),
        ({"id": "x", "conversations": conv(("human", "<image> q"), ("gpt", "a"))}, "without 'image'"),
        ({"id": "x", "video": "v.mp4", "conversations": conv(("human", "q"), ("gpt", "a"), ("human", "<video>"), ("gpt", "b"))},
         "not in the first human turn"),
        ({"id": "x", "video": "v.mp4", "conversations": []}, "non-empty list"),
        ({"id": "x", "video": "v.mp4", "image": "i.jpg", "conversations": conv(("human", "<video>"), ("gpt", "a"))}, "both"),
    ],
)
def test_bad_records_name_the_reason(record, reason):
    problems = record_problems(record)
    assert any(reason in p for p in problems), problems
    with pytest.raises(DataFormatError, match="f.json\\[3\\] \\(id x\\)"):
        parse_record(record, "f.json[3]")


def test_jsonl_and_json_list_load(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD | {"id": "b"}) + "\n")
    (tmp_path / "a.json").write_text(json.dumps([GOOD]))
    assert [s.id for s in load_conversations(tmp_path / "a.jsonl")] == ["a", "b"]
    assert load_conversations(tmp_path / "a.json")[0].location.endswith("a.json[0]")


def test_malformed_json_names_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(GOOD) + "\n{oops\n")
    with pytest.raises(DataFormatError, match="bad.jsonl:2: malformed JSON"):
        load_conversations(tmp_path / "bad.jsonl")
    (tmp_path / "bad.json").write_text("[\n" + json.dumps(GOOD) + ",\n{oops}\n]")
    with pytest.raises(DataFormatError, match="bad.json:3: malformed JSON"):
        load_conversations(tmp_path / "bad.json")


def test_media_paths_never_escape_the_root(tmp_path):
    assert resolve_media(tmp_path, "sub/v.mp4") == (tmp_path / "sub/v.mp4").resolve()
    for bad in ("../v.mp4", "/etc/passwd", "sub/../../v.mp4"):
        with pytest.raises(MediaPathError, match="escapes the media root"):
            resolve_media(tmp_path, bad, "f.json[0]")


def write_task(root, name, items, manifest=None):
    (root / "json").mkdir(parents=True, exist_ok=True)
    (root / "json" / name).write_text(json.dumps(items))
    if manifest is not None:
        (root / "tasks.json").write_text(json.dumps(manifest))


def test_mvbench_official_table_and_reader(tmp_path):
    assert len(OFFICIAL_TASKS) == 20
    assert {t.name for t in OFFICIAL_TASKS if t.bound} == {
        "Action Sequence", "Action Prediction", "Object Interaction", "Action Localization", "Episodic Reasoning"}
    episodic = next(t for t in OFFICIAL_TASKS if t.data_type == "frame")
    assert episodic.fps == 3.0 and episodic.prefix == "video/tvqa/frames_fps3_hq/"
    write_task(tmp_path, "action_sequence.json", [
        {"video": "x.mp4", "question": "What first?", "candidates": ["sat", "ran", "ate", "hid"], "answer": "ran",
         "start": 1.5, "end": 9.0}])
    items = load_mvbench(tmp_path, ["action_sequence"])["Action Sequence"]
    item = items[0]
    assert item.answer_index == 1 and item.answer_letter == "B" and (item.start, item.end) == (1.5, 9.0)
    assert item.video == tmp_path / "video/star/Charades_v1_480/x.mp4"


def test_mvbench_manifest_and_errors(tmp_path):
    manifest = [{"task": "Moving Direction", "json": "moving_direction.json", "prefix": "video/", "bound": False}]
    write_task(tmp_path, "moving_direction.json",
               [{"video": "c1.mp4", "question": "q", "candidates": ["up", "down", "left", "right"], "answer": "left",
                 "start": 0.0, "end": 1.0}], manifest)
    (task,) = load_tasks(tmp_path)
    item = load_mvbench(tmp_path)["Moving Direction"][0]
    assert item.video == tmp_path / "video/c1.mp4" and item.start is None  # bound is off for this task
    write_task(tmp_path, "moving_direction.json",
               [{"video": "c1.mp4", "question": "q", "candidates": ["up", "down"], "answer": "left"}])
    with pytest.raises(DataFormatError, match=r"moving_direction.json\[0\]: answer 'left' is not one of"):
        load_mvbench(tmp_path)
    with pytest.raises(KeyError, match="unknown task"):
        load_mvbench(tmp_path, ["nope"])
