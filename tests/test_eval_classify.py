"""Action classification: multi-view testing (clips x crops, averaged softmax), top-k, and the linear probe."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evals.classify import (evaluate_classification, load_classification, multiview_clips, spatial_crops, train_probe)
from tests.conftest import TINY_TOWERS
from tests.eval_helpers import single_thread  # noqa: F401  (fixture)
from vlm.towers import build_tower
from vlm.video import write_video

CLASSES = ["red", "green", "blue"]
RGB = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """3 classes (square colour) x 3 videos each, 16 frames of 32x48 (wide, so 3 crops differ)."""
    root = tmp_path_factory.mktemp("cls")
    (root / "videos").mkdir()
    rows = []
    for cid, name in enumerate(CLASSES):
        for k in range(3):
            frames = np.full((16, 32, 48, 3), 15, dtype=np.uint8)
            for t in range(16):
                frames[t, 8:24, 4 + 2 * t + k : 20 + 2 * t + k] = RGB[name]
            write_video(root / "videos" / f"{name}{k}.mp4", frames, 8.0)
            rows.append({"video": f"videos/{name}{k}.mp4", "label": name, "label_id": cid})
    (root / "classification_train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "classification_test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "classes.json").write_text(json.dumps(CLASSES))
    return root


def test_views_are_clips_times_crops_from_one_decode(data):
    views = multiview_clips(data / "videos" / "red0.mp4", num_frames=4, num_clips=2, num_crops=3)
    assert len(views) == 6 and all(v.frames.shape == (4, 32, 32, 3) for v in views)
    assert views[0].indices.max() < 8 <= views[3].indices.min()  # second clip is in the second half
    assert not np.array_equal(views[0].frames, views[2].frames)  # left and right crops differ
    tall = np.zeros((2, 40, 20, 3), dtype=np.uint8)
    assert [c.shape for c in spatial_crops(tall, 3)] == [(2, 20, 20, 3)] * 3


def test_view_softmax_is_averaged_and_top_k(data, tmp_path):
    items, classes = load_classification(data / "classification_test.jsonl")
    assert classes == CLASSES and items[3].label == "green" and items[3].label_id == 1
    calls = []

    def classifier(view):  # view 0 is confident in class 2, the other 5 views mildly prefer the true class
        calls.append(view)
        k = (len(calls) - 1) % 6
        truth = CLASSES.index(Path(view.source).stem[:-1])
        logits = torch.zeros(3)
        if k == 0:
            logits[2] = 10.0
        else:
            logits[truth] = 1.0
        return logits

    res = evaluate_classification(classifier, items, classes, tmp_path, num_frames=4, num_clips=2, num_crops=3,
                                  progress=False)
    # mean softmax: class 2 gets ~(1 + 5 * 0.21) / 6 = 0.34 from the confident view, the true class ~0.48
    assert res.metrics["top1"] == 100.0 and res.metrics["top3"] == 100.0 and "top5" not in res.metrics
    assert len(calls) == 6 * len(items) and res.settings["views"] == 6
    assert res.per_task["blue"]["accuracy"] == 100.0 and res.counts["scored"] == 9


def test_linear_probe_on_a_frozen_tiny_tower_runs_end_to_end(data, tmp_path):
    torch.manual_seed(0)
    tower = build_tower(**copy.deepcopy(TINY_TOWERS["clip"]))
    train, classes = load_classification(data / "classification_train.jsonl")
    test, _ = load_classification(data / "classification_test.jsonl")
    clf = train_probe(tower, train, len(classes), num_frames=4, cache=tmp_path / "feats.safetensors", steps=200,
                      progress=False)
    assert (tmp_path / "feats.safetensors").is_file()
    res = evaluate_classification(clf, test, classes, tmp_path / "eval", num_frames=4, num_clips=1, num_crops=1,
                                  progress=False)
    # colour is linearly readable even from a random tower: the probe fits its own training videos
    assert res.metrics["top1"] >= 66.0 and (tmp_path / "eval" / "per_task.png").is_file()
