"""What a model must offer to be evaluated: two methods over plain request objects.

The harnesses never touch a model's internals. A model is anything with one or both of

    generate_answers(requests: Sequence[GenerationRequest]) -> list[str]
    score_options(requests: Sequence[ScoringRequest]) -> list[list[float]]

`vlm.model.VideoLLM` implements both (through `vlm.scoring.ScoringMixin`); a model that is not ours is
wrapped in a small class with these methods (see docs/EVALUATION.md, "Evaluating a model that is not ours").

A request carries the decoded clip, the conversation the harness wants asked (chat turns whose user turn
holds a `<video>` placeholder), the assistant prefill, and the raw question and options for models that
build their own prompt. Clips of one video are decoded once and shared by all requests about it (same
`Clip` object), so an implementation may cache per-clip work by `id(request.clip)` within one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from vlm.data.conversation import Turn
from vlm.video import Clip


@dataclass(kw_only=True)
class VideoPrompt:
    """One question about one clip, as the harness asks it."""

    uid: str  # unique id of the question ("Action Sequence/12")
    clip: Clip | None  # decoded frames (uint8 [T, H, W, 3]) or None for a text-only question
    turns: list[Turn]  # the conversation to ask; the user turn holds "<video>" where the clip goes
    prefill: str = ""  # text the assistant's answer starts with; it is not part of the returned answer
    question: str = ""  # the raw question (for models that build their own prompt)
    options: list[str] = field(default_factory=list)  # the raw candidate answers of a multiple-choice question
    media_type: str = "video"
    # a long video already encoded (a `vlm.memory.VideoMemory`) in place of `clip`, for models that read it
    # (VideoLLM); `evaluate_mcq(memory=...)` sets it
    visual: object | None = None


@dataclass(kw_only=True)
class GenerationRequest(VideoPrompt):
    """Generate a free-form answer (greedy unless the harness says otherwise)."""

    max_new_tokens: int = 64
    # The harness keeps only the answer up to the first of these strings that follows non-blank text;
    # a model may stop generating there (an optimisation that never changes a score).
    stop: tuple[str, ...] = ()


@dataclass(kw_only=True)
class ScoringRequest(VideoPrompt):
    """Score continuations: log p(continuation tokens | prompt + prefill), summed over the continuation's tokens."""

    continuations: list[str]


@runtime_checkable
class AnswerGenerator(Protocol):
    """A model that answers in text. Returns one answer per request, in order, without the prefill."""

    def generate_answers(self, requests: Sequence[GenerationRequest]) -> list[str]: ...


@runtime_checkable
class OptionScorer(Protocol):
    """A model that scores given continuations. Returns, per request, one log-likelihood per continuation."""

    def score_options(self, requests: Sequence[ScoringRequest]) -> list[list[float]]: ...


def model_id(model: object, default: str | None = None) -> str:
    """A name for a model in results: `default`, else its `name_or_path` / `model_id` attribute, else its class."""
    if default:
        return default
    for attr in ("model_id", "name_or_path"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    return type(model).__name__


def sampling_of(model: object, sampling: str | None, fallback: str) -> str:
    """The frame sampling policy to ask `model` with: `sampling` when given, else the one the model was trained
    with (a VideoLLM's `config.sampling`: frames it never saw in training cost points, e.g. MVBench's
    `segment_middle` on 16-frame clips repeats one frame and drops the last), else `fallback`."""
    return sampling or getattr(getattr(model, "config", None), "sampling", None) or fallback


def frames_of(model: object, num_frames: int | None, fallback: int = 16) -> int:
    """The frames to sample per clip for `model`: `num_frames` when given, else the count the model was trained
    with (a VideoLLM's `config.num_frames`: the quickstart's 8-frame model asked on 16 frames loses 4.7 points over
    tasks, its story told from frames it never read together), else `fallback` (MVBench's 16)."""
    return num_frames or getattr(getattr(model, "config", None), "num_frames", None) or fallback
