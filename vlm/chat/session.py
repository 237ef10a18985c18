"""VideoChat: the session object (see the `vlm.chat` docstring for how it reuses work across turns)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from vlm.chat.cache import PrefixCache, common_prefix
from vlm.chat.generation import GenerationSettings, LoadStats, StreamDecoder, TurnStats, next_token, stop_ids
from vlm.data.conversation import PLACEHOLDERS, Turn
from vlm.llm.template import VISUAL_TOKEN
from vlm.memory import StreamStats, TrackMemory, VideoMemory, encode_stream
from vlm.model import VideoLLM
from vlm.processor import drop_pruned
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


def _sanitize(text: str) -> str:
    """Media placeholders in free text would break the template's one-placeholder rule; drop them."""
    for placeholder in PLACEHOLDERS.values():
        if placeholder in text:
            log.warning("removed %s from a chat message: the video is placed by the session", placeholder)
            text = text.replace(placeholder, "")
    return text


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
    features: VisualFeatures | None = None  # tower output [1, T', N, D], kept for instruction-aware connectors
    embeds: torch.Tensor | None = None  # [L_kept, D_llm] connector output (pruned tokens removed)
    keep: torch.Tensor | None = None  # [L] bool per visual-slot position: kept by the connector (None = all)
    instruction: str | None = None  # the question the connector was conditioned on
    slot: list[int] = field(default_factory=list)


class VideoChat:
    """A chat session with one `VideoLLM` about one video at a time (see the `vlm.chat` docstring).

    Sampling settings live in `self.settings` (a `GenerationSettings`) and can be overridden per `ask`.
    `max_context` defaults to the smaller of the processor's `max_length` and the LLM's position limit.
    """

    def __init__(self, model: VideoLLM, *, require_video: bool = True, reuse_cache: bool = True,
                 max_context: int | None = None, num_frames: int | None = None, sampling: str | None = None,
                 **settings: Any):
        self.model = model.eval()
        self.processor = model.processor
        self.require_video = require_video
        self.reuse_cache = reuse_cache
        self.num_frames = num_frames or model.config.num_frames
        self.sampling = sampling or model.config.sampling
        self.settings = GenerationSettings(**settings)
        positions = getattr(model.llm.config, "max_position_embeddings", None) or self.processor.max_length
        self.max_context = int(max_context or min(self.processor.max_length, positions))
        self.stop_ids = stop_ids(self.processor.tokenizer, model.llm)
        self.last_stats: TurnStats | None = None
        self.load_stats: LoadStats | None = None
        self._video: _Video | None = None
        self._memory: VideoMemory | TrackMemory | None = None  # a long video's memory (load_long_video)
        self._turns: list[Turn] = []  # user turns without the placeholder; assistant turns as answered
        self._cache = PrefixCache(model)
        self._epoch = 0  # bumped by anything that invalidates a prepared turn
        self._active: Iterator[str] | None = None
        self._rng: tuple[int, torch.Generator] | None = None  # (seed, generator) of the session's sampling

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, device_map: str | dict[str, Any] | None = None,
                        **kwargs: Any) -> "VideoChat":
        """A session over `VideoLLM.from_pretrained(folder, device=, dtype=, device_map=)`, LoRA merged; kwargs as
        for the constructor."""
        model = VideoLLM.from_pretrained(folder, device=device, dtype=dtype, device_map=device_map, merge_lora=True)
        return cls(model, **kwargs)

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
        return len(self._cache.ids)

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens the loaded video takes in the context (after any pruning)."""
        if self._video is None:
            return 0
        if self._video.keep is not None:
            return int(self._video.keep.sum())
        return self._video.slot.count(VISUAL_TOKEN)

    def conversation(self, question: str | None = None) -> list[Turn]:
        """The turns exactly as the model sees them: the placeholder opens the first user turn."""
        turns = list(self._turns) + ([Turn("user", question)] if question is not None else [])
        if self._video is not None:
            first = next((i for i, t in enumerate(turns) if t.role == "user"), None)
            if first is not None:
                turns[first] = Turn("user", f"{PLACEHOLDERS[self._video.media_type]}\n{turns[first].text}")
        return turns

    @property
    def nbytes(self) -> int:
        """Bytes this session holds: the clip's frames, its pixels, features and visual tokens, and the KV cache."""
        video = self._video
        held = [] if video is None else [video.pixel_values, video.embeds, video.features and video.features.tokens]
        return (0 if video is None else int(video.clip.frames.nbytes)) + self._cache.nbytes + sum(
            int(t.numel() * t.element_size()) for t in held if t is not None)

    def set_history(self, turns: list[Turn]) -> None:
        """Replace the conversation with `turns`: an optional system turn, then user and assistant turns in
        alternation, ending with an assistant turn (the video stays loaded, placed by the session). The next `ask`
        reuses every cached token the new conversation shares: how a server replays a client's history."""
        roles = [t.role for t in turns]
        body = roles[1:] if roles[:1] == ["system"] else roles
        if body != ["user", "assistant"] * (len(body) // 2):
            raise ValueError(f"a history is [system,] then user/assistant turns in alternation ending with an "
                             f"assistant turn; got roles {roles}")
        self._close_active()
        self._turns = [Turn(t.role, _sanitize(t.text)) for t in turns]
        self._epoch += 1

    def reset(self) -> None:
        """Forget the conversation; the video (and its cached prefix) stays loaded."""
        self._close_active()
        self._turns = []
        self._epoch += 1
        self._cache.crop(0 if self._video is None else common_prefix(self._cache.ids, self._prefix_ids()))
        log.debug("conversation reset (%d tokens kept in the cache)", self.context_tokens)

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
        video = _Video(clip, media_type, *self.processor.preprocess_clip(clip))
        video.slot = self.processor.visual_slot(video.pixel_values.shape[0], video.timestamps.tolist())
        self._check_prefix(video)
        self._close_active()
        self._video, self._memory = video, None
        self._turns = []
        self._epoch += 1
        self._cache.crop(0)
        stats = LoadStats(frames=len(clip))
        if self.reuse_cache and not self.processor.uses_instruction:
            stats.visual_encode_s = self._encode(video, None)
            t0 = time.perf_counter()
            self._cache.prefill(self._prefix_ids(), video.embeds)
            stats.prefill_s = time.perf_counter() - t0
            stats.prefix_tokens = self.context_tokens
            log.info("%s: %d visual tokens encoded in %.2fs, %d prefix tokens prefilled in %.2fs", clip.source,
                     self.num_visual_tokens, stats.visual_encode_s, stats.prefix_tokens, stats.prefill_s)
        stats.visual_tokens = self.num_visual_tokens
        self.load_stats = stats

    def _check_prefix(self, video: _Video) -> None:
        prefix = self._prefix_ids(video)
        if len(prefix) >= self.max_context:
            raise ContextOverflowError(
                f"{video.clip.source}: {video.slot.count(VISUAL_TOKEN)} visual tokens; with the system prompt that is "
                f"{len(prefix)} tokens before any question, and the model's context limit is {self.max_context}. "
                "Load the video with fewer frames (num_frames=..., or max_groups=... for a long video).",
                len(prefix), self.max_context)

    # ---------------------------------------------------------------- long and streaming videos (vlm.memory)
    def load_long_video(self, path: str | os.PathLike, *, fps: float = 1.0, chunk_frames: int = 8,
                        max_groups: int = 16, start: float | None = None, end: float | None = None) -> StreamStats:
        """Decode and encode a long video chunk by chunk into a bounded memory of at most `max_groups` token groups
        (`vlm.memory`: time linear in the length, memory bounded; a tracks-layout word-slot model keeps every
        frame's detections and reads them as its tracks text instead); starts a new conversation. `append_frames`
        streams more frames in later. Not for instruction-aware connectors or `reuse_cache=False`."""
        if self.processor.uses_instruction or not self.reuse_cache:
            raise ValueError("long videos need a connector that does not read the question, and reuse_cache=True")
        memory, last, stats = encode_stream(self.model, path, fps=fps, chunk_frames=chunk_frames,
                                            max_groups=max_groups, start=start, end=end)
        self._use_memory(memory, last)
        self._turns = []
        return stats

    def append_frames(self, clip: Clip) -> None:
        """Streaming: encode `clip` (frames that continue the video, with their timestamps) into the memory; the
        conversation goes on and the next answer reads the updated memory."""
        if self._memory is None:
            raise ValueError("append_frames continues a video loaded with load_long_video")
        self._memory.add_chunk(self.model, clip)
        self._use_memory(self._memory, clip)

    def _use_memory(self, memory: VideoMemory | TrackMemory, last: Clip) -> None:
        video = _Video(last, "video", *self.processor.preprocess_clip(last))
        video.embeds = memory.tokens.to(self.model.device)
        video.slot = self.processor.memory_slot(memory)
        self._check_prefix(video)
        self._close_active()
        self._video, self._memory = video, memory
        self._epoch += 1
        ids = self._cache.ids  # keys/values from the first visual position on are stale
        self._cache.crop(ids.index(VISUAL_TOKEN) if VISUAL_TOKEN in ids else len(ids))
        self.load_stats = LoadStats(frames=len(last), visual_tokens=self.num_visual_tokens)

    def _encode(self, video: _Video, instruction: str | None) -> float:
        """Run the tower (unless its features are kept) and the connector; returns the seconds spent."""
        t0 = time.perf_counter()
        model = self.model
        with torch.no_grad():
            features = video.features
            if features is None:
                features = model.tower_features(video.pixel_values[None], video.timestamps[None])  # [1, T', N, D]
                if self.reuse_cache and self.processor.uses_instruction:
                    video.features = features
            ins = None
            if self.processor.uses_instruction:
                ids = torch.as_tensor([self.processor.instruction_ids([Turn("user", instruction or "")], None)])
                ins = model.embed_instruction(ids, torch.ones_like(ids, dtype=torch.bool))
            out = model.encode_visual([], [video.timestamps], ins, [features.tokens[0]], [features.grid])
        if video is self._video and VISUAL_TOKEN in self._cache.ids:  # cached keys/values used the old tokens
            self._cache.crop(self._cache.ids.index(VISUAL_TOKEN))
        expected = video.slot.count(VISUAL_TOKEN)
        if out.embeds.shape[1] != expected:
            raise ValueError(f"the connector produced {out.embeds.shape[1]} tokens for a slot of {expected}")
        video.keep = None if out.mask is None or bool(out.mask.all()) else out.mask[0]
        video.embeds = out.embeds[0] if video.keep is None else out.embeds[0][video.keep]  # [L_kept, D]
        video.instruction = instruction
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- token ids
    def _prompt_ids(self, turns: list[Turn], video: _Video | None = None) -> list[int]:
        """The prompt ids of `turns`, with the visual positions the connector pruned removed (what the LLM sees)."""
        video = video or self._video
        media_type = video.media_type if video is not None else None
        slot = video.slot if video is not None else []
        ids = self.processor.template.encode_prompt(turns, media_type, slot, where="chat")
        if video is None or video.keep is None:
            return ids
        ids_t = torch.as_tensor([ids])
        return drop_pruned(ids_t, torch.ones_like(ids_t), None, video.keep)[0][0].tolist()

    def _prefix_ids(self, video: _Video | None = None) -> list[int]:
        """System prompt + first user header + the visual slot: what every conversation about this video opens with."""
        video = video or self._video
        assert video is not None
        ids = self._prompt_ids([Turn("user", f"{PLACEHOLDERS[video.media_type]}\n?")], video)
        last = max(i for i, t in enumerate(ids) if t == VISUAL_TOKEN)
        return ids[: last + 1]
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
            if video.embeds is None or (self.processor.uses_instruction and video.instruction != instruction):
                encode_s = self._encode(video, instruction if self.processor.uses_instruction else None)
        ids = self._prompt_ids(turns)
        room = self.max_context - len(ids)
        if room < 1:
            raise ContextOverflowError(self._overflow_message(ids, turns), len(ids) + 1, self.max_context)
        max_new = min(settings.max_new_tokens, room)
        if max_new < settings.max_new_tokens:
            log.warning("the answer is limited to %d tokens by the context limit (%d of %d used); reset() to make room",
                        max_new, len(ids), self.max_context)
        if not self.reuse_cache:
            self._cache.crop(0)
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
        question_tokens = len(self.processor.tokenizer(turns[-1].text, add_special_tokens=False)["input_ids"])
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
        warpers = plan.settings.warpers()
        decoder = StreamDecoder(self.processor.tokenizer)
        t_start = time.perf_counter()
        t_first: float | None = None
        failed = False
        try:
            visual = None if self._video is None else self._video.embeds
            logits, stats.reused_tokens = self._cache.prefill(plan.ids, visual)
            stats.prefilled_tokens = len(plan.ids) - stats.reused_tokens
            for step in range(plan.max_new_tokens):
                token = next_token(logits, warpers, generator)
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
                logits = self._cache.extend([token], visual)  # [V]
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
            stats.context_tokens = self.context_tokens
            self.last_stats = stats
            if not failed:
                self._turns += [Turn("user", plan.question), Turn("assistant", _sanitize(decoder.text))]
            log.debug("turn: %s", stats)

