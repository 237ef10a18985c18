"""Long videos in bounded memory: encode chunk by chunk, keep a fixed number of consolidated token groups.

MovieChat (Song et al. 2024) keeps a long-term memory of frame tokens and, when it is full, merges the most
similar adjacent frames into one. `VideoMemory` does that with the connector's temporal groups (one frame for
LLaVA's MLP, two for STC's 2x2x2 downsampling): it holds at most `max_groups` groups of `tokens_per_group` tokens,
in time order; adding groups past the bound repeatedly averages the pair of adjacent groups whose tokens are most
alike (cosine of the flattened groups), weighted by how many source groups each already holds. Each group keeps the
time span it covers, so "Time: x.xs" stamps (the model's `time_stamps`) still say where in the video it is.

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

    @property
    def tokens(self) -> torch.Tensor:
        """The memory as visual tokens [G * P, D], in time order."""
        if not self.groups:
            raise ValueError("the memory is empty")
        return torch.cat(self.groups)

    @property
    def nbytes(self) -> int:
        return sum(int(g.numel() * g.element_size()) for g in self.groups)


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
        raise ValueError("the memory needs a connector without token pruning (its groups must be equal)")
    groups = out.groups
    return out.embeds[0], groups, group_starts(stamps, groups)


def encode_stream(model: Any, path: str | os.PathLike, *, fps: float = 1.0, chunk_frames: int = 8,
                  max_groups: int = 16, start: float | None = None, end: float | None = None,
                  memory: VideoMemory | None = None) -> tuple[VideoMemory, Clip, StreamStats]:
    """Encode a (long) video into a bounded memory; returns (memory, the last chunk, stats)."""
    memory = memory if memory is not None else VideoMemory(max_groups)
    stats, last = StreamStats(), None
    t0 = time.perf_counter()
    for clip in chunks_of(path, fps, chunk_frames, start, end):
        tokens, groups, times = encode_chunk(model, clip)
        memory.add(tokens, groups, times)
        stats.frames += len(clip)
        stats.chunks += 1
        last = clip
    if last is None:
        raise ValueError(f"{path}: no frames between {start} and {end} s")
    stats.seconds = float(last.timestamps[-1]) + 1.0 / fps
    stats.encode_s = time.perf_counter() - t0
    return memory, last, stats
