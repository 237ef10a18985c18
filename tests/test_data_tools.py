"""`vlm data validate` and `vlm data convert`."""

from __future__ import annotations

import json

import pytest

from data_tools.convert import mvbench_to_llava, videoqa_to_llava
from data_tools.validate import validate_file
from tests.train_helpers import make_tiny_data
from vlm.cli import main
from vlm.data import load_conversations
from vlm.video import write_video

import numpy as np


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"), n=4, bad=True)


def test_validate_reports_every_bad_sample(data, tmp_path):
    root = data["captions"].parent
    records = json.loads(data["captions"].read_text())
    records.append({"id": "escape", "video": "../outside.mp4", "conversations": records[0]["conversations"]})
    records.append({"id": "dup", "video": "videos/v1.mp4", "conversations": [
        {"from": "human", "value": "<video> <video>"}, {"from": "gpt", "value": "x"}]})
    records.append({"id": "empty", "video": "videos/v1.mp4", "conversations": [
        {"from": "human", "value": "<video> q"}, {"from": "gpt", "value": ""}]})
    records.append({"id": "roles", "video": "videos/v1.mp4", "conversations": [
        {"from": "gpt", "value": "<video> q"}, {"from": "gpt", "value": "a"}]})
    bad_file = root / "bad.json"
    bad_file.write_text(json.dumps(records))
    report = validate_file(bad_file, root, progress=False)
    reasons: dict[str, str] = {}
    for p in report.problems:
        reasons[p.sample_id] = reasons.get(p.sample_id, "") + " | " + p.reason
    assert "file not found" in reasons["missing"]
    assert "undecodable video" in reasons["broken"]
    assert "no <video> placeholder" in reasons["noplaceholder"]
    assert "escapes the media root" in reasons["escape"]
    assert "appears 2 times" in reasons["dup"]
    assert "is empty" in reasons["empty"]
    assert "was expected" in reasons["roles"]
    assert report.total == len(records) and report.bad_samples == 7
    assert all(str(bad_file) in p.location for p in report.problems)
    # the CLI exits non-zero and prints one line per problem; a clean file exits 0
    assert main(["data", "validate", str(bad_file), "--media-root", str(root)]) == 1
    good = root / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in records[:4]))
    assert main(["data", "validate", str(good), "--media-root", str(root)]) == 0
    # the same records as a saved HF dataset and as Parquet: the same problems, located by dataset row
    from vlm.data.hf import save_records

    for target in (root / "bad.hf", root / "bad.parquet"):
        save_records(records, target)
        other = validate_file(target, progress=False)  # media root: the folder holding the dataset
        assert sorted((p.sample_id, p.reason) for p in other.problems) == \
            sorted((p.sample_id, p.reason) for p in report.problems)
        assert other.total == report.total and all(str(target) in p.location for p in other.problems)
        assert main(["data", "validate", str(target)]) == 1


def test_validate_names_malformed_json_lines(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"id": 1, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n{bad\n')
    report = validate_file(f, tmp_path, progress=False)
    assert report.total == 2 and len(report.problems) == 1
    assert report.problems[0].location.endswith("x.jsonl:2") and "malformed JSON" in report.problems[0].reason


def test_convert_mvbench_and_videoqa(tmp_path):
    (tmp_path / "json").mkdir()
    (tmp_path / "video").mkdir()
    write_video(tmp_path / "video" / "a.mp4", np.zeros((4, 16, 16, 3), np.uint8), fps=4)
    (tmp_path / "tasks.json").write_text(json.dumps([{"task": "T", "json": "t.json", "prefix": "video/", "bound": True}]))
    (tmp_path / "json" / "t.json").write_text(json.dumps([
        {"video": "a.mp4", "question": "Which way?", "candidates": ["up", "down"], "answer": "down", "start": 0, "end": 1}]))
    assert mvbench_to_llava(tmp_path, tmp_path / "mc.json") == 1
    (sample,) = load_conversations(tmp_path / "mc.json")
    assert sample.media == "video/a.mp4" and sample.turns[1].text == "(B) down" and sample.extra == {"start": 0, "end": 1}
    assert "(A) up\n(B) down" in sample.turns[0].text
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps([{"video_id": "vid7", "question": "what is it?", "answer": "cat", "question_id": 3}]))
    assert videoqa_to_llava(qa, tmp_path / "oe.json", "videos/{video}.avi") == 1
    (s,) = load_conversations(tmp_path / "oe.json")
    assert s.id == "3" and s.media == "videos/vid7.avi" and s.turns[1].text == "cat"
