"""Tiny datasets for the evaluation tests: an MVBench-layout benchmark, and scripted fake models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.video import write_video

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "white": (240, 240, 240)}


def moving_square(color: tuple[int, int, int], frames: int = 12, size: int = 32, direction: int = 1) -> np.ndarray:
    """uint8 [T, size, size, 3]: a square moving horizontally on a dark background."""
    video = np.full((frames, size, size, 3), 20, dtype=np.uint8)
    for t in range(frames):
        x = 2 + (t * 2 if direction > 0 else (frames - 1 - t) * 2)
        video[t, 10:20, x : x + 8] = color
    return video


def write_clip(path: Path, color: str, frames: int = 12, fps: float = 4.0, direction: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, moving_square(COLORS[color], frames, direction=direction), fps)
    return path


def _q(video: str, question: str, candidates: list[str], answer: int, **extra: Any) -> dict[str, Any]:
    return {"video": video, "question": question, "candidates": candidates, "answer": candidates[answer], **extra}


def make_bench(root: Path, missing_video: bool = True) -> Path:
    """An MVBench-layout benchmark with three tasks (plain videos, bounded windows, a 1-based frame folder).

    Moving Direction: 7 questions, 2 per video on 3 videos (+1 about a missing file when `missing_video`);
    Action Sequence: 4 bounded questions, two sharing a window; Episodic Reasoning: 2 questions on a frame folder.
    """
    root = Path(root)
    for name, color in (("red.mp4", "red"), ("green.mp4", "green"), ("blue.mp4", "blue")):
        write_clip(root / "video" / name, color, direction=1 if color != "green" else -1)
    write_clip(root / "video" / "long.mp4", "white", frames=24, fps=4.0)
    frames_dir = root / "frames" / "ep1"
    frames_dir.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(moving_square(COLORS["blue"], frames=10), start=1):
        Image.fromarray(frame).save(frames_dir / f"{i:05d}.jpg")
    dirs = ["left", "right", "up", "down"]
    md = [
        _q("red.mp4", "Which way does the square move?", dirs, 1),
        _q("red.mp4", "What colour is the square?", ["blue", "green", "red", "white"], 2),
        _q("green.mp4", "Which way does the square move?", dirs, 0),
        _q("green.mp4", "What colour is the square?", ["green", "red", "blue"], 0),
        _q("blue.mp4", "Which way does the square move?", ["up", "down", "right", "left"], 2),
        _q("blue.mp4", "What colour is the square?", ["red", "white", "blue", "green"], 2),
    ]
    if missing_video:
        md.append(_q("missing.mp4", "Which way?", dirs, 3))
    seq = [
        _q("long.mp4", "What happens first?", ["a", "b", "c", "d"], 0, start=0.0, end=2.0),
        _q("long.mp4", "What happens next?", ["a", "b", "c", "d"], 2, start=0.0, end=2.0),
        _q("long.mp4", "What happens last?", ["a", "b", "c", "d"], 3, start=3.0, end=6.0),
        _q("red.mp4", "What happens?", ["a", "b", "c"], 2, start=0.5, end=2.5),
    ]
    ep = [
        _q("ep1", "Where is the square?", ["top", "middle", "bottom", "nowhere"], 1, start=0.5, end=3.0),
        _q("ep1", "What colour?", ["blue", "red", "green", "white", "black"], 2, start=0.0, end=3.3),
    ]
    (root / "json").mkdir(parents=True, exist_ok=True)
    for key, items in (("moving_direction", md), ("action_sequence", seq), ("episodic_reasoning", ep)):
        (root / "json" / f"{key}.json").write_text(json.dumps(items, indent=1))
    manifest = [
        {"task": "Moving Direction", "json": "moving_direction.json", "prefix": "video/", "data_type": "video", "bound": False},
        {"task": "Action Sequence", "json": "action_sequence.json", "prefix": "video/", "data_type": "video", "bound": True},
        {"task": "Episodic Reasoning", "json": "episodic_reasoning.json", "prefix": "frames/", "data_type": "frame",
         "bound": True, "fps": 3.0},
    ]
    (root / "tasks.json").write_text(json.dumps(manifest, indent=1))
    return root


class ScriptedModel:
    """A fake model: `answer(request) -> str` for generation, `scores(request) -> list[float]` for loglik."""

    def __init__(self, answer: Callable[[Any], str] | None = None, scores: Callable[[Any], list[float]] | None = None,
                 interrupt_after: int | None = None):
        self.answer, self.scores = answer, scores
        self.interrupt_after = interrupt_after
        self.calls = 0
        self.asked: list[str] = []
        self.clips: dict[str, Any] = {}
        self.model_id = "scripted"

    def _tick(self, requests: list[Any]) -> None:
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt("scripted interruption")
        self.asked += [r.uid for r in requests]
        self.clips.update({r.uid: r.clip for r in requests})

    def generate_answers(self, requests: list[Any]) -> list[str]:
        self._tick(requests)
        assert self.answer is not None
        return [self.answer(r) for r in requests]

    def score_options(self, requests: list[Any]) -> list[list[float]]:
        self._tick(requests)
        assert self.scores is not None
        return [self.scores(r) for r in requests]


@pytest.fixture(scope="module", autouse=False)
def single_thread():
    """Run a module's tiny-tensor work on one thread (tiny ops only lose to thread hand-offs on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
