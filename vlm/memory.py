"""Long videos in bounded memory: encode chunk by chunk, keep a fixed number of consolidated token groups.

MovieChat (Song et al. 2024) keeps a long-term memory of frame tokens and, when it is full, merges the most
similar adjacent frames into one. `VideoMemory` does that with the connector's temporal groups (one frame for
LLaVA's MLP, two for STC's 2x2x2 downsampling): it holds at most `max_groups` groups of `tokens_per_group` tokens,
in time order; adding groups past the bound repeatedly averages the pair of adjacent groups whose tokens are most
alike (cosine of the flattened groups), weighted by how many source groups each already holds. Each group keeps the
time span it covers, so "Time: x.xs" stamps (the model's `time_stamps`) still say where in the video it is.

A word-slot connector with the tracks layout keeps another memory, `TrackMemory`: per frame only what its heads
detected (the scene's words, and each found object's cell and words: a few dozen bytes), written when asked as the
tracks text (one sentence per object, with the seconds its words change) in the connector's fixed `text_tokens`
slot. Nothing is merged away: a needle seen in one frame stays in the text.

`encode_stream(model, path, fps=1, chunk_frames=8)` decodes the video one chunk of frames at a time, runs the
tower and connector on the chunk and adds its groups to the memory: time grows linearly with the video's length
while memory (one chunk of frames and pixels, and the bounded memory) does not grow. The LLM sees the memory:
`max_groups * tokens_per_group` visual tokens whatever the length. `VideoChat.load_long_video` and
`append_frames` use it for long and streaming videos.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from vlm.processor import group_starts
from vlm.video.clip import Clip
from vlm.video.decode import VideoReader
from vlm.video.sampling import sample_indices


@dataclass
class VideoMemory:
    max_groups: int = 16
    groups: list[torch.Tensor] = field(default_factory=list)  # each [tokens_per_group, D]
    spans: list[tuple[float, float]] = field(default_factory=list)  # (first, last) second each group covers
    weights: list[int] = field(default_factory=list)  # source groups merged into each
    merges: int = 0

    def __post_init__(self) -> None:
        if self.max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {self.max_groups}")

    def add(self, tokens: torch.Tensor, groups: int, times: list[float]) -> None:
        """Add connector output [groups * P, D] whose groups start at `times` (seconds), then consolidate."""
        if tokens.shape[0] % groups:
            raise ValueError(f"{tokens.shape[0]} tokens do not split into {groups} groups")
        if len(times) != groups:
            raise ValueError(f"{groups} groups need {groups} start times, got {len(times)}")
        for g, chunk in enumerate(tokens.detach().reshape(groups, -1, tokens.shape[-1])):
            if self.groups and chunk.shape != self.groups[0].shape:
                raise ValueError(f"a group of shape {tuple(chunk.shape)} after groups of {tuple(self.groups[0].shape)}")
            self.groups.append(chunk)
            self.spans.append((float(times[g]), float(times[g])))
            self.weights.append(1)
        while len(self.groups) > self.max_groups:
            self._merge_most_similar()

    def _merge_most_similar(self) -> None:
        flat = torch.nn.functional.normalize(torch.stack(self.groups).flatten(1).float(), dim=-1)  # [G, P*D]
        i = int((flat[:-1] * flat[1:]).sum(-1).argmax())  # the adjacent pair (i, i + 1) most alike
        wa, wb = self.weights[i], self.weights[i + 1]
        merged = (self.groups[i] * wa + self.groups[i + 1] * wb) / (wa + wb)
        self.groups[i : i + 2] = [merged.to(self.groups[i].dtype)]
        self.spans[i : i + 2] = [(self.spans[i][0], self.spans[i + 1][1])]
        self.weights[i : i + 2] = [wa + wb]
        self.merges += 1

    def add_chunk(self, model: Any, clip: Clip) -> None:
        """Encode a chunk of frames (tower + connector) and add its groups."""
        self.add(*encode_chunk(model, clip))

    @property
    def tokens(self) -> torch.Tensor:
        """The memory as visual tokens [G * P, D], in time order."""
        if not self.groups:
            raise ValueError("the memory is empty")
        return torch.cat(self.groups)

    @property
    def layout(self) -> tuple[int, int, list[float]]:
        """(groups, tokens per group, each group's first second): where its tokens go in the prompt."""
        return len(self.groups), self.groups[0].shape[0], [span[0] for span in self.spans]

    @property
    def nbytes(self) -> int:
        return sum(int(g.numel() * g.element_size()) for g in self.groups)


@dataclass
class TrackMemory:
    """A tracks-layout word-slot connector's memory of a long video: every frame's detections, and the tracks text
    written from them (`WordSlots.text`) as the LLM's word embeddings, at most `text_tokens` of them."""

    connector: Any
    grid: tuple[int, int, int] = (0, 0, 0)
    scenes: list[tuple[str, ...]] = field(default_factory=list)
    frames: list[list[Any]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    _written: tuple[int, Any] = (0, None)  # (frames, tokens) of the last text written

    def add_chunk(self, model: Any, clip: Clip) -> None:
        """The tower and the connector's heads on a chunk of frames; keeps only what they detected."""
        pixels, stamps = model.processor.preprocess_clip(clip)
        with torch.no_grad():
            feats = self.connector.reduced(model.tower_features(pixels[None], stamps[None]))
        (scenes, frames, times), = self.connector.detections(feats)
        self.scenes += scenes
        self.frames += frames
        self.times += times
        self.grid = (len(self.times), *feats.grid[1:])

    @property
    def text(self) -> str:
        if not self.times:
            raise ValueError("the memory is empty")
        return self.connector.text((self.scenes, self.frames, self.times), self.grid) or " nothing."

    @property
    def tokens(self) -> torch.Tensor:
        """The text's word embeddings [L, D], L <= the connector's slot for this many frames (written once per state)."""
        if self._written[0] != len(self.times):
            ids = self.connector.text_ids(self.text, self.connector.project_grid(self.grid)[1])
            self._written = (len(self.times), self.connector.embed_ids(ids))
        return self._written[1]

    @property
    def layout(self) -> tuple[int, int, list[float]]:
        return 1, self.tokens.shape[0], [self.times[0]]


def new_memory(model: Any, max_groups: int = 16) -> VideoMemory | TrackMemory:
    """The memory `model`'s connector needs: its detections for the tracks layout of word slots, else its groups."""
    if getattr(model.connector, "layout", "frames") in ("tracks", "story"):
        return TrackMemory(model.connector)
    return VideoMemory(max_groups)


@dataclass
class StreamStats:
    frames: int = 0
    chunks: int = 0
    seconds: float = 0.0  # of video covered
    encode_s: float = 0.0


def chunks_of(path: str | os.PathLike, fps: float = 1.0, chunk_frames: int = 8, start: float | None = None,
              end: float | None = None) -> Iterator[Clip]:
    """The video's frames at `fps` (between `start` and `end` seconds), `chunk_frames` at a time, decoded lazily."""
    with VideoReader(path) as reader:
        info = reader.info
        cap = max(1, math.ceil(info.duration * fps) + 1)
        indices = sample_indices(info.num_frames, info.fps, cap, "fps", start, end, target_fps=fps, max_frames=cap)
        for s in range(0, len(indices), chunk_frames):
            yield reader.get(np.asarray(indices[s : s + chunk_frames]))


@torch.no_grad()
def encode_chunk(model: Any, clip: Clip) -> tuple[torch.Tensor, int, list[float]]:
    """Tower + connector on one chunk: (tokens [groups * P, D], groups, each group's start second)."""
    pixels, stamps = model.processor.preprocess_clip(clip)
    out = model.encode_visual([pixels], [stamps])
    if out.mask is not None and not bool(out.mask.all()):
        raise ValueError("the memory needs a connector without token pruning (its groups must be equal; word slots: "
                         "layout 'tracks' keeps their own memory)")
    groups = out.groups
    return out.embeds[0], groups, group_starts(stamps, groups)


def encode_stream(model: Any, path: str | os.PathLike, *, fps: float = 1.0, chunk_frames: int = 8,
                  max_groups: int = 16, start: float | None = None, end: float | None = None,
                  memory: VideoMemory | TrackMemory | None = None) -> tuple[VideoMemory | TrackMemory, Clip, StreamStats]:
    """Encode a (long) video into a bounded memory (`new_memory`); returns (memory, the last chunk, stats)."""
    memory = memory if memory is not None else new_memory(model, max_groups)
    stats, last = StreamStats(), None
    t0 = time.perf_counter()
    for clip in chunks_of(path, fps, chunk_frames, start, end):
        memory.add_chunk(model, clip)
        stats.frames += len(clip)
        stats.chunks += 1
        last = clip
    if last is None:
        raise ValueError(f"{path}: no frames between {start} and {end} s")
    stats.seconds = float(last.timestamps[-1]) + 1.0 / fps
    stats.encode_s = time.perf_counter() - t0
    return memory, last, stats
