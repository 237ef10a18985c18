"""The benchmark tasks (modelled on MVBench's): each turns one clip's ground truth into a multiple-choice question.

A task function (`object_tasks.py`, `temporal_tasks.py`) returns a `Question` (question, answer, three distractors,
optional time window) or None when the clip does not support it. Where the correct option goes (A-D) is decided
later, across all items of a task, by `AnswerPlacer`, so positions are balanced.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from data_tools.synth.object_tasks import (
    action_count, fine_grained_action, moving_attribute, moving_count, moving_direction, object_existence,
    object_shuffle, scene_transition, state_change,
)
from data_tools.synth.question import Question
from data_tools.synth.temporal_tasks import action_localization, action_sequence, action_window

LETTERS = "ABCD"


@dataclass(frozen=True)
class Task:
    name: str  # display name, as in MVBench ("Moving Direction")
    key: str  # file stem ("moving_direction")
    bound: bool  # items carry start/end seconds
    build: Callable[[dict[str, Any], np.random.Generator], Question | None]
    # can the average of all frames answer it? "no" | "partly" (docs/SYNTHETIC.md explains each; the
    # frame-average baseline of scripts/bench_quickstart.py groups tasks by it)
    mean_frame: str = "no"


TASKS: tuple[Task, ...] = (
    Task("Moving Direction", "moving_direction", False, moving_direction),
    Task("Action Sequence", "action_sequence", False, action_sequence),
    Task("Object Existence", "object_existence", False, object_existence, "partly"),
    Task("Moving Count", "moving_count", False, moving_count, "partly"),
    Task("State Change", "state_change", False, state_change),
    Task("Action Count", "action_count", False, action_count),
    Task("Moving Attribute", "moving_attribute", False, moving_attribute, "partly"),
    Task("Object Shuffle", "object_shuffle", False, object_shuffle),
    Task("Scene Transition", "scene_transition", False, scene_transition),
    Task("Action Localization", "action_localization", False, action_localization),
    Task("Action Window", "action_window", True, action_window, "partly"),
    Task("Fine-grained Action", "fine_grained_action", False, fine_grained_action, "partly"),
)
TASKS_BY_KEY = {t.key: t for t in TASKS}


def clip_questions(clip: dict[str, Any], rng: np.random.Generator) -> dict[str, Question]:
    """At most one question per task for a clip, {task key: Question}."""
    out = {}
    for task in TASKS:
        q = task.build(clip, rng)
        if q is not None:
            out[task.key] = q
    return out


class AnswerPlacer:
    """Decides the correct option's position per stream so positions are balanced (max - min count <= 1).

    The k-th question of a stream takes position perm[k % 4] of a permutation drawn per block of 4 from
    default_rng([seed, crc32(stream), block]): the same for any number of worker processes.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.counts: dict[str, int] = {}
        self.histogram: dict[str, dict[str, int]] = {}

    def place(self, stream: str, q: Question, rng: np.random.Generator) -> tuple[list[str], int]:
        """(candidates, answer index): distractors in a random order, answer at the stream's next position."""
        k = self.counts.get(stream, 0)
        self.counts[stream] = k + 1
        perm = np.random.default_rng([self.seed, zlib.crc32(stream.encode()), k // 4]).permutation(4)
        pos = int(perm[k % 4])
        d = [q.distractors[i] for i in rng.permutation(3)]
        cands = d[:pos] + [q.answer] + d[pos:]
        hist = self.histogram.setdefault(stream, {c: 0 for c in LETTERS})
        hist[LETTERS[pos]] += 1
        return cands, pos
