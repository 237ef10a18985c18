"""The MVBench layout: `json/<task>.json` lists of {video, question, candidates, answer, [start, end]}.

A task's file may also be a saved dataset folder (`save_to_disk`) or Parquet with the same columns, named by the
manifest's `json` entry (`json/<task>` or `json/<task>.parquet`); its items are validated the same way, an error
naming `<file>:<row>` where a JSON list names `<file>[<index>]`.

The official benchmark (OpenGVLab/MVBench) keeps each task's videos under `video/<source dataset>/`; the table
below is its task list, prefixes and bound flags. A dataset written in the same layout may carry a
`tasks.json` manifest at its root (a list of {"task", "json", "prefix", "data_type", "bound", ["fps"]}, or MVBench's
own `data_list` mapping written as JSON) that replaces the official table; the synthetic benchmark of
`vlm data synth` writes one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from typing import Any, Iterator

from vlm.data.conversation import DataFormatError
from vlm.data.hf import ArrowRows, source_kind

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class MVBenchTask:
    name: str  # "Action Sequence"
    json: str  # "action_sequence.json", under <root>/json/
    prefix: str  # video folder relative to <root>
    data_type: str = "video"  # "video" | "frame" (a folder of %05d.jpg from 1) | "gif"
    bound: bool = False  # items carry start/end seconds that bound the sampling window
    fps: float | None = None  # frame rate of frame folders (MVBench's TVQA frames are 3 fps)

    @property
    def key(self) -> str:
        return self.json.removesuffix(".json").removesuffix(".parquet").rstrip("/")


def _official(name: str, prefix: str, data_type: str = "video", bound: bool = False, fps: float | None = None) -> MVBenchTask:
    return MVBenchTask(name, name.lower().replace("-", "_").replace(" ", "_") + ".json", "video/" + prefix, data_type, bound, fps)


# The 20 tasks of MVBench (Li et al., CVPR 2024) as the official evaluation notebook lists them.
OFFICIAL_TASKS: tuple[MVBenchTask, ...] = (
    _official("Action Sequence", "star/Charades_v1_480/", bound=True),
    _official("Action Prediction", "star/Charades_v1_480/", bound=True),
    _official("Action Antonym", "ssv2_video/"),
    _official("Fine-grained Action", "Moments_in_Time_Raw/videos/"),
    _official("Unexpected Action", "FunQA_test/test/"),
    _official("Object Existence", "clevrer/video_validation/"),
    _official("Object Interaction", "star/Charades_v1_480/", bound=True),
    _official("Object Shuffle", "perception/videos/"),
    _official("Moving Direction", "clevrer/video_validation/"),
    _official("Action Localization", "sta/sta_video/", bound=True),
    _official("Scene Transition", "scene_qa/video/"),
    _official("Action Count", "perception/videos/"),
    _official("Moving Count", "clevrer/video_validation/"),
    _official("Moving Attribute", "clevrer/video_validation/"),
    _official("State Change", "perception/videos/"),
    _official("Fine-grained Pose", "nturgbd/"),
    _official("Character Order", "perception/videos/"),
    _official("Egocentric Navigation", "vlnqa/"),
    _official("Episodic Reasoning", "tvqa/frames_fps3_hq/", data_type="frame", bound=True, fps=3.0),
    _official("Counterfactual Inference", "clevrer/video_validation/"),
)


@dataclass
class MCQItem:
    """One multiple-choice question about one clip."""

    task: str
    index: int  # position in the task's JSON list
    video: Path  # absolute path of the video file / frame folder / gif
    question: str
    candidates: list[str]
    answer: str  # the option text
    answer_index: int
    data_type: str = "video"
    start: float | None = None
    end: float | None = None
    fps: float | None = None

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer_index]

    @property
    def uid(self) -> str:
        return f"{self.task}/{self.index}"


def load_tasks(root: str | os.PathLike) -> list[MVBenchTask]:
    """The task table of a benchmark root: its `tasks.json` manifest if present, else the official table.

    The manifest is either a list of {"task", "json", ["prefix"], ["data_type"], ["bound"], ["fps"]} (prefix relative
    to the root, default "video/"), or MVBench's own `data_list` as a JSON mapping
    {"Action Sequence": ["action_sequence.json", "star/Charades_v1_480/", "video", true], ...} whose prefixes are
    relative to `<root>/video/`, as in the official layout (an absolute prefix is kept as it is).
    """
    manifest = Path(root) / "tasks.json"
    if not manifest.is_file():
        return list(OFFICIAL_TASKS)
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{manifest}:{e.lineno}: malformed JSON: {e.msg}") from None
    if isinstance(entries, dict):
        return [_data_list_task(manifest, name, value) for name, value in entries.items()]
    if not isinstance(entries, list):
        raise DataFormatError(f"{manifest}: expected a list of tasks or MVBench's data_list mapping, got "
                              f"{type(entries).__name__}")
    return [_manifest_task(manifest, i, e) for i, e in enumerate(entries)]


def _manifest_task(manifest: Path, i: int, e: object) -> MVBenchTask:
    where = f"{manifest}[{i}]"
    if not isinstance(e, dict):
        raise DataFormatError(f"{where}: expected an object with 'task' and 'json', got {type(e).__name__}")
    missing = [k for k in ("task", "json") if not isinstance(e.get(k), str) or not e.get(k)]
    if missing:
        raise DataFormatError(f"{where}: '{missing[0]}' must be a non-empty string")
    return _checked(where, MVBenchTask(e["task"], e["json"], e.get("prefix", "video/"), e.get("data_type", "video"),
                                       e.get("bound", False), e.get("fps")))


def _data_list_task(manifest: Path, name: str, value: object) -> MVBenchTask:
    where = f"{manifest}['{name}']"
    if not isinstance(value, list) or not 2 <= len(value) <= 4 or not all(isinstance(v, str) for v in value[:2]):
        raise DataFormatError(f"{where}: expected [json file, video prefix, (data type), (bound)], got {value!r}")
    json_name, prefix, *rest = value
    prefix = prefix if Path(prefix).is_absolute() else "video/" + prefix
    return _checked(where, MVBenchTask(name, json_name, prefix, *rest))


def _checked(where: str, task: MVBenchTask) -> MVBenchTask:
    if task.data_type not in ("video", "frame", "gif"):
        raise DataFormatError(f"{where}: data_type '{task.data_type}' is not video, frame or gif")
    if not isinstance(task.bound, bool):
        raise DataFormatError(f"{where}: bound must be true or false, got {task.bound!r}")
    if task.fps is not None and not (isinstance(task.fps, (int, float)) and task.fps > 0):
        raise DataFormatError(f"{where}: fps must be a positive number, got {task.fps!r}")
    if not isinstance(task.prefix, str):
        raise DataFormatError(f"{where}: prefix must be a string, got {task.prefix!r}")
    return task


def select_tasks(all_tasks: list[MVBenchTask], names: list[str] | None) -> list[MVBenchTask]:
    """Tasks chosen by display name ("Moving Direction") or key ("moving_direction"); None = all."""
    if not names:
        return all_tasks
    by_name = {t.name: t for t in all_tasks} | {t.key: t for t in all_tasks}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise KeyError(f"unknown task(s) {unknown}; available: {[t.key for t in all_tasks]}")
    return [by_name[n] for n in names]


def _json_items(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a list of questions")
    for i, raw in enumerate(data):
        yield f"{path}[{i}]", raw


def task_items(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, raw item) of a task file: a JSON list, a saved dataset folder or Parquet."""
    if source_kind(path) == "json":
        return _json_items(path)
    return ArrowRows(path).records()


def load_task(root: str | os.PathLike, task: MVBenchTask) -> list[MCQItem]:
    """The typed items of one task; malformed items raise DataFormatError naming the file and index (row)."""
    root = Path(root)
    path = root / "json" / task.json
    if not path.exists():
        raise DataFormatError(f"{path}: task file not found for '{task.name}'")
    items = []
    for i, (where, raw) in enumerate(task_items(path)):
        if not isinstance(raw, dict):
            raise DataFormatError(f"{where}: item is not an object")
        missing = [k for k in ("video", "question", "candidates", "answer") if k not in raw]
        if missing:
            raise DataFormatError(f"{where}: missing {missing}")
        if not isinstance(raw["candidates"], list):
            raise DataFormatError(f"{where}: candidates must be a list, got {type(raw['candidates']).__name__}")
        candidates = [str(c) for c in raw["candidates"]]
        if not 2 <= len(candidates) <= len(LETTERS):
            raise DataFormatError(f"{where}: needs 2-{len(LETTERS)} candidates, has {len(candidates)}")
        if str(raw["answer"]) not in candidates:
            raise DataFormatError(f"{where}: answer '{raw['answer']}' is not one of the candidates {candidates}")
        start, end = (raw.get("start"), raw.get("end")) if task.bound else (None, None)
        items.append(
            MCQItem(
                task=task.name, index=i, video=root / task.prefix / raw["video"], question=str(raw["question"]),
                candidates=candidates, answer=str(raw["answer"]), answer_index=candidates.index(str(raw["answer"])),
                data_type=task.data_type, start=None if start is None else float(start),
                end=None if end is None else float(end), fps=task.fps,
            )
        )
    return items


def load_mvbench(root: str | os.PathLike, tasks: list[str] | None = None) -> dict[str, list[MCQItem]]:
    """{task name: items} for the chosen tasks of a benchmark root, in table order."""
    return {t.name: load_task(root, t) for t in select_tasks(load_tasks(root), tasks)}
