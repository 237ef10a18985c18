"""Visual reliance: own-video vs swapped-video answer loss, on scripted fake models and a tiny real one."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
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
    processor = property(lambda self: self)  # the fake is its own processor

    def __init__(self, rule):
        self.rule = rule

    def make_sample(self, turns, clip, sample_id="sample"):
        return {"id": sample_id, "clip_mean": round(float(clip.frames.astype("float64").mean()), 4)}

    def build_batch(self, samples):
        return list(samples)

    def answer_losses(self, batch):
        assert not torch.is_grad_enabled(), "the model is asked without autograd"
        return [self.rule(sample["id"], sample["clip_mean"]) for sample in batch]

    def __call__(self, batch):  # share_prefix=False: one sample a forward
        assert len(batch) == 1
        return SimpleNamespace(loss=torch.tensor(self.answer_losses(batch)[0]))


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
    with pytest.raises(ValueError, match="at least 2 different videos"):
        visual_reliance(FakeModel(lambda sid, mean: 1.0), root / "one.json")


def test_tiny_videollm_runs_and_loss_depends_on_the_clip(data):
    from vlm.model import VideoLLM

    root, files = data
    torch.manual_seed(0)
    model = VideoLLM.from_config({"tower": TINY_TOWERS["clip"] | {"image_size": 32}, "connector": {"name": "mlp"},
                                  "llm": TINY_LLM, "num_frames": 4}).eval()
    result = visual_reliance(model, files["instruct"], limit=4, partners=2)
    m = result.metrics
    assert m["samples"] == 4 and all(torch.isfinite(torch.tensor([m["loss_own"], m["loss_swapped"]])))
    assert m["gap"] != 0.0  # a random connector passes the frames through: swapping them changes the loss
    alone = visual_reliance(model, files["instruct"], limit=4, partners=2, share_prefix=False).metrics
    # each clip's shared start computed once: the same numbers, to fp32 rounding of losses near 10 (the gap is a
    # difference of two of them, so its rounding is absolute, about 1e-6, not relative to the small gap)
    assert m == pytest.approx(alone, rel=1e-4, abs=1e-5)


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


@pytest.fixture(scope="module")
def shared_videos(tmp_path_factory):
    """Two videos whose brightness changes over time (so windows of one video differ), five samples: three of
    video A (first half, second half, whole), two of B (first half, whole); kinds mcq x4 and open x1."""
    from vlm.video import write_video

    root = tmp_path_factory.mktemp("shared")
    (root / "videos").mkdir()
    for name, base in (("a", 30), ("b", 150)):
        frames = np.stack([np.full((16, 16, 3), base + 10 * t, dtype=np.uint8) for t in range(8)])
        write_video(root / "videos" / f"{name}.mp4", frames, fps=4)
    specs = [("s1_mcq1", "a", 0.0, 1.0), ("s2_mcq2", "a", 1.0, 2.0), ("s3_open", "a", None, None),
             ("s4_mcq3", "b", 0.0, 1.0), ("s5_mcq4", "b", None, None)]
    records = []
    for sid, video, start, end in specs:
        rec = {"id": sid, "video": f"videos/{video}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nHow bright is it?"}, {"from": "gpt", "value": "Quite."}]}
        if start is not None:
            rec |= {"start": start, "end": end}
        records.append(rec)
    (root / "shared.json").write_text(json.dumps(records))
    means = {sid: round(float(read_clip(root / "videos" / f"{v}.mp4", 2, "uniform", a, b).frames.astype("float64").mean()), 4)
             for sid, v, a, b in specs}
    return root / "shared.json", {sid: v for sid, v, _, _ in specs}, means


def test_swapped_clip_is_always_another_videos_and_gaps_are_exact(shared_videos):
    """Samples sharing a video are never each other's "other clip": each sample is scored with its own clip (its own
    window) and then with the clip of a sample of the other video. Losses are scripted per sample, so every metric
    is computed by hand below, overall and per kind (a kind with one sample has a standard error of 0)."""
    data, video_of, means = shared_videos
    assert len(set(means.values())) == 5  # every sample's own clip differs, windows of one video included
    own = {"s1_mcq1": 0.5, "s2_mcq2": 2.0, "s3_open": 1.0, "s4_mcq3": 0.75, "s5_mcq4": 1.25}
    other = {"s1_mcq1": 2.0, "s2_mcq2": 1.0, "s3_open": 1.0, "s4_mcq3": 1.25, "s5_mcq4": 2.75}
    calls = []

    class Recording(FakeModel):
        training = True  # a model in training mode: it must be scored in eval mode and given back in training mode

        def eval(self):
            self.training = False
            return self

        def train(self, mode=True):
            self.training = mode
            return self

        def make_sample(self, turns, clip, sample_id="sample"):
            calls.append((sample_id, round(float(clip.frames.astype("float64").mean()), 4), len(clip.frames), self.training))
            return super().make_sample(turns, clip, sample_id)

    model = Recording(lambda sid, mean: own[sid] if mean == means[sid] else other[sid])
    result = visual_reliance(model, data, limit=5, num_frames=2, seed=3)
    assert model.training is True and result.settings["num_frames"] == 2
    assert all(n == 2 and not training for _, _, n, training in calls)
    assert sorted(sid for sid, *_ in calls) == sorted(list(own) * 2)
    for sid in own:  # scored with its own clip and one other (a clip's samples are scored together, in clip order)
        own_clip, swapped_clip = sorted((c[1] for c in calls if c[0] == sid), key=lambda m: m != means[sid])
        assert own_clip == means[sid]
        assert swapped_clip in {means[s] for s, v in video_of.items() if v != video_of[sid]}, (sid, swapped_clip)
    # gaps (swapped - own): s1 1.5, s2 -1.0, s3 0.0, s4 0.5, s5 1.5
    m = result.metrics
    assert m["samples"] == 5 and m["loss_own"] == pytest.approx(5.5 / 5) and m["loss_swapped"] == pytest.approx(8.0 / 5)
    assert m["gap"] == pytest.approx(0.5)
    # deviations from 0.5: 1.0, -1.5, -0.5, 0.0, 1.0 -> squares sum 4.5; variance 4.5 / 4; stderr sqrt(variance / 5)
    assert m["gap_stderr"] == pytest.approx(math.sqrt(4.5 / 4 / 5))
    assert m["gap_percent"] == pytest.approx(100 * 0.5 / 1.6)
    assert m["own_preferred_percent"] == pytest.approx(100 * 3.5 / 5)  # three positive gaps and a tie (half)
    assert set(result.per_task) == {"mcq", "open"}
    mcq = result.per_task["mcq"]  # s1, s2, s4, s5: gaps 1.5, -1.0, 0.5, 1.5, mean 0.625
    assert mcq["samples"] == 4 and mcq["loss_own"] == pytest.approx(4.5 / 4) and mcq["loss_swapped"] == pytest.approx(7.0 / 4)
    assert mcq["gap"] == pytest.approx(0.625) and mcq["own_preferred_percent"] == 75.0
    # deviations 0.875, -1.625, -0.125, 0.875 -> squares sum 4.1875
    assert mcq["gap_stderr"] == pytest.approx(math.sqrt(4.1875 / 3 / 4))
    assert mcq["gap_percent"] == pytest.approx(100 * 0.625 / 1.75)
    assert result.per_task["open"] == pytest.approx({"samples": 1, "loss_own": 1.0, "loss_swapped": 1.0, "gap": 0.0,
                                                     "gap_stderr": 0.0, "gap_percent": 0.0, "own_preferred_percent": 50.0})


@pytest.mark.parametrize("seed", range(4))
def test_swap_partner_is_the_next_sample_of_another_video_in_the_seeded_shuffle(shared_videos, seed):
    """As documented (settings.swap): shuffle the samples with random.Random(seed); a sample's other clip is that of
    the next sample, cyclically, whose video differs."""
    import random

    data, video_of, means = shared_videos
    order = list(video_of)  # file order
    random.Random(seed).shuffle(order)
    seen = []
    model = FakeModel(lambda sid, mean: seen.append((sid, mean)) or 1.0)
    visual_reliance(model, data, limit=5, num_frames=2, seed=seed)
    for i, sid in enumerate(order):
        partner = next(order[k % 5] for k in range(i + 1, i + 5) if video_of[order[k % 5]] != video_of[sid])
        assert sorted(mean for s, mean in seen if s == sid) == sorted([means[sid], means[partner]])


def test_several_partners_are_the_next_samples_of_other_videos_and_pairs_are_counted(data):
    """partners=3: each sample is scored with its own clip and the clips of the next three samples with another
    video, in order; the swapped loss is their mean and own_preferred counts (sample, partner) pairs."""
    import random

    root, files = data
    records = [r for r in json.loads(files["captions"].read_text()) if r["id"].startswith("cap")]
    mean_of = {r["id"]: round(float(read_clip(root / r["video"], 4).frames.astype("float64").mean()), 4)
               for r in records}
    sample_of = {m: sid for sid, m in mean_of.items()}
    seen: list[tuple[str, str]] = []
    loss = {"cap0": 1.0, "cap1": 2.0, "cap2": 3.0, "cap3": 4.0}  # a sample's loss with the clip of sample X: loss[X]

    def rule(sid, mean):
        seen.append((sid, sample_of[mean]))
        return loss[sample_of[mean]]

    result = visual_reliance(FakeModel(rule), files["captions"], limit=10, partners=3, seed=5)
    order = [r["id"] for r in json.loads(files["captions"].read_text()) if r["id"] != "noplaceholder"]
    random.Random(5).shuffle(order)  # malformed records are left out before the shuffle, undecodable clips after it
    order = [s for s in order if s in loss]
    expect = [(sid, c) for i, sid in enumerate(order) for c in [sid] + [order[(i + k) % 4] for k in (1, 2, 3)]]
    assert sorted(seen) == sorted(expect)  # every pair once (scored clip by clip)
    # every sample meets every other clip once: a sample prefers its own clip to those with a higher loss
    pairs = sum(loss[o] > loss[s] for s in loss for o in loss if o != s)
    m = result.metrics
    assert m["own_preferred_percent"] == pytest.approx(100 * pairs / 12)
    assert m["loss_swapped"] == pytest.approx(sum((10.0 - loss[s]) / 3 for s in loss) / 4)
    assert result.settings["partners"] == 3
    with pytest.raises(ValueError, match="4 partner"):
        visual_reliance(FakeModel(rule), files["captions"], limit=10, partners=4)


def test_each_sample_is_logged_as_it_is_scored_and_a_rerun_resumes(data, tmp_path):
    root, files = data
    calls: list[str] = []
    first = visual_reliance(FakeModel(lambda sid, mean: calls.append(sid) or mean / 100), files["captions"], tmp_path,
                            limit=10, partners=2)
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and len(calls) == 12
    assert all(len(x["swapped"]) == len(x["partner_ids"]) == 2 and x["uid"] not in x["partner_ids"] for x in lines)
    again = visual_reliance(FakeModel(lambda sid, mean: pytest.fail("asked again")), files["captions"], tmp_path,
                            limit=10, partners=2)
    assert again.metrics == first.metrics and again.counts["resumed"] == 4
    calls.clear()  # a third partner: every sample is scored anew (its record is against other partners)
    visual_reliance(FakeModel(lambda sid, mean: calls.append(sid) or 1.0), files["captions"], tmp_path, limit=10,
                    partners=3)
    assert len(calls) == 16


def test_zero_losses_give_zero_gap_percent(data):
    root, files = data
    m = visual_reliance(FakeModel(lambda sid, mean: 0.0), files["captions"], limit=4).metrics
    assert m["gap_percent"] == 0.0 and m["gap"] == 0.0 and m["gap_stderr"] == 0.0


def test_kinds_from_ids_and_a_two_sample_kind_stderr(tmp_path):
    """A sample's kind is its id's suffix after the LAST "_" with trailing digits dropped (other letters kept), or
    "sample" when nothing is left; a kind of two samples has the standard error sqrt(var / 2) with var over n - 1 = 1."""
    from vlm.video import write_video

    (tmp_path / "videos").mkdir()
    for name, base in (("a", 40), ("b", 160)):
        write_video(tmp_path / "videos" / f"{name}.mp4", np.full((4, 16, 16, 3), base, dtype=np.uint8), fps=4)
    specs = [("x_y_mcq1", "a"), ("clip_mcq2", "b"), ("q_7", "a"), ("r_boX2", "b"), ("42", "a")]
    (tmp_path / "d.json").write_text(json.dumps([
        {"id": sid, "video": f"videos/{v}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "That."}]} for sid, v in specs]))
    means = {sid: round(float(read_clip(tmp_path / "videos" / f"{v}.mp4", 2).frames.astype("float64").mean()), 4)
             for sid, v in specs}
    own = {"x_y_mcq1": 1.0, "clip_mcq2": 1.0, "q_7": 0.5, "r_boX2": 2.0, "42": 1.0}
    other = {"x_y_mcq1": 2.0, "clip_mcq2": 1.0, "q_7": 0.75, "r_boX2": 1.0, "42": 1.5}
    result = visual_reliance(FakeModel(lambda sid, mean: own[sid] if mean == means[sid] else other[sid]),
                             tmp_path / "d.json", limit=5, num_frames=2)
    assert set(result.per_task) == {"mcq", "sample", "boX"}
    mcq = result.per_task["mcq"]  # gaps 1.0 and 0.0: mean 0.5, var (0.25 + 0.25) / 1, stderr sqrt(0.5 / 2) = 0.5
    assert mcq["samples"] == 2 and mcq["gap"] == pytest.approx(0.5) and mcq["gap_stderr"] == pytest.approx(0.5)
    assert mcq["own_preferred_percent"] == 75.0
    sample = result.per_task["sample"]  # q_7 and 42: gaps 0.25 and 0.5
    assert sample["samples"] == 2 and sample["gap"] == pytest.approx(0.375)
    assert sample["gap_stderr"] == pytest.approx(math.sqrt(2 * 0.125 ** 2 / 1 / 2))
    assert result.per_task["boX"]["samples"] == 1 and result.per_task["boX"]["gap"] == pytest.approx(-1.0)


def test_bench_reliance_times_both_ways_and_they_agree(data, tmp_path, capsys):
    import sys

    from vlm.model import VideoLLM

    root, files = data
    torch.manual_seed(0)
    VideoLLM.from_config({"tower": TINY_TOWERS["clip"] | {"image_size": 32}, "connector": {"name": "mlp"},
                          "llm": TINY_LLM, "num_frames": 4}).save_pretrained(tmp_path / "model")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_reliance import main

    assert main(["--model", str(tmp_path / "model"), "--data", str(files["instruct"]), "--limit", "3",
                 "--partners", "2", "--repeats", "1", "--no-docs"]) == 0
    out = capsys.readouterr().out
    assert "| one forward per (sample, clip) pair" in out and "3 held-out samples" in out and "(9 pairs)" in out
    shares = [float(x) for x in out.split("Own clip preferred in ")[1].split(" of pairs")[0].replace("%", "").split(" / ")]
    assert shares[0] == shares[1]
