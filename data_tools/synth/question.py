"""A multiple-choice question before its options are ordered, and what the task functions share to write one:
picking a phrasing, filling distractors, the objects of a scene."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Question:
    """A multiple-choice question before its options are ordered."""

    task: str  # task key, e.g. "moving_direction"
    question: str
    answer: str
    distractors: list[str]
    start: float | None = None  # seconds; only for tasks with a time window
    end: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        opts = [self.answer, *self.distractors]
        if len(self.distractors) != 3 or len(set(opts)) != 4:
            raise ValueError(f"{self.task}: need 3 distinct distractors different from the answer, got {opts}")


def choose(rng: np.random.Generator, items: list[Any]) -> Any:
    """One of `items`, uniformly."""
    return items[int(rng.integers(0, len(items)))]


def fill_distractors(answer: str, preferred: list[str], pool: list[str], rng: np.random.Generator,
                     n: int = 3) -> list[str] | None:
    """n distinct distractors: `preferred` first (in order), then random ones from `pool`; never the answer."""
    out: list[str] = []
    for d in preferred:
        if d != answer and d not in out:
            out.append(d)
        if len(out) == n:
            return out
    rest = [d for d in pool if d != answer and d not in out]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    out += rest[: n - len(out)]
    return out if len(out) == n else None


def scene_objects(clip: dict[str, Any]) -> list[dict[str, Any]]:
    """The objects of a clip other than the shuffle's boxes and ball."""
    return [o for o in clip["objects"] if o["role"] not in ("box", "ball")]
