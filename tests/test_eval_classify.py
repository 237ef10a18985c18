"""Action classification: multi-view testing (clips x crops, averaged softmax), top-k, and the linear probe."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evals.classify import evaluate_classification, multiview_clips, spatial_crops, train_probe
from tests.conftest import TINY_TOWERS
from tests.eval_helpers import single_thread  # noqa: F401  (fixture)
from vlm.data.classification import ClassItem, load_classification
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


def test_the_classification_loader_names_file_line_and_reason(tmp_path):
    """One loader for training and evaluation: every malformed record is an error naming the file, the line (JSONL)
    or record index (JSON list) and the reason; `label_id` alone picks its class."""
    import re

    from vlm.data.conversation import DataFormatError

    good = json.dumps({"video": "a.mp4", "label": "red"})
    cases = [('{"video": "a.mp4"}', "needs 'video' and 'label' (or 'label_id')"),
             ('{"video": "a.mp4", "label": "pink"}', "label 'pink' is not one of the 3 classes"),
             ('{"video": "a.mp4", "label": "red", "label_id": 2}', "label_id 2 disagrees with label 'red' (0)"),
             ('{"video": "a.mp4", "label_id": 7}', "label_id 7 is not a class index (0 to 2)"),
             ('{"video": "a.mp4", "label_id": "1"}', "label_id '1' is not a class index (0 to 2)"),
             ('{"video": ', "malformed JSON")]
    path = tmp_path / "c.jsonl"
    for line, reason in cases:
        path.write_text(f"{good}\n\n{line}\n")  # the blank line still counts: the bad record is on line 3
        with pytest.raises(DataFormatError, match="^" + re.escape(f"{path}:3: {reason}")):
            load_classification(path, classes=CLASSES)
    (tmp_path / "c.json").write_text(json.dumps([json.loads(good), {"video": "b.mp4", "label_id": 2, "id": "x"}, 3]))
    with pytest.raises(DataFormatError, match="^" + re.escape(f"{tmp_path / 'c.json'}[2]: needs 'video'")):
        load_classification(tmp_path / "c.json", classes=CLASSES)
    (tmp_path / "c.json").write_text(json.dumps([json.loads(good), {"video": "b.mp4", "label_id": 2, "id": "x"}]))
    items, names = load_classification(tmp_path / "c.json", classes=CLASSES)
    assert names == CLASSES and [(i.uid, i.label, i.label_id) for i in items] == [("0", "red", 0), ("x", "blue", 2)]
    assert items[0].video == tmp_path / "a.mp4"


SEVEN = CLASSES + ["c3", "c4", "c5", "c6"]  # more classes than k = 5

# Both views of a video give these class weights (logits = log(weight), so softmax = weight / sum): the class
# order, most probable first; weight 7 - position.
ORDERS = {"red1": [3, 0, 1, 2, 4, 5, 6],     # truth 0 at rank 2: top-1 miss, top-5 hit
          "red2": [1, 2, 3, 4, 5, 0, 6],     # truth 0 at rank 6: misses both
          "green0": [1, 0, 2, 3, 4, 5, 6],   # rank 1
          "green1": [0, 2, 3, 4, 1, 5, 6],   # rank 5: a top-5 hit only when k is 5
          "green2": [1, 6, 5, 4, 3, 2, 0],   # rank 1
          "blue0": [0, 1, 3, 4, 5, 6, 2],    # rank 7
          "blue1": [6, 5, 2, 0, 1, 3, 4]}    # rank 3
# red0 (truth 0): view 0 is confident in class 0, view 1 prefers classes 2 and 1. Mean softmax = (W0 + W1) / 40 =
# [12.5, 11, 9, 1.75, 2, 2.25, 1.5] / 40: class 0 first. Averaging logits instead (the product W0 * W1) would
# put class 1 first (28 > 8 > 6).
RED0 = ([12, 4, 1, 0.25, 1.5, 0.5, 0.75], [0.5, 7, 8, 1.5, 0.5, 1.75, 0.75])


def _scripted(calls):
    def classifier(view):
        stem = Path(view.source).stem
        k = sum(1 for c in calls if c == stem)
        calls.append(stem)
        if stem == "red0":
            return torch.tensor(RED0[k]).log()
        w = torch.zeros(7)
        w[ORDERS[stem]] = torch.arange(7, 0, -1, dtype=torch.float)
        return w.log() + 3.0 * k  # the second view's logits are shifted: the same softmax
    return classifier


def test_view_softmax_is_averaged_and_top_k_is_exact(data, tmp_path):
    """7 classes, 2 views (clips) per video, scripted logits; one undecodable video among 9 is skipped and named,
    the others keep their own labels. Hand-computed: top-1 3/8 (red0, green0, green2), top-5 6/8 (not red2, blue0),
    per class red 1/3, green 2/3, blue 0/2, mean class accuracy (100/3 + 200/3 + 0) / 3."""
    (tmp_path / "broken.mp4").write_text("not a video")
    names = ["red0", "red1", "red2", "broken", "green0", "green1", "green2", "blue0", "blue1"]
    rows = [{"id": n, "video": str(tmp_path / "broken.mp4") if n == "broken" else str(data / "videos" / f"{n}.mp4"),
             "label": "green" if n == "broken" else n[:-1]} for n in names]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items, classes = load_classification(tmp_path / "test.jsonl", classes=SEVEN)
    assert classes == SEVEN and [i.label_id for i in items] == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    calls = []
    res = evaluate_classification(_scripted(calls), items, classes, tmp_path / "out", num_frames=2, num_clips=2,
                                  num_crops=1, progress=False)
    assert sorted(calls) == sorted([n for n in names if n != "broken"] * 2)
    assert res.metrics["top1"] == pytest.approx(100 * 3 / 8) and res.metrics["top5"] == pytest.approx(100 * 6 / 8)
    assert res.metrics["mean_class_accuracy"] == pytest.approx(100 / 3) and "top3" not in res.metrics
    assert res.per_task["red"] == pytest.approx({"accuracy": 100 / 3, "videos": 3})
    assert res.per_task["green"] == pytest.approx({"accuracy": 200 / 3, "videos": 3})
    assert res.per_task["blue"] == {"accuracy": 0.0, "videos": 2} and res.per_task["c4"] == {"accuracy": None, "videos": 0}
    assert res.counts["videos"] == 9 and res.counts["scored"] == 8 and res.counts["skipped"] == 1
    assert res.settings["views"] == 2 and res.settings["top_k"] == [1, 5]
    recs = {r["uid"]: r for r in map(json.loads, (tmp_path / "out" / "predictions.jsonl").read_text().splitlines())
            if "uid" in r}
    assert recs["broken"]["error"].startswith("decode:") and "broken.mp4" in recs["broken"]["error"]
    assert recs["red0"]["top"] == [0, 1, 2, 5, 4] and recs["red0"]["views"] == 2
    assert recs["red0"]["top_probs"] == pytest.approx([12.5 / 40, 11 / 40, 9 / 40, 2.25 / 40, 2 / 40], abs=2e-6)
    for stem, order in ORDERS.items():
        assert recs[stem]["top"] == order[:5] and recs[stem]["label_id"] == SEVEN.index(stem[:-1])
        assert recs[stem]["top_probs"] == pytest.approx([7 / 28, 6 / 28, 5 / 28, 4 / 28, 3 / 28], abs=2e-6)
    with pytest.raises(ValueError, match="6 logits for 7 classes"):
        evaluate_classification(lambda view: torch.zeros(6), items[:1], classes, tmp_path / "six", num_frames=2,
                                progress=False)


def test_probe_features_and_labels_stay_aligned_past_undecodable_videos(data, tmp_path, monkeypatch):
    """train_probe skips an undecodable and a missing video: the probe is fitted on the other videos' features,
    each with its own label, and the classifier it returns is that probe over the clip's pooled tower features."""
    import evals.classify as classify
    from vlm.video import read_clip

    torch.manual_seed(0)
    tower = build_tower(**copy.deepcopy(TINY_TOWERS["clip"]))
    (tmp_path / "broken.mp4").write_text("not a video")
    v = data / "videos"
    items = [ClassItem("a", v / "red0.mp4", "red", 0), ClassItem("b", tmp_path / "broken.mp4", "blue", 2),
             ClassItem("c", v / "green1.mp4", "green", 1), ClassItem("d", tmp_path / "missing.mp4", "red", 0),
             ClassItem("e", v / "blue2.mp4", "blue", 2), ClassItem("f", v / "blue0.mp4", "blue", 2)]
    seen = {}
    real_fit = classify.fit_linear_probe

    def fit(features, labels, num_classes, **kw):
        seen.update(features=features, labels=labels, num_classes=num_classes)
        return real_fit(features, labels, num_classes, steps=5)

    monkeypatch.setattr(classify, "fit_linear_probe", fit)
    clf = train_probe(tower, items, 3, num_frames=4, progress=False)

    def pooled(path):  # the tower's tokens, mean over space then time, computed here
        with torch.no_grad():
            return tower.eval()(tower.preprocessor(read_clip(path, 4).frames)[None]).tokens.float().mean(dim=(1, 2))[0]

    good = [it for it in items if it.uid in "acef"]
    assert seen["labels"].tolist() == [0, 1, 2, 2] and seen["num_classes"] == 3
    assert torch.allclose(seen["features"], torch.stack([pooled(it.video) for it in good]), atol=1e-5)
    clip = read_clip(v / "green1.mp4", 4)
    assert torch.allclose(clf(clip), clf.probe(pooled(v / "green1.mp4")[None])[0], atol=1e-5)


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
