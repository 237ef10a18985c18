"""How a chat answer is generated token by token: the settings, the next-token choice and stream decoding."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

log = logging.getLogger(__name__)


@dataclass
class GenerationSettings:
    """How answers are generated. `temperature == 0` is greedy decoding (the default)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    seed: int | None = None  # seeds sampling; None = torch's global generator

    def __post_init__(self) -> None:
        if int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")

    def with_overrides(self, **overrides: Any) -> "GenerationSettings":
        """A copy with the given (non-None) fields replaced, validated."""
        unknown = set(overrides) - set(self.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown generation settings {sorted(unknown)}; known: {sorted(self.__dataclass_fields__)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def warpers(self) -> LogitsProcessorList:
        """transformers' temperature, top-k and top-p warpers for these settings; empty for greedy decoding."""
        if self.temperature == 0:
            return LogitsProcessorList()
        warpers = LogitsProcessorList([TemperatureLogitsWarper(self.temperature)])
        if self.top_k:
            warpers.append(TopKLogitsWarper(int(self.top_k)))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers


def next_token(logits: torch.Tensor, warpers: LogitsProcessorList, generator: torch.Generator | None) -> int:
    """The next token from logits [V]: argmax without warpers, else a sample from the warped distribution."""
    if not warpers:
        return int(torch.argmax(logits))
    scores = warpers(None, logits.float()[None])  # [1, V]
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))


def stop_ids(tokenizer: Any, llm: Any) -> set[int]:
    """The end-of-sequence ids of the tokenizer, the LLM's generation config and its config."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(llm.generation_config, "eos_token_id", None),
                   getattr(llm.config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


@dataclass
class LoadStats:
    """What one `load_video` / `load_clip` cost (decoding is not included in `load_clip`)."""

    frames: int = 0
    visual_tokens: int = 0  # after any pruning by the connector
    prefix_tokens: int = 0  # system prompt + first user header + visual tokens, prefilled up front
    decode_s: float = 0.0
    visual_encode_s: float = 0.0  # tower + connector
    prefill_s: float = 0.0


@dataclass
class TurnStats:
    """What one `ask` cost: tokens reused from the cache vs prefilled, and timings in seconds."""

    reused_tokens: int = 0  # prompt tokens whose keys/values came from the cache
    prefilled_tokens: int = 0  # prompt tokens run through the LLM this turn
    generated_tokens: int = 0
    context_tokens: int = 0  # tokens in the cache after the turn
    visual_encode_s: float = 0.0  # tower + connector time spent in this turn (0 when the video was reused)
    time_to_first_token_s: float = 0.0
    decode_tokens_per_s: float = 0.0  # generated tokens after the first, per second
    total_s: float = 0.0
    stopped: str = ""  # "eos", "max_new_tokens", "context", "interrupted"


class StreamDecoder:
    """Turns generated token ids into text pieces as they arrive.

    A piece is only released once it decodes to complete characters: a multi-byte character split over several
    byte-level tokens (emoji, CJK) is held back until its last byte arrives, and tokens whose text depends on
    their neighbours (SentencePiece's leading spaces) are decoded together with the previous piece. Leading
    whitespace is dropped and trailing whitespace is held back until more text follows, so the pieces join to
    exactly the final, stripped answer (`text`).
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._window_start = 0  # the decode window starts here (context for the next piece)
        self._read = 0  # ids before this index have been turned into text
        self._raw = ""  # text of ids[:_read], unstripped
        self._emitted = ""  # what has been handed out so far

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def _release(self, visible: str) -> str:
        if not visible.startswith(self._emitted):
            log.warning("streamed text %r is not a prefix of the decoded text %r", self._emitted, visible)
            return ""
        piece = visible[len(self._emitted):]
        self._emitted = visible
        return piece

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes ('' when nothing can be released yet)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._window_start:self._read])
        after = self._decode(self.ids[self._window_start:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._raw += after[len(before):]
            self._window_start, self._read = self._read, len(self.ids)
        return self._release(self._raw.strip())

    @property
    def text(self) -> str:
        """The whole answer so far, decoded in one go and stripped."""
        return self._decode(self.ids).strip()

    def finish(self) -> str:
        """The text not released yet (an incomplete trailing character, if generation stopped inside one)."""
        return self._release(self.text)
