"""Visual reliance: own-video vs swapped-video answer loss, on scripted fake models and a tiny real one."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from evals.reliance import visual_reliance
from evals.results import EvalResult
from tests.conftest import TINY_LLM, TINY_TOWERS
from tests.eval_helpers import single_thread  # noqa: F401  (fixture)
from tests.train_helpers import make_tiny_data
from vlm.video import read_clip


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    yield


class FakeModel:
    """Loss from a rule over (sample id, the clip it was given): scripts a blind or a sighted model."""

    config = SimpleNamespace(num_frames=4)

    def __init__(self, rule):
        self.rule = rule

    def make_sample(self, turns, clip, sample_id="sample"):
        return {"id": sample_id, "clip_mean": round(float(clip.frames.astype("float64").mean()), 4)}

    def build_batch(self, samples):
        return samples[0]

    def __call__(self, sample):
        return SimpleNamespace(loss=torch.tensor(self.rule(sample["id"], sample["clip_mean"])))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliance")
    files = make_tiny_data(root, n=4, frames=4, bad=True)  # 4 distinct clips + a missing, a broken video and a bad record
    return root, files


def test_blind_model_has_no_gap_and_bad_clips_are_skipped(data):
    root, files = data
    result = visual_reliance(FakeModel(lambda sid, mean: 1.25), files["captions"], limit=10)
    m = result.metrics
    assert m["samples"] == 4 and m["gap"] == 0.0 and m["own_preferred_percent"] == 50.0
    assert m["loss_own"] == m["loss_swapped"] == 1.25
    reasons = result.counts["skipped_reasons"]
    assert result.counts["skipped"] == 3 and any("nope.mp4" in r for r in reasons) and any("noplaceholder" in r for r in reasons)


def test_sighted_model_prefers_its_own_video(data, tmp_path):
    root, files = data
    records = json.loads(files["captions"].read_text())
    own_mean = {r["id"]: round(float(read_clip(root / r["video"], 4).frames.astype("float64").mean()), 4)
                for r in records if r["id"].startswith("cap")}
    assert len(set(own_mean.values())) == 4  # the four clips differ
    result = visual_reliance(FakeModel(lambda sid, mean: 0.5 if own_mean[sid] == mean else 1.5), files["captions"],
                             tmp_path / "out", limit=3, seed=1)
    m = result.metrics
    assert m["samples"] == 3 and m["gap"] == pytest.approx(1.0) and m["gap_stderr"] == pytest.approx(0.0)
    assert m["own_preferred_percent"] == 100.0 and m["gap_percent"] == pytest.approx(100 / 1.5)
    assert set(result.per_task) == {"cap"}
    assert EvalResult.load(tmp_path / "out" / "results.json").task_type == "reliance"


def test_template_mismatch_skips_the_sample_and_names_it(data):
    from vlm.llm.template import TemplateMismatchError

    root, files = data

    def rule(sid, mean):
        if sid == "cap1":
            raise TemplateMismatchError("sample cap1: the template's tokens differ from the tokenizer's")
        return 1.0

    result = visual_reliance(FakeModel(rule), files["captions"], limit=4)
    assert result.metrics["samples"] == 3 and result.counts["scored"] == 3
    assert result.counts["asked"] == result.counts["scored"] + result.counts["skipped"]
    assert any("cap1" in r for r in result.counts["skipped_reasons"])


def test_one_video_only_is_refused(data, tmp_path):
    root, files = data
    records = json.loads(files["captions"].read_text())[:1]
    (root / "one.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="at least two different videos"):
        visual_reliance(FakeModel(lambda sid, mean: 1.0), root / "one.json")


def test_tiny_videollm_runs_and_loss_depends_on_the_clip(data):
    from vlm.model import VideoLLM

    root, files = data
    torch.manual_seed(0)
    model = VideoLLM.from_config({"tower": TINY_TOWERS["clip"] | {"image_size": 32}, "connector": {"name": "mlp"},
                                  "llm": TINY_LLM, "num_frames": 4}).eval()
    result = visual_reliance(model, files["instruct"], limit=4)
    m = result.metrics
    assert m["samples"] == 4 and all(torch.isfinite(torch.tensor([m["loss_own"], m["loss_swapped"]])))
    assert m["gap"] != 0.0  # a random connector passes the frames through: swapping them changes the loss


def test_cli_reliance_writes_results_report_and_chart(data, tmp_path):
    from vlm.cli import main
    from vlm.model import VideoLLM

    root, files = data
    torch.manual_seed(0)
    VideoLLM.from_config({"tower": TINY_TOWERS["clip"] | {"image_size": 32}, "connector": {"name": "mlp"},
                          "llm": TINY_LLM, "num_frames": 4}).save_pretrained(tmp_path / "model")
    assert main(["eval", "reliance", "--model", str(tmp_path / "model"), "--data", str(files["instruct"]),
                 "--limit", "3", "--out", str(tmp_path / "rel")]) == 0
    result = EvalResult.load(tmp_path / "rel" / "results.json")
    assert result.metrics["samples"] == 3 and result.settings["num_frames"] == 4
    assert (tmp_path / "rel" / "per_task.png").is_file() and "reliance" in (tmp_path / "rel" / "report.md").read_text()


def test_unequal_and_negative_gaps_give_the_exact_mean_stderr_and_share(data):
    """Per-sample losses that differ (one sample prefers the other clip): the metrics are the exact mean gap, its
    standard error over samples (n - 1 in the variance), the share of samples with a positive gap and the mean
    losses; a partner with the sample's own video would give a gap of 0 there and break the equalities."""
    import statistics

    root, files = data
    records = [r for r in json.loads(files["captions"].read_text()) if r["id"].startswith("cap")]
    own_mean = {r["id"]: round(float(read_clip(root / r["video"], 4).frames.astype("float64").mean()), 4)
                for r in records}
    own = {"cap0": 0.5, "cap1": 1.0, "cap2": 2.0, "cap3": 0.25}
    other = {"cap0": 1.5, "cap1": 1.25, "cap2": 1.0, "cap3": 1.25}  # cap2 is better off with another clip
    result = visual_reliance(FakeModel(lambda sid, mean: own[sid] if mean == own_mean[sid] else other[sid]),
                             files["captions"], limit=10)
    gaps = [other[k] - own[k] for k in own]
    m = result.metrics
    assert m["samples"] == 4
    assert m["gap"] == pytest.approx(statistics.mean(gaps))
    assert m["gap_stderr"] == pytest.approx(statistics.stdev(gaps) / 2.0)  # sqrt(4) = 2
    assert m["own_preferred_percent"] == 75.0
    assert m["loss_own"] == pytest.approx(statistics.mean(own.values()))
    assert m["loss_swapped"] == pytest.approx(statistics.mean(other.values()))
