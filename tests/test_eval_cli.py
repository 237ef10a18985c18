"""`vlm eval ...` through the real command line entry (no model loading: judge-only QA, a tiny tower, reports)."""

from __future__ import annotations

import copy
import json

from evals.results import EvalResult
from tests.conftest import TINY_TOWERS
import pytest

from tests.eval_helpers import single_thread  # noqa: F401  (fixture)
from tests.eval_helpers import write_clip
from vlm.cli import main


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    yield


def test_cli_openqa_predictions_classify_and_report(tmp_path, capsys):
    (tmp_path / "preds.json").write_text(json.dumps([
        {"id": "a", "question": "colour?", "answer": "red", "pred": "It is red."},
        {"id": "b", "question": "how many?", "answer": "two", "pred": "three"}]))
    assert main(["eval", "openqa", "--predictions", str(tmp_path / "preds.json"), "--judge", "contains",
                 "--out", str(tmp_path / "qa")]) == 0
    qa = EvalResult.load(tmp_path / "qa" / "results.json")
    assert qa.metrics["accuracy"] == 50.0 and qa.judge["id"] == "contains/v1"

    rows = []
    for k, c in enumerate(["red", "green", "red", "green"]):
        write_clip(tmp_path / "v" / f"{k}.mp4", c, frames=8)
        rows.append({"video": f"v/{k}.mp4", "label": c})
    (tmp_path / "cls.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tower = json.dumps(copy.deepcopy(TINY_TOWERS["clip"]))
    assert main(["eval", "classify", "--tower", tower, "--train", str(tmp_path / "cls.jsonl"), "--test",
                 str(tmp_path / "cls.jsonl"), "--frames", "4", "--steps", "50", "--crops", "3",
                 "--out", str(tmp_path / "cls")]) == 0
    cls = EvalResult.load(tmp_path / "cls" / "results.json")
    assert cls.counts["scored"] == 4 and cls.settings["views"] == 3

    assert main(["eval", "report", str(tmp_path / "qa" / "results.json"), str(tmp_path / "cls" / "results.json"),
                 "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "openqa" in report and "classify" in report and "mean_class_accuracy" in report
    assert '"accuracy": 50.0' in capsys.readouterr().out
