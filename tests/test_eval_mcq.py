"""Multiple-choice harness with scripted models: scoring, parsing rules, decode-once, resume, results files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import evals.mcq as mcq
from evals.mcq import evaluate_mcq
from evals.profiles import check_ans, lmms_eval_extract, mvbench_turns, parse_lmms_eval, parse_mvbench
from evals.report import paired_difference, write_report
from evals.results import EvalResult
from tests.eval_helpers import ScriptedModel, make_bench
from vlm.data.mvbench import LETTERS, load_mvbench
from tests.eval_helpers import single_thread  # noqa: F401  (fixture)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_bench(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def truth(bench) -> dict[str, str]:
    return {i.uid: i.answer_letter for items in load_mvbench(bench).values() for i in items}


def answer_as(profile: str, letter: str, text: str = "something") -> str:
    """What a model that means `letter` says under a profile (after the prefill, if any)."""
    return f"{letter}) {text}" if profile == "mvbench" else f"{letter}. {text}"


@pytest.mark.parametrize("profile", ["mvbench", "lmms_eval"])
def test_always_right_scores_100_and_always_c_scores_the_share_of_c(bench, truth, tmp_path, profile):
    right = ScriptedModel(lambda r: answer_as(profile, truth[r.uid]))
    res = evaluate_mcq(right, bench, tmp_path / "right", profile=profile, progress=False)
    assert res.metrics["accuracy_over_questions"] == 100.0
    assert res.metrics["accuracy_mean_over_tasks"] == 100.0
    assert res.metrics["accuracy_mean_over_tasks_stderr"] == 0.0 and res.metrics["accuracy_over_questions_stderr"] == 0.0
    assert res.metrics["unparsable"] == 0
    assert res.counts["skipped"] == 1 and res.counts["skip_reasons"] == {"decode": 1}  # missing.mp4

    always_c = ScriptedModel(lambda r: answer_as(profile, "C"))
    res = evaluate_mcq(always_c, bench, tmp_path / "c", profile=profile, progress=False)
    data = load_mvbench(bench)
    shares = {}
    for task, items in data.items():
        scored = [i for i in items if i.video.name != "missing.mp4"]
        shares[task] = 100.0 * sum(i.answer_letter == "C" for i in scored) / len(scored)
        assert res.per_task[task]["accuracy"] == pytest.approx(shares[task])
        assert res.per_task[task]["chance"] == pytest.approx(100.0 * np.mean([1 / len(i.candidates) for i in items]))
        hits = [100.0 * (i.answer_letter == "C") for i in scored]  # the standard error of the mean of 0/100 scores
        assert res.per_task[task]["stderr"] == pytest.approx(np.std(hits, ddof=1) / np.sqrt(len(hits)))
    assert res.metrics["accuracy_mean_over_tasks"] == pytest.approx(np.mean(list(shares.values())))
    task_errors = [res.per_task[t]["stderr"] for t in shares]
    assert res.metrics["accuracy_mean_over_tasks_stderr"] == pytest.approx(np.linalg.norm(task_errors) / len(shares))
    assert 0 < res.metrics["accuracy_mean_over_tasks_stderr"] < max(task_errors)
    weighted = sum(truth[u] == "C" for u in truth if u != "Moving Direction/6") / (len(truth) - 1)
    assert res.metrics["accuracy_over_questions"] == pytest.approx(100.0 * weighted)
    hits = [100.0 * (truth[u] == "C") for u in truth if u != "Moving Direction/6"]
    assert res.metrics["accuracy_over_questions_stderr"] == pytest.approx(np.std(hits, ddof=1) / np.sqrt(len(hits)))


@pytest.mark.parametrize("profile,reply", [("mvbench", "I cannot tell."), ("mvbench", ""), ("mvbench", ")"),
                                           ("lmms_eval", "I do not know"), ("lmms_eval", "F. the sixth")])
def test_unparsable_answers_are_counted_wrong_and_kept_in_the_denominator(bench, tmp_path, profile, reply):
    res = evaluate_mcq(ScriptedModel(lambda r: reply), bench, tmp_path, profile=profile, progress=False)
    n = res.counts["questions"] - res.counts["skipped"]
    assert res.metrics["unparsable"] == n == res.counts["scored"]
    assert res.metrics["accuracy_over_questions"] == 0.0
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert all(r["pred"] is None and r["correct"] is False for r in rows if not r.get("error"))


def test_loglik_picks_the_best_score_and_ties_are_unparsable(bench, truth, tmp_path):
    def scores(r):
        s = [-5.0] * len(r.continuations)
        s[LETTERS.index(truth[r.uid])] = -1.0
        assert r.continuations[0].startswith("A) ") and r.prefill == "Best option:("
        return s

    res = evaluate_mcq(ScriptedModel(scores=scores), bench, tmp_path / "a", profile="loglik", progress=False)
    assert res.metrics["accuracy_over_questions"] == 100.0
    tie = ScriptedModel(scores=lambda r: [0.0] * len(r.continuations))
    res = evaluate_mcq(tie, bench, tmp_path / "b", profile="loglik", progress=False)
    assert res.metrics["unparsable"] == res.counts["scored"] and res.metrics["accuracy_over_questions"] == 0.0


def test_each_clip_is_decoded_once_and_bounds_are_honoured(bench, truth, tmp_path, monkeypatch):
    calls: list[tuple[str, float | None, float | None]] = []
    real = mcq.read_clip

    def counting(path, num_frames, policy, start, end, **kw):
        calls.append((Path(path).name, start, end))
        return real(path, num_frames, policy, start, end, **kw)

    monkeypatch.setattr(mcq, "read_clip", counting)
    model = ScriptedModel(lambda r: "A) x")
    evaluate_mcq(model, bench, tmp_path, profile="mvbench", num_frames=4, progress=False, batch_size=3, workers=0)
    # Moving Direction: red, green, blue, missing; Action Sequence: 2 windows of long.mp4 + red; Episodic: 2 windows
    assert Counter(calls) == Counter([("red.mp4", None, None), ("green.mp4", None, None), ("blue.mp4", None, None),
                                      ("missing.mp4", None, None), ("long.mp4", 0.0, 2.0), ("long.mp4", 3.0, 6.0),
                                      ("red.mp4", 0.5, 2.5), ("ep1", 0.5, 3.0), ("ep1", 0.0, 3.3)])
    clips = model.clips
    assert clips["Moving Direction/0"] is clips["Moving Direction/1"]  # questions share the decoded clip
    assert clips["Action Sequence/0"] is clips["Action Sequence/1"]
    assert clips["Action Sequence/2"].timestamps.min() >= 3.0 and clips["Action Sequence/2"].timestamps.max() < 6.0
    assert len(clips["Moving Direction/0"]) == 4
    # frame folder, 1-based as MVBench's get_index reads it: window [0.5, 3.0] s at 3 fps -> start 2, end 9,
    # segment 1.75 -> 1-based frames int(2 + 0.875 + round(1.75 i)) = 2, 4, 6, 7 -> 0-based positions
    assert clips["Episodic Reasoning/0"].indices.tolist() == [1, 3, 5, 6]


def test_a_clip_asked_about_in_two_tasks_is_decoded_once_and_its_questions_are_asked_together(tmp_path, monkeypatch):
    """Questions about one clip are grouped across tasks: one decode, and they arrive in one batch (where a model
    computes the clip's video once for all of them)."""
    bench = make_bench(tmp_path / "bench", missing_video=False)
    (bench / "json" / "colour.json").write_text(json.dumps([
        {"video": "red.mp4", "question": "Is it red?", "candidates": ["yes", "no"], "answer": "yes"},
        {"video": "blue.mp4", "question": "Is it red?", "candidates": ["yes", "no"], "answer": "no"}]))
    manifest = json.loads((bench / "tasks.json").read_text())
    manifest.append({"task": "Colour", "json": "colour.json", "prefix": "video/", "data_type": "video", "bound": False})
    (bench / "tasks.json").write_text(json.dumps(manifest))
    calls: list[tuple[str, float | None, float | None]] = []
    real = mcq.read_clip
    monkeypatch.setattr(mcq, "read_clip", lambda path, n, policy, start, end, **kw:
                        calls.append((Path(path).name, start, end)) or real(path, n, policy, start, end, **kw))
    batches: list[list[str]] = []
    model = ScriptedModel(scores=lambda r: [0.0] * len(r.continuations))
    model.score_options = lambda reqs: batches.append([r.uid for r in reqs]) or ScriptedModel.score_options(model, reqs)
    res = evaluate_mcq(model, bench, tmp_path / "out", profile="loglik", num_frames=4, progress=False,
                       batch_size=3, workers=0)
    assert calls.count(("red.mp4", None, None)) == 1 and calls.count(("blue.mp4", None, None)) == 1
    assert res.counts["clips_decoded"] == len(set(calls)) == len(calls)
    assert model.clips["Colour/0"] is model.clips["Moving Direction/0"] is model.clips["Moving Direction/1"]
    assert batches[0] == ["Moving Direction/0", "Moving Direction/1", "Colour/0"]  # red.mp4's three questions


def test_resume_after_interruption_asks_only_the_rest(bench, truth, tmp_path):
    out = tmp_path / "run"
    first = ScriptedModel(lambda r: answer_as("mvbench", truth[r.uid]), interrupt_after=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate_mcq(first, bench, out, profile="mvbench", batch_size=2, progress=False)
    done_before = [json.loads(x)["uid"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert 0 < len(done_before) < len(truth)
    with open(out / "predictions.jsonl", "a") as f:  # a run killed mid-write leaves half a line
        f.write('{"uid": "Action Sequence/3", "pro')
    second = ScriptedModel(lambda r: answer_as("mvbench", truth[r.uid]))
    res = evaluate_mcq(second, bench, out, profile="mvbench", batch_size=2, progress=False)
    assert not set(second.asked) & set(first.asked)
    assert set(first.asked) | set(second.asked) == set(truth) - {"Moving Direction/6"}
    assert res.counts["resumed"] >= len(first.asked)
    clean = evaluate_mcq(ScriptedModel(lambda r: answer_as("mvbench", truth[r.uid])), bench, tmp_path / "clean",
                         profile="mvbench", progress=False)
    assert res.metrics == clean.metrics and res.per_task == clean.per_task
    third = ScriptedModel(lambda r: answer_as("mvbench", truth[r.uid]))
    evaluate_mcq(third, bench, out, profile="mvbench", progress=False)
    assert third.asked == []  # everything answered already (the undecodable clip is retried, not asked)
    with pytest.raises(ValueError, match="profile"):
        evaluate_mcq(third, bench, out, profile="lmms_eval", progress=False)  # never mix protocols in one file


def test_results_file_chart_and_report(bench, truth, tmp_path):
    evaluate_mcq(ScriptedModel(lambda r: "B) x"), bench, tmp_path, profile="mvbench", progress=False)
    res = EvalResult.load(tmp_path / "results.json")
    d = json.loads((tmp_path / "results.json").read_text())
    assert {"task_type", "profile", "judge", "model", "dataset", "metrics", "per_task", "counts", "settings",
            "created"} <= set(d)
    assert res.profile["name"] == "mvbench" and res.profile["prefill"] == "Best option:("
    assert res.settings["num_frames"] == 16 and res.settings["sampling"] == "segment_middle"
    assert (tmp_path / "per_task.png").stat().st_size > 1000
    report = (tmp_path / "report.md").read_text()
    assert "accuracy_mean_over_tasks" in report and "Moving Direction" in report


def test_clips_are_sampled_as_the_model_was_trained_unless_asked(bench, truth, tmp_path):
    from types import SimpleNamespace

    from evals.mcq import decode_item_clip

    items = {i.uid: i for task in load_mvbench(bench).values() for i in task}
    for asked, policy in ((None, "uniform"), ("segment_middle", "segment_middle")):
        model = ScriptedModel(lambda r: answer_as("mvbench", truth[r.uid]))
        model.config = SimpleNamespace(sampling="uniform")  # a VideoLLM's config: the policy it was trained with
        res = evaluate_mcq(model, bench, tmp_path / policy, profile="mvbench", sampling=asked, limit=2, progress=False)
        assert res.settings["sampling"] == policy
        uid, clip = next((u, c) for u, c in model.clips.items() if c is not None)
        own, other = (decode_item_clip(items[uid], 16, p).indices for p in (policy, {"uniform": "segment_middle",
                                                                                      "segment_middle": "uniform"}[policy]))
        assert clip.indices.tolist() == own.tolist() != other.tolist()


def test_clips_have_the_frame_count_the_model_was_trained_on_unless_asked(bench, truth, tmp_path):
    """A model trained on 8 frames is asked on 8 (its config's num_frames), not MVBench's 16: the CLI's default too."""
    from types import SimpleNamespace

    for asked, count in ((None, 8), (6, 6)):
        model = ScriptedModel(lambda r: answer_as("mvbench", truth[r.uid]))
        model.config = SimpleNamespace(sampling="uniform", num_frames=8)
        res = evaluate_mcq(model, bench, tmp_path / str(count), profile="mvbench", num_frames=asked, limit=2,
                           progress=False)
        assert res.settings["num_frames"] == count
        assert {len(c.indices) for c in model.clips.values() if c is not None} == {count}
    from vlm.cli import build_parser

    args = build_parser().parse_args(["eval", "mcq", "--model", "m", "--bench", "b", "--out", "o"])
    assert args.frames is None


def test_report_compares_runs_task_by_task(bench, truth, tmp_path):
    """Two runs on one benchmark: the report draws them side by side per task and links the picture."""
    evaluate_mcq(ScriptedModel(lambda r: "B) x"), bench, tmp_path / "a", profile="mvbench", progress=False)
    evaluate_mcq(ScriptedModel(lambda r: answer_as("mvbench", truth[r.uid])), bench, tmp_path / "b",
                 profile="mvbench", progress=False)
    runs = [EvalResult.load(tmp_path / x / "results.json") for x in "ab"]
    assert runs[1].metrics["accuracy_over_questions"] > runs[0].metrics["accuracy_over_questions"]
    report = write_report(runs, tmp_path / "cmp").read_text()
    assert (tmp_path / "cmp" / "report_per_task.png").stat().st_size > 1000
    assert "](report_per_task.png)" in report.splitlines()[2]
    from vlm.cli import main

    assert main(["eval", "report", *(str(tmp_path / x / "results.json") for x in "ab"), "--names", "always B",
                 "right", "--out", str(tmp_path / "cli")]) == 0
    cli_report = (tmp_path / "cli" / "report.md").read_text()
    assert "## mcq: always B" in cli_report
    b_right = sum(truth[u] == "B" for u in truth if u != "Moving Direction/6")  # missing.mp4 is skipped by both
    row = next(line for line in cli_report.splitlines() if line.startswith("| right |"))  # against the first, by question
    assert row.split(" | ")[1:3] == [str(len(truth) - 1), f"{100.0 * b_right / (len(truth) - 1):.1f}"]
    assert row.rstrip(" |").endswith(f"| 0 | {len(truth) - 1 - b_right}")  # right only in the first / in this run
    with pytest.raises(SystemExit, match="2 results"):
        main(["eval", "report", *(str(tmp_path / x / "results.json") for x in "ab"), "--names", "one",
              "--out", str(tmp_path / "cli")])
    write_report(runs[:1], tmp_path / "one")
    assert not (tmp_path / "one" / "report_per_task.png").exists()  # one run: its own chart only


def test_paired_difference_against_hand_computed_numbers():
    """Question by question: the differences, their paired standard errors (per task, then over tasks), who is right
    alone; error records and questions one run lacks are left out."""
    def rec(task: str, correct: bool, **extra) -> dict:
        return {"task": task, "correct": correct, **extra}

    first = {"a/0": rec("a", True), "a/1": rec("a", False), "a/2": rec("a", True), "b/0": rec("b", False),
             "b/1": rec("b", False), "b/2": rec("b", True, error="decode: bad"), "c/0": rec("c", True)}
    other = {"a/0": rec("a", True), "a/1": rec("a", True), "a/2": rec("a", False), "b/0": rec("b", True),
             "b/1": rec("b", True), "b/2": rec("b", True)}
    p = paired_difference(first, other)
    assert p["questions"] == 5 and p["tasks"] == 2  # b/2 is an error in the first run, c/0 is not in the other
    assert p["accuracy_first"] == pytest.approx(40.0) and p["accuracy_other"] == pytest.approx(80.0)
    d = np.array([0, 100, -100, 100, 100.0])
    assert p["difference_over_questions"] == pytest.approx(40.0)
    assert p["difference_over_questions_stderr"] == pytest.approx(d.std(ddof=1) / np.sqrt(5))
    se_a = np.array([0, 100, -100.0]).std(ddof=1) / np.sqrt(3)  # task b's differences are all +100: no spread
    assert p["difference_mean_over_tasks"] == pytest.approx((0.0 + 100.0) / 2)
    assert p["difference_mean_over_tasks_stderr"] == pytest.approx(se_a / 2)
    assert (p["right_only_first"], p["right_only_other"]) == (1, 3)
    assert paired_difference(first, {"a/0": rec("a", True)}) is None  # one shared question: nothing to say


def test_official_prompt_and_parsing_rules():
    from vlm.data.mvbench import MCQItem

    item = MCQItem("t", 0, Path("v.mp4"), "What happened?", ["Ate.", "Slept."], "Slept.", 1)
    system, user = mvbench_turns(item)
    assert system.role == "system" and system.text.startswith("Carefully watch the video")
    assert user.text.endswith("Question: What happened?\nOptions:\n(A) Ate.\n(B) Slept.\nOnly give the best option.")
    assert user.text.startswith("<video>\nCarefully watch the video")
    # check_ans: only the first word counts
    assert check_ans("(B) Slept.", "(B) Slept.") and check_ans("(b", "(B) Slept.") and not check_ans("(A) Slept.", "(B) x")
    assert check_ans("(", "(A) x") and check_ans("(", "(B) x")  # the notebook's quirk ...
    assert parse_mvbench("", 4).letter is None  # ... which we count as unparsable, not correct
    assert parse_mvbench("B) Slept.\nBecause ...", 2).letter == "B"
    assert parse_mvbench("\n\nB", 2).letter == "B"
    assert parse_mvbench("C) x", 2).letter is None  # not an option of this question
    # lmms-eval: "X. text" first, then a lone letter after normalisation
    assert lmms_eval_extract("B. Slept.") == "B"
    assert lmms_eval_extract("The answer is (C)") == "C"
    assert lmms_eval_extract("a dog") == "A"  # lmms-eval's quirk, reproduced
    assert lmms_eval_extract("none") is None
    assert parse_lmms_eval("E", 4).letter is None and parse_lmms_eval("D", 4).letter == "D"


def test_custom_profiles_register_once(bench, truth, tmp_path):
    import dataclasses

    from evals.profiles import PROFILES, get_profile, register_profile

    mine = dataclasses.replace(get_profile("lmms_eval"), name="lmms_eval_short", max_new_tokens=4)
    try:
        register_profile(mine)
        with pytest.raises(KeyError, match="already registered"):
            register_profile(mine)
        res = evaluate_mcq(ScriptedModel(lambda r: answer_as("lmms_eval", truth[r.uid])), bench, tmp_path,
                           profile="lmms_eval_short", progress=False)
        assert res.profile["name"] == "lmms_eval_short" and res.profile["max_new_tokens"] == 4
        assert res.metrics["accuracy_over_questions"] == 100.0
    finally:
        PROFILES.pop("lmms_eval_short", None)


def test_cloze_scores_option_texts_per_character_without_letters(bench, truth, tmp_path):
    """The cloze profile asks the question alone and compares option texts per character: a model whose summed
    log-likelihood is -0.5 per character, except -0.4 per character on the right option, is always right, although
    the right option's *sum* is not always the largest (long options are not penalised for their length)."""
    sum_would_be_wrong = []

    def scores(r):
        assert r.prefill == "" and r.clip is not None
        user = [t.text for t in r.turns if t.role == "user"]
        assert user == ["<video>\n" + r.question] and "(A)" not in user[0]
        assert r.continuations == r.options
        right = LETTERS.index(truth[r.uid])
        s = [(-0.4 if k == right else -0.5) * len(c) for k, c in enumerate(r.continuations)]
        sum_would_be_wrong.append(int(np.argmax(s)) != right)
        return s

    res = evaluate_mcq(ScriptedModel(scores=scores), bench, tmp_path, profile="cloze", progress=False)
    assert res.metrics["accuracy_over_questions"] == 100.0
    assert any(sum_would_be_wrong)  # the normalisation decided at least one question
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    scored = [r for r in rows if not r.get("error")]
    assert all(len(r["scores_normalized"]) == len(r["candidates"]) for r in scored)
    assert res.profile["score_norm"] == "chars"


def test_descriptions_replace_the_clip_and_a_missing_one_is_skipped(bench, truth, tmp_path, monkeypatch):
    """Text-oracle scoring: nothing is decoded, the prompt holds the video's description, a video without one
    is skipped and counted."""
    data = load_mvbench(bench)
    videos = sorted({i.video.name for items in data.values() for i in items})
    texts = {Path(v).stem: f"described {Path(v).stem}" for v in videos[1:]}  # the first video has none
    monkeypatch.setattr(mcq, "decode_item_clip", lambda *a, **k: pytest.fail("decoded a clip in oracle mode"))

    def scores(r):
        assert r.clip is None
        user = next(t.text for t in r.turns if t.role == "user")
        assert "<video>" not in user
        assert user.startswith("Video description: described ")
        return [-1.0 if k == LETTERS.index(truth[r.uid]) else -2.0 for k in range(len(r.continuations))]

    res = evaluate_mcq(ScriptedModel(scores=scores), bench, tmp_path, profile="cloze", descriptions=texts,
                       progress=False)
    missing = sum(i.video.name == videos[0] for items in data.values() for i in items)
    assert missing and res.counts["skipped"] == missing
    assert res.metrics["accuracy_over_questions"] == 100.0
    path = tmp_path / "d.json"
    path.write_text(json.dumps(texts))
    res2 = evaluate_mcq(ScriptedModel(scores=scores), bench, tmp_path / "file", profile="cloze", descriptions=path,
                        progress=False)
    assert res2.metrics == res.metrics and res2.settings["descriptions"] == str(path)


# ---------------------------------------------------------------------- the loglik picker
def test_pick_loglik_by_hand():
    assert mcq.pick_loglik([-3.0, -1.0, -2.0], 3) == mcq.Parsed("B", "B")
    assert mcq.pick_loglik([-1.0], 1).letter == "A"
    assert mcq.pick_loglik([-1.0, -1.0 + 1e-8, -1.0], 3).letter == "B"  # float64 differences decide, no tie
    assert mcq.pick_loglik(list(np.array([-1.0, -1.0 - 1e-8])), 2).letter == "A"  # numpy float64 too
    assert mcq.pick_loglik([-2.0, -1.0, -1.0, -3.0], 4) == mcq.Parsed(None, "", "tie between options ['B', 'C']")
    assert mcq.pick_loglik([float("-inf"), -1.0], 2) == mcq.Parsed(None, "", "non-finite score for options ['A']")
    assert mcq.pick_loglik([float("nan"), -1.0, float("inf")], 3).reason == "non-finite score for options ['A', 'C']"
    with pytest.raises(ValueError, match="Moving Direction/3: the model returned 2 scores for 3 options"):
        mcq.pick_loglik([-1.0, -2.0], 3, "Moving Direction/3")


@pytest.mark.parametrize("profile", ["loglik", "cloze"])
def test_scores_1e8_apart_are_not_ties_through_the_harness(bench, truth, tmp_path, profile):
    """Scores are compared as the float64 values the model returned: nothing on the way casts them down."""
    def scores(r):
        right = LETTERS.index(truth[r.uid])
        per_char = [(-1.0 + (1e-8 if k == right else 0.0)) for k in range(len(r.continuations))]
        return [s * len(c) if profile == "cloze" else s for s, c in zip(per_char, r.continuations)]

    res = evaluate_mcq(ScriptedModel(scores=scores), bench, tmp_path, profile=profile, progress=False)
    assert res.metrics["accuracy_over_questions"] == 100.0 and res.metrics["unparsable"] == 0
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    scored = [r for r in rows if not r.get("error")]
    assert scored and all(max(r["scores"]) - min(r["scores"]) > 0 for r in scored)  # stored without rounding


def test_non_finite_scores_are_unparsable_and_counted(bench, truth, tmp_path):
    """A NaN or infinite score makes the question unparsable: scored wrong, kept in the denominator, reason saved."""
    bad = {"Moving Direction/0": float("nan"), "Moving Direction/2": float("inf"), "Action Sequence/1": float("-inf")}

    def scores(r):
        right = LETTERS.index(truth[r.uid])
        s = [-1.0 if k == right else -2.0 for k in range(len(r.continuations))]
        if r.uid in bad:
            s[(right + 1) % len(s)] = bad[r.uid]  # a wrong option's score
        return s

    res = evaluate_mcq(ScriptedModel(scores=scores), bench, tmp_path, profile="loglik", progress=False)
    scored = res.counts["scored"]
    assert res.metrics["unparsable"] == 3 and res.counts["skipped"] == 1  # only missing.mp4 is skipped
    assert res.counts["correct"] == scored - 3
    assert res.metrics["accuracy_over_questions"] == pytest.approx(100.0 * (scored - 3) / scored)
    assert res.per_task["Moving Direction"]["unparsable"] == 2 and res.per_task["Action Sequence"]["unparsable"] == 1
    rows = {r["uid"]: r for r in map(json.loads, (tmp_path / "predictions.jsonl").read_text().splitlines())}
    for uid in bad:
        assert rows[uid]["pred"] is None and rows[uid]["correct"] is False
        assert rows[uid]["reason"].startswith("non-finite score for options")


@pytest.mark.parametrize("profile,extra", [("loglik", 1), ("loglik", -1), ("cloze", 1), ("cloze", -1)])
def test_a_wrong_number_of_scores_is_an_error_naming_the_question(bench, tmp_path, profile, extra):
    """A score count other than the option count is a bug in the model's adapter, not an answer: the run stops with
    a ValueError naming the question (with "chars" normalisation too, which pairs scores with options)."""
    def scores(r):
        n = len(r.continuations) + (extra if r.uid == "Action Sequence/2" else 0)
        return [-1.0 - k for k in range(n)]

    with pytest.raises(ValueError, match=r"Action Sequence/2: the model returned \d scores for 4 options"):
        evaluate_mcq(ScriptedModel(scores=scores), bench, tmp_path, profile=profile, progress=False)


@pytest.mark.parametrize("profile", ["mvbench", "lmms_eval", "loglik", "cloze"])
def test_requests_carry_the_profiles_settings(bench, tmp_path, profile):
    from evals.profiles import get_profile

    prof = get_profile(profile)
    seen = []

    def check(r):
        seen.append(r.uid)
        assert r.prefill == prof.prefill and r.question and r.options
        if prof.mode == "generate":
            assert (r.max_new_tokens, r.stop) == (prof.max_new_tokens, prof.stop)
        else:
            assert r.continuations == [f"{LETTERS[k]}) {o}" for k, o in enumerate(r.options)] if profile == "loglik" \
                else r.options
        return "A) x" if prof.mode == "generate" else [0.0] * len(r.options)

    fake = ScriptedModel(check, scores=check)
    evaluate_mcq(fake, bench, tmp_path, profile=profile, progress=False)
    assert len(seen) == 12
