"""VideoChat: a multi-turn chat session about one video (or image), for notebooks and the `vlm chat` command.

    chat = VideoChat.from_pretrained("runs/quickstart/final")
    chat.load_video("clip.mp4", num_frames=8)          # decoded, encoded and prefilled once
    chat.ask("What happens in the video?")              # -> the answer; the turn is kept in the history
    for piece in chat.ask("And then?", stream=True):    # text pieces as they are generated
        print(piece, end="")
    chat.reset()                                        # forget the turns, keep the video

How a session reuses work. The video is run through the tower and the connector once per `load_video`, and
the system prompt + visual tokens are prefilled into a KV cache right away. Each `ask` renders the whole
conversation with the model's chat template, compares its token ids with the ids whose keys/values are in the
cache, crops the cache back to the longest common prefix, and prefills only the rest (normally the end-of-turn
tokens of the previous answer, the new user turn and the assistant header). The result is the same as running
the full conversation from scratch, which is what `reuse_cache=False` does (the re-encode-every-turn baseline
that LLaVA's and VideoLLaMA2's demos use).

Text-only chat: by default `ask` before `load_video` is an error (`NoVideoError`), because a video model asked
about "the video" with none loaded gives confident nonsense. `VideoChat(model, require_video=False)` allows
plain text chat until a video is loaded. Loading a video starts a new conversation.

Instruction-aware connectors (e.g. an InstructBLIP-style Q-Former) condition the visual tokens on the first
question, exactly as in training: for them the tower still runs once per video, and the connector runs again
whenever the first question of the conversation changes (after `reset`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

import numpy as np
import torch
from transformers import DynamicCache

from vlm.connectors.base import Instruction
from vlm.data.conversation import PLACEHOLDERS, Turn
from vlm.llm.template import VISUAL_TOKEN
from vlm.model import VideoLLM
from vlm.towers.base import VisualFeatures
from vlm.video import Clip, choose_backend, read_clip

log = logging.getLogger(__name__)


class NoVideoError(RuntimeError):
    """`ask` was called before any video was loaded in a session that requires one."""


class ContextOverflowError(ValueError):
    """The conversation does not fit in the model's context; the message says by how much and what to reduce."""

    def __init__(self, message: str, needed: int, limit: int):
        super().__init__(message)
        self.needed = needed
        self.limit = limit


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadStats:
    """What one `load_video` / `load_clip` cost (decoding is not included in `load_clip`)."""

    frames: int = 0
    visual_tokens: int = 0  # after any pruning by the connector
    prefix_tokens: int = 0  # system prompt + first user header + visual tokens, prefilled up front
    decode_s: float = 0.0
    visual_encode_s: float = 0.0  # tower + connector
    prefill_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _sanitize(text: str) -> str:
    """Media placeholders in free text would break the template's one-placeholder rule; drop them."""
    for placeholder in PLACEHOLDERS.values():
        if placeholder in text:
            log.warning("removed %s from a chat message: the video is placed by the session", placeholder)
            text = text.replace(placeholder, "")
    return text


def _pick(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> int:
    """The next token from logits [V]: argmax when greedy, else temperature / top-k / top-p sampling."""
    if settings.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits.float() / settings.temperature  # [V]
    if settings.top_k and settings.top_k < scores.shape[-1]:
        kth = torch.topk(scores, settings.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= settings.top_p  # mass before this token
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class _Plan:
    """A prepared turn: the prompt ids (pruned visual positions removed) and its settings."""

    question: str
    ids: list[int]
    settings: GenerationSettings
    call_seed: int | None  # a seed given to this `ask` (a fresh generator for this turn)
    max_new_tokens: int
    visual_encode_s: float
    prepare_s: float  # time spent before generation starts (encoding, tokenizing)
    epoch: int


@dataclass
class _Video:
    """The loaded video: the clip and what was computed from it."""

    clip: Clip
    media_type: str  # "video" | "image"
    pixel_values: torch.Tensor  # [T, 3, H, W]
    timestamps: torch.Tensor  # [T]
    features: VisualFeatures | None = None  # tower output, kept for instruction-aware connectors
    embeds: torch.Tensor | None = None  # [L_kept, D_llm] connector output (pruned tokens removed)
    keep: list[bool] | None = None  # per visual-slot position: kept by the connector (None = all)
    instruction: str | None = None  # the question the connector was conditioned on
    slot: list[int] = field(default_factory=list)


class VideoChat:
    """A chat session with one `VideoLLM` about one video at a time (see the module docstring).

    Sampling settings live in `self.settings` (a `GenerationSettings`) and can be overridden per `ask`.
    `max_context` defaults to the smaller of the model's `max_length` and the LLM's position limit.
    """

    def __init__(self, model: VideoLLM, *, require_video: bool = True, reuse_cache: bool = True,
                 max_context: int | None = None, num_frames: int | None = None, sampling: str | None = None,
                 **settings: Any):
        self.model = model.eval()
        self.require_video = require_video
        self.reuse_cache = reuse_cache
        self.num_frames = num_frames or model.config.num_frames
        self.sampling = sampling or model.config.sampling
        self.settings = GenerationSettings(**settings)
        positions = getattr(model.llm.config, "max_position_embeddings", None) or model.config.max_length
        self.max_context = int(max_context or min(model.config.max_length, positions))
        self.stop_ids = self._stop_ids()
        self.last_stats: TurnStats | None = None
        self.load_stats: LoadStats | None = None
        self._video: _Video | None = None
        self._turns: list[Turn] = []  # user turns without the placeholder; assistant turns as answered
        self._cache: DynamicCache | None = None
        self._cached_ids: list[int] = []  # the ids whose keys/values are in the cache, in order
        self._epoch = 0  # bumped by anything that invalidates a prepared turn
        self._active: Iterator[str] | None = None
        self._rng: tuple[int, torch.Generator] | None = None  # (seed, generator) of the session's sampling

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **kwargs: Any) -> "VideoChat":
        """A session over `VideoLLM.from_pretrained(folder)`; kwargs as for the constructor."""
        return cls(VideoLLM.from_pretrained(folder), **kwargs)

    # ---------------------------------------------------------------- state
    @property
    def clip(self) -> Clip | None:
        """The loaded clip (frames uint8 [T, H, W, 3], timestamps), or None."""
        return None if self._video is None else self._video.clip

    @property
    def media_type(self) -> str | None:
        return None if self._video is None else self._video.media_type

    @property
    def history(self) -> list[Turn]:
        """The turns so far (user text as typed, without the placeholder)."""
        return list(self._turns)

    @property
    def context_tokens(self) -> int:
        """Tokens whose keys/values are in the cache."""
        return len(self._cached_ids)

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens the loaded video takes in the context (after any pruning)."""
        if self._video is None:
            return 0
        if self._video.keep is not None:
            return sum(self._video.keep)
        return self._video.slot.count(VISUAL_TOKEN)

    def conversation(self, question: str | None = None) -> list[Turn]:
        """The turns exactly as the model sees them: the placeholder opens the first user turn."""
        turns = list(self._turns) + ([Turn("user", question)] if question is not None else [])
        if self._video is not None:
            first = next((i for i, t in enumerate(turns) if t.role == "user"), None)
            if first is not None:
                turns[first] = Turn("user", f"{PLACEHOLDERS[self._video.media_type]}\n{turns[first].text}")
        return turns

    def reset(self) -> None:
        """Forget the conversation; the video (and its cached prefix) stays loaded."""
        self._close_active()
        self._turns = []
        self._epoch += 1
        if self._video is not None:
            prefix = self._prefix_ids()
            keep = _common_prefix(self._cached_ids, prefix)
            self._crop(keep)
        else:
            self._crop(0)
        log.debug("conversation reset (%d tokens kept in the cache)", len(self._cached_ids))

    # ---------------------------------------------------------------- video
    def load_video(self, path: str | os.PathLike, num_frames: int | None = None, start: float | None = None,
                   end: float | None = None, *, sampling: str | None = None) -> Clip:
        """Decode `path` (video file, frame folder, GIF or image), encode it and prefill it; starts a new
        conversation. An image is a 1-frame clip with the `<image>` placeholder. Raises VideoDecodeError
        (naming the path) and leaves the previous video loaded when decoding fails."""
        path = os.fspath(path)
        is_image = os.path.isfile(path) and choose_backend(path) == "image"
        t0 = time.perf_counter()
        clip = read_clip(path, 1 if is_image else (num_frames or self.num_frames), sampling or self.sampling, start, end)
        decode_s = time.perf_counter() - t0
        log.info("%s: decoded %d frame(s) in %.2fs", path, len(clip), decode_s)
        self.load_clip(clip, "image" if is_image else "video")
        assert self.load_stats is not None
        self.load_stats.decode_s = decode_s
        return clip

    def load_clip(self, clip: Clip, media_type: str | None = None) -> None:
        """Use an already decoded clip (see `load_video`); `media_type` defaults to image for 1 frame."""
        media_type = media_type or ("image" if len(clip) == 1 else "video")
        if media_type not in PLACEHOLDERS:
            raise ValueError(f"media_type must be one of {sorted(PLACEHOLDERS)}, got {media_type!r}")
        pixel_values = self.model.tower.preprocessor(clip.frames)  # [T, 3, H, W]
        timestamps = torch.as_tensor(np.asarray(clip.timestamps), dtype=torch.float32)  # [T]
        video = _Video(clip, media_type, pixel_values, timestamps)
        video.slot = self.model.visual_slot(pixel_values.shape[0], timestamps.tolist())
        prefix = self._prefix_ids(video)
        if len(prefix) >= self.max_context:
            raise ContextOverflowError(
                f"{clip.source}: {len(clip)} frame(s) take {video.slot.count(VISUAL_TOKEN)} visual tokens; with the "
                f"system prompt that is {len(prefix)} tokens before any question, and the model's context limit is "
                f"{self.max_context}. Load the video with fewer frames (num_frames=...).", len(prefix), self.max_context)
        self._close_active()
        self._video = video
        self._turns = []
        self._epoch += 1
        self._crop(0)
        stats = LoadStats(frames=len(clip))
        if self.reuse_cache and not self._instruction_aware:
            stats.visual_encode_s = self._encode(video, None)
            t0 = time.perf_counter()
            self._prefill(self._prefix_ids())
            stats.prefill_s = time.perf_counter() - t0
            stats.prefix_tokens = len(self._cached_ids)
            log.info("%s: %d visual tokens encoded in %.2fs, %d prefix tokens prefilled in %.2fs", clip.source,
                     self.num_visual_tokens, stats.visual_encode_s, stats.prefix_tokens, stats.prefill_s)
        stats.visual_tokens = self.num_visual_tokens
        self.load_stats = stats

    @property
    def _instruction_aware(self) -> bool:
        return bool(getattr(self.model.connector, "uses_instruction", False))

    def _encode(self, video: _Video, instruction: str | None) -> float:
        """Run the tower (unless its features are kept) and the connector; returns the seconds spent."""
        t0 = time.perf_counter()
        model = self.model
        with torch.no_grad():
            features = video.features
            if features is None:
                dtype = next(model.tower.parameters()).dtype
                px = video.pixel_values[None].to(model.device, dtype)  # [1, T, 3, H, W]
                features = model.tower(px, video.timestamps[None].to(model.device))  # [1, T', N, D]
                if self.reuse_cache and self._instruction_aware:
                    video.features = features
            ins = None
            if self._instruction_aware:
                ids = model.tokenizer(instruction or "", add_special_tokens=False)["input_ids"] or [model.tokenizer.eos_token_id]
                ids_t = torch.as_tensor([ids], device=model.device)
                ins = Instruction(model.llm.get_input_embeddings()(ids_t), torch.ones_like(ids_t, dtype=torch.bool))
            out = model.connector(features, ins)
        if video is self._video and VISUAL_TOKEN in self._cached_ids:  # cached keys/values used the old tokens
            self._crop(self._cached_ids.index(VISUAL_TOKEN))
        embeds = out.embeds[0]  # [L, D]
        expected = video.slot.count(VISUAL_TOKEN)
        if embeds.shape[0] != expected:
            raise ValueError(f"the connector produced {embeds.shape[0]} tokens for a slot of {expected}")
        keep = None
        if out.mask is not None and not bool(out.mask.all()):
            keep = out.mask[0].tolist()
            embeds = embeds[out.mask[0]]
        video.embeds = embeds.to(model.llm.get_input_embeddings().weight.dtype)
        video.keep = keep
        video.instruction = instruction
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- token ids
    def _canonical(self, ids: list[int], video: _Video | None = None) -> list[int]:
        """Prompt ids with the visual positions the connector pruned removed (what the LLM actually sees)."""
        video = video or self._video
        if video is None or video.keep is None:
            return ids
        out, k = [], 0
        for t in ids:
            if t == VISUAL_TOKEN:
                if video.keep[k]:
                    out.append(t)
                k += 1
            else:
                out.append(t)
        return out

    def _prompt_ids(self, turns: list[Turn], video: _Video | None = None) -> list[int]:
        video = video or self._video
        media_type = video.media_type if video is not None else None
        slot = video.slot if video is not None else []
        ids = self.model.template.encode_prompt(turns, media_type, slot, where="chat")
        return self._canonical(ids, video)

    def _prefix_ids(self, video: _Video | None = None) -> list[int]:
        """System prompt + first user header + the visual slot: what every conversation about this video opens with."""
        video = video or self._video
        assert video is not None
        ids = self._prompt_ids([Turn("user", f"{PLACEHOLDERS[video.media_type]}\n?")], video)
        last = max(i for i, t in enumerate(ids) if t == VISUAL_TOKEN)
        return ids[: last + 1]

    # ---------------------------------------------------------------- cache
    def _crop(self, length: int) -> None:
        if length <= 0 or self._cache is None:
            self._cache, self._cached_ids = None, []
        elif length < len(self._cached_ids):
            try:
                self._cache.crop(length - len(self._cached_ids))  # a negative count: tokens to remove
            except (RuntimeError, ValueError) as e:  # e.g. a sliding-window layer that no longer has the past
                log.debug("the KV cache cannot be rolled back (%s); it will be rebuilt", e)
                self._cache, self._cached_ids = None, []
                return
            self._cached_ids = self._cached_ids[:length]

    def _embed(self, ids: list[int], start: int) -> torch.Tensor:
        """Input embeddings [1, S, D] of `ids`, which sit at position `start` of the conversation."""
        model = self.model
        ids_t = torch.as_tensor(ids, device=model.device)  # [S]
        embeds = model.llm.get_input_embeddings()(ids_t.clamp(min=0))  # [S, D]
        is_visual = ids_t == VISUAL_TOKEN
        if bool(is_visual.any()):
            assert self._video is not None and self._video.embeds is not None
            first = sum(1 for t in self._cached_ids[:start] if t == VISUAL_TOKEN)
            count = int(is_visual.sum())
            embeds = embeds.masked_scatter(is_visual[:, None], self._video.embeds[first:first + count])
        return embeds[None]

    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Append `ids` to the cache; returns the logits [V] after the last one. On failure the cache is dropped."""
        start = len(self._cached_ids)
        if self._cache is None:
            self._cache = DynamicCache(config=self.model.llm.config)
        try:
            with torch.no_grad():
                out = self.model.llm(inputs_embeds=self._embed(ids, start), past_key_values=self._cache,
                                     use_cache=True, logits_to_keep=1)
        except BaseException:
            self._cache, self._cached_ids = None, []  # some layers may have been updated: start over next turn
            raise
        self._cache = out.past_key_values
        self._cached_ids.extend(ids)
        return out.logits[0, -1]

    def _prefill(self, ids: list[int]) -> tuple[torch.Tensor, int]:
        """Make the cache hold `ids`, prefilling only what it lacks; (logits [V] after the last id, reused count)."""
        reused = _common_prefix(self._cached_ids, ids)
        if reused == len(ids):  # everything is cached, but the logits of the last position are needed
            reused -= 1
        self._crop(reused)
        reused = len(self._cached_ids)
        return self._forward(ids[reused:]), reused

    def _stop_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.tokenizer.eos_token_id, getattr(self.model.llm.generation_config, "eos_token_id", None),
                       getattr(self.model.llm.config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return ids

    # ---------------------------------------------------------------- asking
    def ask(self, question: str, *, stream: bool = False, max_new_tokens: int | None = None,
            temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
            seed: int | None = None) -> str | Iterator[str]:
        """Answer `question` about the loaded video, continuing the conversation.

        Returns the answer (stripped), or with `stream=True` an iterator of text pieces that join to exactly that
        answer; the turn is recorded when the iterator is exhausted, closed or interrupted (a partial answer is
        kept). Settings given here override `self.settings` for this turn only. NoVideoError and
        ContextOverflowError are raised by this call, before any generation, and leave the history unchanged.
        An unfinished stream of an earlier `ask` is closed first.
        """
        plan = self._prepare(question, dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                            top_k=top_k, seed=seed))
        pieces = self._generate(plan)
        if stream:
            self._active = pieces
            return pieces
        for _ in pieces:
            pass
        assert self._turns and self._turns[-1].role == "assistant"
        return self._turns[-1].text

    def _close_active(self) -> None:
        if self._active is not None:
            active, self._active = self._active, None
            active.close()  # type: ignore[attr-defined]

    def _prepare(self, question: str, overrides: dict[str, Any]) -> _Plan:
        started = time.perf_counter()
        if self._video is None and self.require_video:
            raise NoVideoError("no video loaded: call load_video(path) first (or create the session with "
                               "VideoChat(model, require_video=False) to chat without one)")
        settings = self.settings.with_overrides(**overrides)
        self._close_active()
        question = _sanitize(question).strip()
        turns = self.conversation(question)
        encode_s = 0.0
        video = self._video
        if video is not None:
            instruction = next(t.text for t in [*self._turns, Turn("user", question)] if t.role == "user")
            if not self.reuse_cache:
                video.features = video.embeds = None  # the baseline: tower + connector again every turn
            if video.embeds is None or (self._instruction_aware and video.instruction != instruction):
                encode_s = self._encode(video, instruction if self._instruction_aware else None)
        ids = self._prompt_ids(turns)
        room = self.max_context - len(ids)
        if room < 1:
            raise ContextOverflowError(self._overflow_message(ids, turns), len(ids) + 1, self.max_context)
        max_new = min(settings.max_new_tokens, room)
        if max_new < settings.max_new_tokens:
            log.warning("the answer is limited to %d tokens by the context limit (%d of %d used); reset() to make room",
                        max_new, len(ids), self.max_context)
        if not self.reuse_cache:
            self._crop(0)
        return _Plan(question, ids, settings, overrides.get("seed"), max_new, encode_s, time.perf_counter() - started,
                     self._epoch)

    def _generator(self, plan: _Plan) -> torch.Generator | None:
        """The random generator of a turn: fresh for a per-call seed, the session's for `settings.seed`."""
        if plan.call_seed is not None:
            return torch.Generator().manual_seed(plan.call_seed)
        seed = self.settings.seed
        if seed is None:
            return None  # torch's global generator
        if self._rng is None or self._rng[0] != seed:
            self._rng = (seed, torch.Generator().manual_seed(seed))
        return self._rng[1]

    def _overflow_message(self, ids: list[int], turns: list[Turn]) -> str:
        visual = ids.count(VISUAL_TOKEN)
        frames = 0 if self._video is None else len(self._video.clip)
        question_tokens = len(self.model.tokenizer(turns[-1].text, add_special_tokens=False)["input_ids"])
        return (f"the conversation needs {len(ids) + 1} tokens ({visual} visual tokens for {frames} frame(s), "
                f"{len(ids) - visual} text tokens over {len(turns)} turn(s), of which the question is {question_tokens}, "
                f"+1 to answer) but the model's context limit is {self.max_context}. To fit: reset() to drop the "
                f"earlier turns, ask a shorter question, or load the video with fewer frames (num_frames=...).")

    def _generate(self, plan: _Plan) -> Iterator[str]:
        """Prefill the new part of the prompt, then decode token by token, yielding text pieces.

        The turn is recorded when generation ends, is closed early or interrupted (with the partial answer);
        not when it fails with an error."""
        if plan.epoch != self._epoch:
            raise RuntimeError("this answer was prepared before the session changed (reset, load_video or ask); ask again")
        self._epoch += 1
        stats = TurnStats(visual_encode_s=plan.visual_encode_s, stopped="interrupted")
        generator = self._generator(plan)
        decoder = StreamDecoder(self.model.tokenizer)
        t_start = time.perf_counter()
        t_first: float | None = None
        failed = False
        try:
            logits, stats.reused_tokens = self._prefill(plan.ids)
            stats.prefilled_tokens = len(plan.ids) - stats.reused_tokens
            for step in range(plan.max_new_tokens):
                token = _pick(logits, plan.settings, generator)
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.time_to_first_token_s = plan.prepare_s + t_first - t_start
                if token in self.stop_ids:
                    stats.stopped = "eos"
                    break
                piece = decoder.push(token)
                if piece:
                    yield piece
                if step == plan.max_new_tokens - 1:
                    stats.stopped = "context" if plan.max_new_tokens < plan.settings.max_new_tokens else "max_new_tokens"
                    break
                logits = self._forward([token])  # [V]
            tail = decoder.finish()
            if tail:
                yield tail
        except Exception:
            failed = True
            raise
        finally:
            end = time.perf_counter()
            stats.generated_tokens = len(decoder.ids)
            stats.total_s = plan.prepare_s + end - t_start
            if t_first is not None and len(decoder.ids) > 1:
                stats.decode_tokens_per_s = (len(decoder.ids) - 1) / max(end - t_first, 1e-9)
            stats.context_tokens = len(self._cached_ids)
            self.last_stats = stats
            if not failed:
                self._turns += [Turn("user", plan.question), Turn("assistant", _sanitize(decoder.text))]
            log.debug("turn: %s", stats)


# -------------------------------------------------------------------- terminal REPL
REPL_HELP = """commands:
  /video PATH   load another video (or image); starts a new conversation
  /reset        forget the conversation, keep the video
  /help         this text
  /quit         leave (end of input, Ctrl-D, leaves too)
anything else is a question about the video"""


def repl(chat: VideoChat, stdin: TextIO | None = None, stdout: TextIO | None = None,
         read_line: Callable[[str], str] | None = None) -> int:
    """The `vlm chat` loop: read a line, run a /command or stream the answer. Returns an exit code.

    Lines come from `read_line(prompt)` (default: `input` on a terminal, for line editing) or `stdin`.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if read_line is None:
        interactive = stdin is sys.stdin and stdin.isatty()

        def read_line(prompt: str) -> str:
            if interactive:
                return input(prompt)
            stdout.write(prompt)
            stdout.flush()
            line = stdin.readline()
            if not line:
                raise EOFError
            return line

    def say(text: str = "") -> None:
        stdout.write(text + "\n")
        stdout.flush()

    if chat.clip is not None:
        say(f"[{chat.media_type}: {chat.clip.source}, {len(chat.clip)} frame(s), {chat.num_visual_tokens} visual tokens]")
    say("type a question, or /help")
    while True:
        try:
            line = read_line("you> ").strip()
        except EOFError:
            say()
            return 0
        except KeyboardInterrupt:
            say()
            return 130
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command in ("/quit", "/exit"):
            return 0
        if command == "/help":
            say(REPL_HELP)
        elif command == "/reset":
            chat.reset()
            say("[conversation cleared; the video is still loaded]")
        elif command == "/video":
            if not argument.strip():
                say("usage: /video PATH")
                continue
            try:
                clip = chat.load_video(Path(argument.strip()).expanduser())
            except (OSError, ValueError, RuntimeError) as e:  # VideoDecodeError names the path
                say(f"error: {type(e).__name__}: {e}")
                continue
            say(f"[{chat.media_type}: {clip.source}, {len(clip)} frame(s), {chat.num_visual_tokens} visual tokens]")
        elif command.startswith("/"):
            say(f"unknown command {command}; /help lists them")
        else:
            _answer(chat, line, stdout)
        stdout.flush()


def _answer(chat: VideoChat, question: str, stdout: TextIO) -> None:
    """Stream one answer; errors are reported and the loop goes on; Ctrl-C stops the answer, not the session."""
    try:
        pieces = chat.ask(question, stream=True)
    except KeyboardInterrupt:
        stdout.write("[interrupted]\n")
        return
    except NoVideoError:
        stdout.write("error: no video loaded: use /video PATH\n")
        return
    except ContextOverflowError as e:
        message = str(e).replace("reset()", "/reset").replace("(num_frames=...)", "(vlm chat --frames N)")
        stdout.write(f"error: {message}\n")
        return
    except Exception as e:  # noqa: BLE001  (a REPL reports and goes on)
        log.debug("ask failed", exc_info=True)
        stdout.write(f"error: {type(e).__name__}: {e}\n")
        return
    stdout.write("bot> ")
    stdout.flush()
    try:
        for piece in pieces:
            stdout.write(piece)
            stdout.flush()
    except KeyboardInterrupt:
        pieces.close()  # type: ignore[union-attr]
        stdout.write(" [interrupted]")
    except Exception as e:  # noqa: BLE001
        log.debug("generation failed", exc_info=True)
        stdout.write(f"\nerror: {type(e).__name__}: {e}")
    stdout.write("\n")
    stdout.flush()
