"""Probes: labels read from the ground truth, probes that find planted information and none where there is none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_tools.synth import generate
from evals.probe import LABELS, clip_labels, probe_labels, read_meta, run_probe
from tests.eval_helpers import single_thread  # noqa: F401  (fixture)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probe_world")
    generate(root, 24, seed=3, frames=16, size=96, eval_fraction=0.34, workers=1, progress=False)
    return root


def test_labels_follow_the_ground_truth(world):
    for m in read_meta(world):
        y = clip_labels(m)
        assert set(y) == set(LABELS)
        assert y["class"] == m["label_id"]
        if m["label"].startswith("moving "):
            assert ["left", "right", "up", "down"][y["direction"]] == m["label"].split()[1]
            assert y["moving_count"] >= 1
        else:
            assert y["direction"] is None
        if m["label"] == "shuffling":
            assert y["color"] is None and y["shape"] is None and y["cell"] is None
        else:
            assert 0 <= y["cell"] < 9 and y["color"] is not None
        if m["label"] in ("changing color", "growing", "shrinking", "rotating", "appearing", "disappearing"):
            assert y["moving_count"] == 0


def _planted(n: int, classes: int, informative: bool, seed: int = 0) -> tuple[torch.Tensor, list[dict], list[str]]:
    """n clips whose 'class' label is a direction in 400-d noise (or nothing but noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 400, generator=g)
    if informative:
        x += 0.3 * torch.randn(classes, 400, generator=g)[y]
    metas = [{"label": "x", "label_id": int(v)} for v in y]
    splits = ["test" if i % 4 == 0 else "train" for i in range(n)]
    return x, metas, splits


def test_probes_find_planted_information_and_not_noise(monkeypatch):
    monkeypatch.setitem(LABELS, "class", (6, lambda m: m["label_id"]))
    x, metas, splits = _planted(240, 6, informative=True)
    (row,) = probe_labels(x, metas, splits, ["class"])
    assert row.train == 180 and row.test == 60
    assert row.linear >= 90 and row.mlp >= 75  # chance is 16.7%
    x, metas, splits = _planted(240, 6, informative=False)
    (row,) = probe_labels(x, metas, splits, ["class"])
    assert row.linear <= 40 and row.mlp <= 40  # chance is 16.7%


def test_run_probe_end_to_end_writes_a_table(world, tmp_path):
    res = run_probe(["raw:8"], world, tmp_path, num_frames=4, labels=["class", "background"], progress=False)
    (src,) = res["sources"]
    assert src["source"] == "raw:8" and src["dim"] == 4 * 3 * 8 * 8 and src["clips"] == 24
    assert [r["label"] for r in src["rows"]] == ["class", "background"]
    assert json.loads((tmp_path / "probe.json").read_text()) == res
    assert "| raw:8 | 768 |" in (tmp_path / "probe.md").read_text()
    with pytest.raises(ValueError, match="probe source"):
        run_probe(["nonsense"], world, None, progress=False)
