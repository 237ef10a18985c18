"""Open-ended video QA (MSVD-QA, MSRVTT-QA, ActivityNet-QA and the like), scored by a judge.

Data formats `load_openqa` reads (JSON list, JSON object keyed by id, or JSONL):
  - records with a video key  `video` | `video_path` | `video_name` | `video_id` | `vid`,
    a question key            `question` | `Q` | `q`,
    an answer key             `answer` | `A` | `a` | `answers` (a list: the first is used),
    an optional id key        `id` | `question_id` | `qid` (else the record's position),
    optional `start`/`end` seconds;
    (MSVD-QA / MSRVTT-QA as released: {"answer", "id", "question", "video_id": 1234};
     Video-ChatGPT style: {"video_name", "Q", "A"})
  - ActivityNet-QA's split files: questions (`test_q.json`: {"video_name", "question", "question_id"}) plus
    `answers=` (`test_a.json`: {"answer", "type", "question_id"}), joined on question_id.
Videos are found under `video_root`: with `video_template` ("video{video}.mp4") if given, else the first
existing of  NAME, NAME+EXT, "v_"+NAME+EXT, "video"+NAME+EXT, "vid"+NAME+EXT  for EXT in .mp4 .avi .mkv .webm
.mov (ActivityNet files are v_<id>.mp4, MSRVTT video<id>.mp4, MSVD-QA ids map to vid<id>.avi after renaming).

The model is asked `<video>\\n{question}` (its own system prompt applies), greedy; each clip is decoded once
even when several questions share it. Predictions and verdicts go to OUT/predictions.jsonl as they are
made; a rerun skips answered questions and only re-judges those whose verdict is missing or came from a
different judge. Judge failures (after the judge's retries) are counted as `unjudged`, left out of the
accuracy and retried by the next run; undecodable clips are counted as `skipped`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from evals.interface import GenerationRequest, frames_of, model_id, sampling_of
from evals.judges import Judge, Verdict
from evals.results import EvalResult, PredictionLog
from vlm.data.conversation import DataFormatError, Turn
from vlm.video import Clip, read_clip
from vlm.video.prefetch import prefetch_clips

log = logging.getLogger(__name__)
VIDEO_KEYS = ("video", "video_path", "video_name", "video_id", "vid")
QUESTION_KEYS = ("question", "Q", "q")
ANSWER_KEYS = ("answer", "A", "a", "answers")
ID_KEYS = ("id", "question_id", "qid")
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


@dataclass
class OpenQAItem:
    uid: str
    video: Path
    question: str
    answer: str
    start: float | None = None
    end: float | None = None


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, record) pairs of a JSON list / JSON object keyed by id / JSONL file."""
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    out.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{path}:{n}: malformed JSON: {e.msg}") from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    if isinstance(data, dict):
        return [(f"{path}[{k!r}]", {"id": k, **v} if isinstance(v, dict) and not any(i in v for i in ID_KEYS) else v)
                for k, v in data.items()]
    if isinstance(data, list):
        return [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    raise DataFormatError(f"{path}: expected a JSON list or object of QA records")


def _first(record: dict[str, Any], keys: Sequence[str]) -> Any:
    for k in keys:
        if k in record and record[k] is not None:
            return record[k]
    return None


class _VideoFinder:
    def __init__(self, root: Path, template: str | None):
        self.root, self.template = root, template
        self.cache: dict[str, Path] = {}

    def __call__(self, name: Any) -> Path:
        name = str(name)
        if name in self.cache:
            return self.cache[name]
        if self.template:
            path = self.root / self.template.format(video=name)
        else:
            candidates = [self.root / name] + [self.root / f"{pre}{name}{ext}" for pre in ("", "v_", "video", "vid")
                                                for ext in VIDEO_EXTS]
            path = next((c for c in candidates if c.exists()), self.root / name)
        self.cache[name] = path
        return path


def load_openqa(path: str | os.PathLike, video_root: str | os.PathLike | None = None, *,
                answers: str | os.PathLike | None = None, video_template: str | None = None) -> list[OpenQAItem]:
    """Typed QA items from any of the formats in the module docstring; malformed records name file and index."""
    path = Path(path)
    root = Path(video_root) if video_root is not None else path.parent
    find = _VideoFinder(root, video_template)
    answer_of: dict[str, Any] = {}
    answer_list: list[Any] = []
    if answers is not None:
        for loc, rec in _records(Path(answers)):
            answer_list.append(rec)
            qid = _first(rec, ID_KEYS) if isinstance(rec, dict) else None
            if qid is not None:
                answer_of[str(qid)] = rec
    items: list[OpenQAItem] = []
    seen: set[str] = set()
    for i, (loc, rec) in enumerate(_records(path)):
        if not isinstance(rec, dict):
            raise DataFormatError(f"{loc}: record is not an object")
        qid = _first(rec, ID_KEYS)
        uid = str(qid) if qid is not None else str(i)
        ans_rec = rec
        if answers is not None:
            ans_rec = answer_of.get(uid) if qid is not None else None
            if ans_rec is None and i < len(answer_list):
                ans_rec = answer_list[i]  # Video-ChatGPT joins ActivityNet-QA's files by position
            if ans_rec is None:
                raise DataFormatError(f"{loc}: no answer for question id {uid} in {answers}")
        video, question, answer = _first(rec, VIDEO_KEYS), _first(rec, QUESTION_KEYS), _first(ans_rec, ANSWER_KEYS)
        missing = [n for n, v in (("video", video), ("question", question), ("answer", answer)) if v is None]
        if missing:
            raise DataFormatError(f"{loc}: missing {missing} (accepted keys: video {VIDEO_KEYS}, question "
                                  f"{QUESTION_KEYS}, answer {ANSWER_KEYS})")
        if isinstance(answer, list):
            if not answer:
                raise DataFormatError(f"{loc}: empty answer list")
            answer = answer[0]
        if uid in seen:
            uid = f"{uid}#{i}"
        seen.add(uid)
        items.append(OpenQAItem(uid, find(video), str(question), str(answer),
                                None if rec.get("start") is None else float(rec["start"]),
                                None if rec.get("end") is None else float(rec["end"])))
    return items


def _judged_by(rec: dict[str, Any] | None, judge: Judge) -> bool:
    return bool(rec) and rec.get("verdict") is not None and rec.get("judge") == judge.judge_id  # type: ignore[union-attr]


def evaluate_openqa(
    model: Any,
    items: Sequence[OpenQAItem],
    judge: Judge,
    out_dir: str | os.PathLike,
    *,
    dataset: str = "",
    predictions: dict[str, str] | None = None,
    num_frames: int | None = None,
    sampling: str | None = None,
    batch_size: int = 4,
    max_new_tokens: int = 64,
    limit: int | None = None,
    model_name: str | None = None,
    backend: str = "auto",
    progress: bool = True,
    workers: int = 2,
    memory: dict[str, Any] | None = None,
) -> EvalResult:
    """Answer (with `model.generate_answers`) or take `predictions` {uid: text}, judge, and write results.
    `workers` processes decode clips ahead of the model (0: in this process). `memory` ({"max_groups", "fps",
    "chunk_frames"}) reads each whole video chunk by chunk into the long-video memory (`vlm.memory.encode_stream`)
    instead of `num_frames` sampled frames.

    Pass `model=None` with `predictions` to judge answers produced elsewhere (another framework's outputs).
    """
    if model is None and predictions is None:
        raise ValueError("evaluate_openqa needs a model or a predictions mapping")
    if model is not None and not callable(getattr(model, "generate_answers", None)):
        raise TypeError(f"{type(model).__name__} has no generate_answers(requests) (see evals/interface.py)")
    items = list(items)[:limit] if limit is not None else list(items)
    sampling = sampling_of(model, sampling, "uniform")
    num_frames = frames_of(model, num_frames)
    out = Path(out_dir)
    mid = model_id(model, model_name) if model is not None else (model_name or "predictions")
    plog = PredictionLog(out / "predictions.jsonl", identity={"model": mid})
    by_uid = {i.uid: i for i in items}
    counts = {"decode_errors": 0, "asked": 0}
    t0 = time.perf_counter()

    def judge_and_write(pairs: list[tuple[OpenQAItem, str]]) -> None:
        verdicts = judge.judge_many([(i.question, i.answer, p) for i, p in pairs])
        for (item, pred), v in zip(pairs, verdicts):
            rec = {"uid": item.uid, "video": str(item.video), "question": item.question, "answer": item.answer,
                   "pred": pred, "judge": judge.judge_id}
            if isinstance(v, Verdict):
                rec["verdict"] = v.to_dict()
            else:
                rec.update(verdict=None, judge_error=str(v))
            plog.write(rec)

    with plog:
        # 1. re-judge stored predictions whose verdict is missing or from another judge
        rejudge = [(by_uid[u], r["pred"]) for u, r in plog.records.items()
                   if u in by_uid and not r.get("error") and "pred" in r and not _judged_by(r, judge)]
        if rejudge:
            log.info("openqa: judging %d stored predictions with %s", len(rejudge), judge.judge_id)
            for s in range(0, len(rejudge), max(1, batch_size)):
                judge_and_write(rejudge[s : s + batch_size])
        todo = [i for i in items if not plog.done(i.uid)]
        if predictions is not None:
            missing = [i.uid for i in todo if i.uid not in predictions]
            if missing:
                log.warning("openqa: %d questions have no prediction (first: %s)", len(missing), missing[0])
            pairs = [(i, predictions[i.uid]) for i in todo if i.uid in predictions]
            for s in tqdm(range(0, len(pairs), max(1, batch_size)), desc="judge", disable=not progress):
                judge_and_write(pairs[s : s + batch_size])
        else:
            groups: dict[tuple[str, float | None, float | None], list[OpenQAItem]] = {}
            for i in todo:
                groups.setdefault((str(i.video), i.start, i.end), []).append(i)
            buffer: list[tuple[OpenQAItem, Clip]] = []
            with tqdm(total=len(todo), desc="openqa", unit="q", disable=not progress) as bar:
                def flush(chunk: list[tuple[OpenQAItem, Any]]) -> None:
                    reqs = [GenerationRequest(uid=i.uid, clip=c if isinstance(c, Clip) else None,
                                              visual=None if isinstance(c, Clip) else c,
                                              turns=[Turn("user", "<video>\n" + i.question)],
                                              question=i.question, max_new_tokens=max_new_tokens) for i, c in chunk]
                    try:
                        answers = model.generate_answers(reqs)
                    except Exception as e:  # noqa: BLE001  (skip, count, report)
                        for i, _ in chunk:
                            plog.write({"uid": i.uid, "error": f"model: {type(e).__name__}: {e}"})
                        log.error("openqa: model failed on %s: %s", [i.uid for i, _ in chunk], e)
                        return
                    counts["asked"] += len(chunk)
                    judge_and_write([(i, str(a).strip()) for (i, _), a in zip(chunk, answers)])
                    bar.update(len(chunk))

                read = functools.partial(_read_window, num_frames=num_frames, sampling=sampling, backend=backend)
                if memory is not None:  # the model encodes, so in this process
                    read, workers = functools.partial(_read_memory, model=model, settings=memory), 0
                for ((video, _, _), group), clip, e in prefetch_clips(list(groups.items()), read, workers=workers):
                    if e is not None:
                        counts["decode_errors"] += 1
                        log.warning("openqa: %s: %s", video, e)
                        for i in group:
                            plog.write({"uid": i.uid, "video": video, "error": f"decode: {e}"})
                        bar.update(len(group))
                        continue
                    buffer += [(i, clip) for i in group]
                    while memory is not None and buffer:  # one video's memory per batch: no padding between them
                        flush(buffer[:batch_size])
                        buffer = buffer[batch_size:]
                    while len(buffer) >= batch_size:
                        flush(buffer[:batch_size])
                        buffer = buffer[batch_size:]
                if buffer:
                    flush(buffer)
    records = plog.select(i.uid for i in items)
    judged = [r for r in records if r.get("verdict") is not None and r.get("judge") == judge.judge_id]
    unjudged = [r for r in records if not r.get("error") and r.get("verdict") is None]
    skipped = len(items) - len(judged) - len(unjudged)
    yes = sum(bool(r["verdict"]["correct"]) for r in judged)
    metrics = {"accuracy": 100.0 * yes / len(judged) if judged else None,
               "mean_score": sum(float(r["verdict"]["score"]) for r in judged) / len(judged) if judged else None}
    if judged and all(isinstance(r["verdict"].get("detail"), dict) and "iou" in r["verdict"]["detail"] for r in judged):
        metrics["mean_iou"] = sum(float(r["verdict"]["detail"]["iou"]) for r in judged) / len(judged)
    elapsed = time.perf_counter() - t0
    result = EvalResult(
        task_type="openqa", model=mid, dataset={"name": dataset or "openqa", "items": len(items)}, metrics=metrics,
        counts={"questions": len(items), "judged": len(judged), "correct": yes, "unjudged": len(unjudged),
                "skipped": skipped, "decode_errors": counts["decode_errors"], "asked": counts["asked"],
                "resumed": plog.resumed, "elapsed_seconds": round(elapsed, 3)},
        judge=judge.record(),
        settings={"prompt": "<video>\\n{question} (model's own system prompt)", "num_frames": num_frames,
                  "sampling": sampling, "max_new_tokens": max_new_tokens, "greedy": True, "batch_size": batch_size,
                  "limit": limit, "source": "predictions file" if model is None else "model", "memory": memory},
    )
    result.save(out / "results.json")
    from evals.report import write_report

    write_report([result], out)
    log.info("openqa: accuracy %s, mean score %s (%s) over %d judged, %d unjudged, %d skipped",
             metrics["accuracy"], metrics["mean_score"], judge.judge_id, len(judged), len(unjudged), skipped)
    return result


def _read_window(job: tuple[tuple[str, float | None, float | None], Any], num_frames: int, sampling: str,
                 backend: str) -> Clip:
    (video, start, end), _ = job
    return read_clip(video, num_frames, sampling, start, end, backend=backend)


def _read_memory(job: tuple[tuple[str, float | None, float | None], Any], model: Any, settings: dict[str, Any]) -> Any:
    from vlm.memory import encode_stream

    (video, start, end), _ = job
    return encode_stream(model, video, start=start, end=end, **settings)[0]


def load_predictions(path: str | os.PathLike) -> tuple[list[OpenQAItem], dict[str, str]]:
    """Items and predictions from a file of {id, question, answer, pred} records (Video-ChatGPT's output format:
    {"id"|"video_name", "question"|"Q", "answer"|"A", "pred"}); the video is not needed to judge."""
    items, preds = [], {}
    for i, (loc, rec) in enumerate(_records(Path(path))):
        q, a, p = _first(rec, QUESTION_KEYS), _first(rec, ANSWER_KEYS), rec.get("pred")
        if q is None or a is None or p is None:
            raise DataFormatError(f"{loc}: a prediction record needs question, answer and pred")
        uid = str(_first(rec, ID_KEYS) if _first(rec, ID_KEYS) is not None else i)
        if uid in preds:
            uid = f"{uid}#{i}"
        items.append(OpenQAItem(uid, Path(str(_first(rec, VIDEO_KEYS) or "")), str(q), str(a)))
        preds[uid] = str(p)
    return items, preds
