"""A chat's KV cache together with the token ids whose keys/values it holds, so a new prompt reuses their prefix."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from transformers import Cache

from vlm.llm.template import VISUAL_TOKEN
from vlm.model import VideoLLM

log = logging.getLogger(__name__)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class PrefixCache:
    """The keys/values of `ids` (one conversation, batch 1), grown by `extend` and rolled back by `crop`.

    Visual positions (VISUAL_TOKEN) take, in order, the rows of the `visual` tokens [L, D] given to `extend`.
    """

    def __init__(self, model: VideoLLM):
        self.model = model
        self.kv: Cache | None = None
        self.ids: list[int] = []

    @property
    def nbytes(self) -> int:
        """Bytes of the cached keys and values."""
        layers = getattr(self.kv, "layers", None) or []
        tensors = [getattr(layer, name, None) for layer in layers for name in ("keys", "values")]
        return sum(int(t.numel() * t.element_size()) for t in tensors if isinstance(t, torch.Tensor))

    def crop(self, length: int) -> None:
        """Keep the first `length` positions (all of them are dropped when the cache cannot be rolled back)."""
        if length <= 0 or self.kv is None:
            self.kv, self.ids = None, []
        elif length < len(self.ids):
            try:
                self.kv.crop(length - len(self.ids))  # a negative count: tokens to remove
            except (RuntimeError, ValueError) as e:  # e.g. a sliding-window layer that no longer has the past
                log.debug("the KV cache cannot be rolled back (%s); it will be rebuilt", e)
                self.kv, self.ids = None, []
                return
            self.ids = self.ids[:length]

    def extend(self, ids: list[int], visual: torch.Tensor | None) -> torch.Tensor:
        """Append `ids`; returns the logits [V] after the last one. On failure the cache is dropped."""
        first = self.ids.count(VISUAL_TOKEN)  # visual rows already in the cache
        count = ids.count(VISUAL_TOKEN)
        try:
            with torch.no_grad():
                embeds = self.model.splice(torch.as_tensor([ids]), visual[first:first + count] if count else None)
                if self.kv is None:
                    logits, self.kv = self.model.prefill(embeds)
                else:
                    logits = self.model.extend(self.kv, embeds)
        except BaseException:
            self.kv, self.ids = None, []  # some layers may have been updated: start over next turn
            raise
        self.ids.extend(ids)
        return logits[0, -1]

    def prefill(self, ids: list[int], visual: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """Make the cache hold `ids`, running only what it lacks; (logits [V] after the last id, reused count)."""
        reused = common_prefix(self.ids, ids)
        if reused == len(ids):  # everything is cached, but the logits of the last position are needed
            reused -= 1
        self.crop(reused)
        reused = len(self.ids)
        return self.extend(ids[reused:], visual), reused
