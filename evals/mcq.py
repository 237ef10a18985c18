"""Multiple-choice video QA over the MVBench layout (MVBench itself, or any dataset written in its layout).

    from evals.mcq import evaluate_mcq
    result = evaluate_mcq(model, "data/MVBench", "runs/mvbench", profile="mvbench")
    result.metrics  # {"accuracy_mean_over_tasks": ..., "accuracy_over_questions": ..., "unparsable": ...}

What it does: questions are grouped by clip (video + start/end window) across tasks, each clip is decoded once (16
frames, sampled as the model was trained (a VideoLLM's `config.sampling`; MVBench's `segment_middle` for a model
without one, or when asked), frame folders 1-based as MVBench reads them), by
DataLoader workers while the model answers earlier questions, and shared by its questions; the model is asked in
batches through the `evals.interface` methods the profile needs, a clip's questions in one batch where they fit
(`VideoLLM.score_options` then computes the video they share once); every prediction is appended to
`OUT/predictions.jsonl` as it is made, so a rerun resumes where a run stopped. Under torchrun the clips are
shared out among the processes (`evals.shard`). A clip that cannot be decoded (or a question the model fails on) is skipped, counted and reported;
an unparsable answer is scored wrong and stays in the denominator. At the end `OUT/results.json`,
`OUT/per_task.png` (bars with chance level) and `OUT/report.md` are written.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from evals.interface import GenerationRequest, ScoringRequest, frames_of, model_id, sampling_of
from evals.profiles import MCQProfile, Parsed, get_profile, normalize_scores
from evals.results import EvalResult, PredictionLog
from evals.shard import Shard, current_shard, merge_logs, open_log
from vlm.data.conversation import Turn, describe_in_place
from vlm.data.mvbench import LETTERS, MCQItem, load_mvbench
from vlm.video import Clip, read_clip
from vlm.video.prefetch import prefetch_clips

log = logging.getLogger(__name__)


def clip_key(item: MCQItem) -> tuple[str, float | None, float | None]:
    """Questions with equal keys share one decoded clip: same source and same sampling window."""
    return (str(item.video), item.start, item.end)


def group_by_clip(items: Sequence[MCQItem]) -> dict[tuple[str, float | None, float | None], list[MCQItem]]:
    """Items grouped by `clip_key`, groups in order of first appearance."""
    groups: dict[tuple[str, float | None, float | None], list[MCQItem]] = {}
    for item in items:
        groups.setdefault(clip_key(item), []).append(item)
    return groups


def decode_item_clip(item: MCQItem, num_frames: int, sampling: str, backend: str = "auto") -> Clip:
    """The clip of an item as MVBench samples it: bounds honoured, frame folders numbered from 1."""
    return read_clip(item.video, num_frames, sampling, item.start, item.end, backend=backend, fps=item.fps,
                     first_index=1 if item.data_type == "frame" else 0)


def _check_score_count(scores: Sequence[float], num_options: int, uid: str) -> None:
    if len(scores) != num_options:
        raise ValueError(f"{uid}: the model returned {len(scores)} scores for {num_options} options "
                         f"(score_options must return one score per continuation)")


def pick_loglik(scores: Sequence[float], num_options: int, uid: str = "question") -> Parsed:
    """The best-scoring option; a tie for the best or a non-finite score is unparsable (never a guess).

    Scores are compared as the Python floats they are (never cast down), so scores 1e-8 apart are no tie.
    A score count other than `num_options` is a bug in the model's `score_options`: ValueError naming `uid`.
    """
    _check_score_count(scores, num_options, uid)
    bad = [LETTERS[i] for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        return Parsed(None, "", f"non-finite score for options {bad}")
    best = max(scores)
    winners = [i for i, s in enumerate(scores) if s == best]
    if len(winners) > 1:
        return Parsed(None, "", f"tie between options {[LETTERS[i] for i in winners]}")
    return Parsed(LETTERS[winners[0]], LETTERS[winners[0]])


def _check_model(model: Any, profile: MCQProfile) -> None:
    need = "generate_answers" if profile.mode == "generate" else "score_options"
    if not callable(getattr(model, need, None)):
        raise TypeError(f"profile '{profile.name}' needs a model with `{need}(requests)` (see evals/interface.py); "
                        f"{type(model).__name__} has none")


class _Runner:
    """Asks the model about a buffer of (item, clip) pairs and writes one record per item."""

    def __init__(self, model: Any, profile: MCQProfile, plog: PredictionLog):
        self.model, self.profile, self.plog = model, profile, plog
        self.first_error: BaseException | None = None

    def request(self, item: MCQItem, visual: Any) -> GenerationRequest | ScoringRequest:
        """The model request for one item; `visual` is its decoded clip, a text description of it (oracle), or
        its long video's `VideoMemory`."""
        p = self.profile
        turns = p.build_turns(item)
        clip: Clip | None = visual if isinstance(visual, Clip) else None
        if isinstance(visual, str):
            turns = [Turn(t.role, describe_in_place(t.text, visual)) if "<video>" in t.text else t for t in turns]
        common = dict(uid=item.uid, clip=clip, turns=turns, prefill=p.prefill, question=item.question,
                      options=list(item.candidates), visual=None if isinstance(visual, (Clip, str)) else visual)
        if p.mode == "generate":
            return GenerationRequest(**common, max_new_tokens=p.max_new_tokens, stop=p.stop)
        assert p.continuations is not None
        return ScoringRequest(**common, continuations=p.continuations(item))

    def ask(self, requests: list[Any]) -> list[Any]:
        if self.profile.mode == "generate":
            out = self.model.generate_answers(requests)
        else:
            out = self.model.score_options(requests)
        if len(out) != len(requests):
            raise ValueError(f"model returned {len(out)} answers for {len(requests)} requests")
        return list(out)

    def run(self, pairs: list[tuple[MCQItem, Clip | str]]) -> int:
        """Ask and record; on a failing batch, retry item by item and record the failures. Returns #scored."""
        if not pairs:
            return 0
        requests = [self.request(i, c) for i, c in pairs]
        try:
            outputs = self.ask(requests)
        except Exception as e:  # noqa: BLE001  (a bad sample must not end a long run)
            if len(pairs) == 1:
                self._error(pairs[0][0], "model", e)
                return 0
            log.warning("batch of %d failed (%s: %s); retrying one by one", len(pairs), type(e).__name__, e)
            return sum(self.run([p]) for p in pairs)
        for (item, _), out in zip(pairs, outputs):
            self.plog.write(self.record(item, out))
        return len(pairs)

    def record(self, item: MCQItem, output: Any) -> dict[str, Any]:
        n = len(item.candidates)
        rec: dict[str, Any] = {"uid": item.uid, "task": item.task, "index": item.index, "question": item.question,
                               "candidates": item.candidates, "answer": item.answer_letter}
        if self.profile.mode == "generate":
            assert self.profile.parse is not None
            parsed = self.profile.parse(str(output), n)
            rec["raw"] = str(output)
        else:
            assert self.profile.continuations is not None
            scores = [float(s) for s in output]
            _check_score_count(scores, n, item.uid)  # before normalising: the error names the question
            compared = normalize_scores(scores, self.profile.continuations(item), self.profile.score_norm)
            parsed = pick_loglik(compared, n, item.uid)
            rec["scores"] = scores
            if self.profile.score_norm != "sum":
                rec["scores_normalized"] = compared
        rec.update(parsed_answer=parsed.answer, pred=parsed.letter, parsed=parsed.letter is not None,
                   reason=parsed.reason, correct=parsed.letter == item.answer_letter)
        return rec

    def _error(self, item: MCQItem, stage: str, e: BaseException) -> None:
        if self.first_error is None:
            self.first_error = e
            log.error("%s (%s): %s failed: %s: %s", item.uid, item.video, stage, type(e).__name__, e)
        else:
            log.warning("%s (%s): %s failed: %s: %s", item.uid, item.video, stage, type(e).__name__, e)
        self.plog.write({"uid": item.uid, "task": item.task, "index": item.index, "video": str(item.video),
                         "error": f"{stage}: {type(e).__name__}: {e}"})


def evaluate_mcq(
    model: Any,
    bench_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    profile: str | MCQProfile = "mvbench",
    tasks: list[str] | None = None,
    num_frames: int | None = None,
    sampling: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    model_name: str | None = None,
    backend: str = "auto",
    progress: bool = True,
    descriptions: str | os.PathLike | dict[str, str] | None = None,
    workers: int = 2,
    memory: dict[str, Any] | None = None,
) -> EvalResult:
    """Evaluate `model` on an MVBench-layout benchmark; results, predictions, chart and report go to `out_dir`.

    `limit` keeps the first N questions of each task (quick runs). The model needs `generate_answers` for
    generation profiles (`mvbench`, `lmms_eval`) and `score_options` for the loglik ones (`loglik`, `cloze`).
    `descriptions` ({video file name or stem: text}, or a JSON file of it) scores the text oracle: each clip is
    replaced by "Video description: <text>" in the same prompt and nothing is decoded; a question whose video
    has no description is skipped and counted. `memory` ({"max_groups": 16, "fps": 1.0, "chunk_frames": 8}) asks
    each question about the whole video read through the long-video memory (`vlm.memory.encode_stream`: every
    frame at `fps`, chunk by chunk, consolidated into `max_groups` token groups) instead of `num_frames` sampled
    frames; it needs a VideoLLM. `workers` processes decode clips ahead of the model (0: in this
    process, when needed). Under torchrun (or `accelerate launch`) each process takes its share of the clips and
    rank 0 writes the results (see `evals.shard`).
    """
    prof = get_profile(profile) if isinstance(profile, str) else profile
    sampling = sampling_of(model, sampling, "segment_middle")
    num_frames = frames_of(model, num_frames)
    texts = _load_descriptions(descriptions)
    if memory is not None and (set(memory) - {"max_groups", "fps", "chunk_frames"} or texts is not None
                               or not callable(getattr(model, "encode_visual", None))):
        raise ValueError(f"memory: needs a VideoLLM, no descriptions, and settings among max_groups, fps, chunk_frames "
                         f"(got {sorted(memory)})")
    _check_model(model, prof)
    out = Path(out_dir)
    data = load_mvbench(bench_root, tasks)
    if limit is not None:
        data = {t: items[:limit] for t, items in data.items()}
    mid = model_id(model, model_name)
    identity = {"profile": prof.name, "model": mid}
    shard = current_shard()
    plog = open_log(out, shard, identity)
    runner = _Runner(model, prof, plog)
    all_items = [i for items in data.values() for i in items]
    groups = list(group_by_clip(all_items).values())  # one decode per clip, its questions side by side (shared prefix)
    jobs = [todo for g in shard.mine(groups) if (todo := [i for i in g if not plog.done(i.uid)])]
    pending = sum(len(j) for j in jobs)
    log.info("mcq: %d tasks, %d questions (%d to ask%s), profile '%s', model %s", len(data), len(all_items), pending,
             f" by rank {shard.rank} of {shard.world}" if shard.world > 1 else "", prof.name, mid)
    if texts is not None:
        clips = ((todo, *_description_of(texts, todo[0])) for todo in jobs)
    elif memory is not None:
        clips = _memories(model, jobs, memory)
    else:
        read = functools.partial(decode_group_clip, num_frames=num_frames, sampling=sampling, backend=backend)
        clips = prefetch_clips(jobs, read, workers=workers)
    decoded = asked = 0
    t0 = time.perf_counter()
    with plog, tqdm(total=pending, desc=f"mcq[{prof.name}]", unit="q", disable=not (progress and shard.main)) as bar:
        buffer: list[tuple[MCQItem, Clip | str]] = []
        for todo, clip, error in clips:
            if error is not None:
                for item in todo:
                    runner._error(item, "decode", error)
                bar.update(len(todo))
                continue
            decoded += texts is None
            if buffer and (memory is not None or len(buffer) + len(todo) > batch_size):
                asked += runner.run(buffer)  # a clip's questions go in one batch where they fit (a model computes
                bar.update(len(buffer))      # the video they share once); long videos' memories never share one
                buffer = []
            buffer += [(i, clip) for i in todo]
            while len(buffer) >= batch_size:
                asked += runner.run(buffer[:batch_size])
                bar.update(batch_size)
                buffer = buffer[batch_size:]
        asked += runner.run(buffer)
        bar.update(len(buffer))
    ranks = shard.gather({"asked": asked, "decoded": decoded, "error": repr(runner.first_error)})
    failure, result = None, None
    if shard.main:
        if shard.world > 1:
            merge_logs(out, identity, order=[i.uid for i in all_items])
        records = PredictionLog(out / "predictions.jsonl", identity).records if shard.world > 1 else plog.records
        if all_items and not any(u in records and not records[u].get("error") for u in (i.uid for i in all_items)):
            failure = f"mcq: no question could be scored; first error: {ranks[0]['error']}"
        else:
            result = _mcq_result(data, records, prof, mid, bench_root, shard, ranks, plog.resumed,
                                 time.perf_counter() - t0,
                                 settings={"num_frames": num_frames, "sampling": sampling, "limit": limit,
                                           "batch_size": batch_size, "backend": backend, "frame_folders_first_index": 1,
                                           "memory": memory,
                                           "descriptions": None if texts is None else (
                                               str(descriptions) if not isinstance(descriptions, dict)
                                               else f"{len(texts)} given")})
            result.save(out / "results.json")
            from evals.report import write_report

            write_report([result], out)
    failure = shard.gather(failure)[0]  # every rank waits for rank 0's results
    if failure:
        raise RuntimeError(failure)
    return result if result is not None else EvalResult.load(out / "results.json")


def _memories(model: Any, jobs: Sequence[Sequence[MCQItem]], settings: dict[str, Any]) -> Iterator[tuple[Any, Any, Any]]:
    """(questions, their video's memory, None) or (questions, None, the error) per clip, encoded in this process."""
    from vlm.memory import encode_stream

    for todo in jobs:
        item = todo[0]
        try:
            yield todo, encode_stream(model, item.video, start=item.start, end=item.end, **settings)[0], None
        except Exception as e:  # noqa: BLE001  (a bad video must not end a long run)
            yield todo, None, e


def decode_group_clip(todo: Sequence[MCQItem], num_frames: int, sampling: str, backend: str) -> Clip:
    """The clip shared by a group of questions (`group_by_clip`)."""
    return decode_item_clip(todo[0], num_frames, sampling, backend)


def _mcq_result(data: dict[str, list[MCQItem]], records: dict[str, dict[str, Any]], prof: MCQProfile, mid: str,
                bench_root: str | os.PathLike, shard: Shard, ranks: list[dict[str, Any]], resumed: int,
                elapsed: float, settings: dict[str, Any]) -> EvalResult:
    metrics, per_task, counts = mcq_metrics(data, records)
    asked = sum(r["asked"] for r in ranks)
    counts.update(resumed=resumed, clips_decoded=sum(r["decoded"] for r in ranks), asked=asked,
                  processes=shard.world, elapsed_seconds=round(elapsed, 3),
                  questions_per_second=round(asked / elapsed, 3) if elapsed > 0 and asked else None)
    result = EvalResult(task_type="mcq", model=mid, metrics=metrics, per_task=per_task, counts=counts,
                        dataset={"path": str(bench_root), "name": Path(bench_root).name, "tasks": list(data)},
                        profile=prof.record(), settings=settings)
    log.info("mcq[%s]: %.2f%% +- %.2f (mean over tasks), %.2f%% +- %.2f (over questions), %d unparsable, %d skipped",
             prof.name, metrics["accuracy_mean_over_tasks"], metrics["accuracy_mean_over_tasks_stderr"],
             metrics["accuracy_over_questions"], metrics["accuracy_over_questions_stderr"],
             counts["unparsable"], counts["skipped"])
    return result


def _load_descriptions(source: str | os.PathLike | dict[str, str] | None) -> dict[str, str] | None:
    if source is None or isinstance(source, dict):
        return source
    path = Path(source)
    try:
        texts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read descriptions: {e}") from e
    if not isinstance(texts, dict) or not all(isinstance(v, str) for v in texts.values()):
        raise ValueError(f"{path}: descriptions must be a JSON object {{video name or stem: text}}")
    return texts


def _description_of(texts: dict[str, str], item: MCQItem) -> tuple[str | None, KeyError | None]:
    """(the description of an item's video, by file name or stem, None), or (None, a KeyError naming the video)."""
    video = Path(item.video)
    for key in (video.name, video.stem):
        if key in texts:
            return texts[key], None
    return None, KeyError(f"{video}: no description for '{video.name}' or '{video.stem}'")


def mcq_metrics(data: dict[str, list[MCQItem]], records: dict[str, dict[str, Any]]
                ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """(metrics, per_task, counts) from the latest record of each question.

    A question with an error record (undecodable clip, model failure) or none is *skipped*: counted, not
    scored. Every other question is in its task's denominator, unparsable answers included (as wrong).
    Accuracies are percentages; chance is the mean of 1 / number of options. Each accuracy comes with its standard
    error over questions (`stderr`: sqrt(p(1-p)/(n-1)); for the mean over tasks, sqrt(sum of the tasks' squared
    errors) / tasks): what re-asking other questions of the same kind would move it by, not what another training
    seed would.
    """
    per_task: dict[str, dict[str, Any]] = {}
    reasons: Counter[str] = Counter()
    for task, items in data.items():
        correct = total = unparsable = skipped = 0
        for item in items:
            rec = records.get(item.uid)
            if rec is None or rec.get("error"):
                skipped += 1
                reasons[(rec or {}).get("error", "not asked").split(":")[0]] += 1
                continue
            total += 1
            correct += bool(rec["correct"])
            unparsable += not rec["parsed"]
        chance = 100.0 * sum(1.0 / len(i.candidates) for i in items) / len(items) if items else None
        per_task[task] = {"accuracy": 100.0 * correct / total if total else None, "stderr": _stderr(correct, total),
                          "correct": correct, "total": total, "unparsable": unparsable, "skipped": skipped,
                          "chance": chance}
    scored = [t for t in per_task.values() if t["total"]]
    correct = sum(t["correct"] for t in scored)
    total = sum(t["total"] for t in scored)
    metrics = {
        "accuracy_mean_over_tasks": sum(t["accuracy"] for t in scored) / len(scored) if scored else None,
        "accuracy_mean_over_tasks_stderr":
            math.sqrt(sum(t["stderr"] ** 2 for t in scored)) / len(scored) if scored else None,
        "accuracy_over_questions": 100.0 * correct / total if total else None,
        "accuracy_over_questions_stderr": _stderr(correct, total),
        "chance_mean_over_tasks": sum(t["chance"] for t in scored) / len(scored) if scored else None,
        "unparsable": sum(t["unparsable"] for t in per_task.values()),
        "unparsable_percent": 100.0 * sum(t["unparsable"] for t in scored) / total if total else None,
        "tasks_scored": len(scored),
    }
    counts = {"questions": sum(len(v) for v in data.values()), "scored": total, "correct": correct,
              "unparsable": metrics["unparsable"], "skipped": sum(t["skipped"] for t in per_task.values()),
              "skip_reasons": dict(reasons)}
    return metrics, per_task, counts


def _stderr(correct: int, total: int) -> float | None:
    """The standard error of an accuracy in percent over `total` questions (sample variance; 0 for one question)."""
    if not total:
        return None
    p = correct / total
    return 100.0 * math.sqrt(p * (1 - p) / (total - 1)) if total > 1 else 0.0
