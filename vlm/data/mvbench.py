"""The MVBench layout: `json/<task>.json` lists of {video, question, candidates, answer, [start, end]}.

The official benchmark (OpenGVLab/MVBench) keeps each task's videos under `video/<source dataset>/`; the table
below is its task list, prefixes and bound flags. A dataset written in the same layout may carry a
`tasks.json` manifest at its root (a list of {"task", "json", "prefix", "data_type", "bound", ["fps"]}) that
replaces the official table; the synthetic benchmark of `vlm data synth` does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from vlm.data.conversation import DataFormatError

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
        return self.json.removesuffix(".json")


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
    """The task table of a benchmark root: its `tasks.json` manifest if present, else the official table."""
    manifest = Path(root) / "tasks.json"
    if not manifest.is_file():
        return list(OFFICIAL_TASKS)
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
        return [
            MVBenchTask(
                name=e["task"], json=e["json"], prefix=e.get("prefix", "video/"),
                data_type=e.get("data_type", "video"), bound=bool(e.get("bound", False)), fps=e.get("fps"),
            )
            for e in entries
        ]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataFormatError(f"{manifest}: malformed task manifest: {e}") from None


def select_tasks(all_tasks: list[MVBenchTask], names: list[str] | None) -> list[MVBenchTask]:
    """Tasks chosen by display name ("Moving Direction") or key ("moving_direction"); None = all."""
    if not names:
        return all_tasks
    by_name = {t.name: t for t in all_tasks} | {t.key: t for t in all_tasks}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise KeyError(f"unknown task(s) {unknown}; available: {[t.key for t in all_tasks]}")
    return [by_name[n] for n in names]


def load_task(root: str | os.PathLike, task: MVBenchTask) -> list[MCQItem]:
    """The typed items of one task; malformed items raise DataFormatError naming the file and index."""
    root = Path(root)
    path = root / "json" / task.json
    if not path.is_file():
        raise DataFormatError(f"{path}: task file not found for '{task.name}'")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a list of questions")
    items = []
    for i, raw in enumerate(data):
        where = f"{path}[{i}]"
        if not isinstance(raw, dict):
            raise DataFormatError(f"{where}: item is not an object")
        missing = [k for k in ("video", "question", "candidates", "answer") if k not in raw]
        if missing:
            raise DataFormatError(f"{where}: missing {missing}")
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
