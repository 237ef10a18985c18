"""A fixed visual-token budget: at most `max_tokens` visual tokens reach the LLM, however many frames a clip has.

A model config's `token_budget` ({"max_tokens": 256, "policy": "pool"}) is met between the tower and the
connector, on the tower's token grid (T', h, w), by one of two policies:

- "pool": average-pool every frame's grid by the smallest integer stride s (ceil at odd edges) for which the
  connector's output fits; a long clip keeps all its frames at a coarser grid. If even 1x1 per frame does not fit,
  frames are then dropped as below (at the full grid for a connector whose count per frame does not depend on the
  grid, such as `word_slots`: pooling would only blur what its heads read).
- "frames": keep the grid and drop temporal positions: the largest T'' <= T' whose output fits, taken at the
  middle of T'' equal segments (as the `segment_middle` sampling policy does); the LLM's sequence length is the
  same for every clip of at least T'' positions.

The plan depends only on the grid, so `VideoLLM.num_visual_tokens(n)` stays known before any clip is read, and the
processor sizes visual slots from it. Applied to the tower's features (cached or not), it gives the same tokens
on every path: training from the feature cache, evaluation, chat. The budget is part of the saved config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from vlm.connectors.reduce import masked_avg_pool2d
from vlm.towers.base import VisualFeatures

POLICIES = ("pool", "frames")
Grid = tuple[int, int, int]


@dataclass(frozen=True)
class TokenBudget:
    max_tokens: int | None = None  # None: no budget (the connector's own count)
    policy: str = "pool"

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (int(self.max_tokens) != self.max_tokens or self.max_tokens < 1):
            raise ValueError(f"token_budget.max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"token_budget.policy must be one of {POLICIES}, got {self.policy!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "TokenBudget":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown token_budget settings {sorted(unknown)}; known: max_tokens, policy")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) if self.max_tokens is not None else {}

    def plan(self, grid: Grid, connector: Any) -> tuple[int, int]:
        """(spatial stride, temporal positions kept) that fit `grid` into the budget through `connector`."""
        t, h, w = grid
        if self.max_tokens is None:
            return 1, t

        def fits(s: int, frames: int) -> bool:
            return connector.num_tokens((frames, math.ceil(h / s), math.ceil(w / s))) <= self.max_tokens

        stride = 1
        if self.policy == "pool":
            stride = next((s for s in range(1, max(h, w) + 1) if fits(s, t)), 0)
            if stride == 0:  # no stride fits all positions: pool as far as pooling saves tokens, then drop positions
                saves = connector.num_tokens((t, 1, 1)) < connector.num_tokens((t, h, w))
                stride = max(h, w, 1) if saves else 1  # e.g. word slots: a fixed count per frame, whatever the grid
        frames = next((f for f in range(t, 0, -1) if fits(stride, f)), 0)
        if frames == 0:
            raise ValueError(f"token budget of {self.max_tokens}: one temporal position of grid {grid} already takes "
                             f"{connector.num_tokens((1, math.ceil(h / stride), math.ceil(w / stride)))} tokens"
                             + ("" if self.policy == "pool" else "; try policy 'pool'"))
        return stride, frames

    def grid(self, grid: Grid, connector: Any) -> Grid:
        """The tower grid after the budget (what the connector receives)."""
        stride, frames = self.plan(grid, connector)
        return frames, math.ceil(grid[1] / stride), math.ceil(grid[2] / stride)

    def apply(self, feats: VisualFeatures, connector: Any) -> VisualFeatures:
        """Tower features [B, T', N, D] reduced to the budget."""
        stride, frames = self.plan(feats.grid, connector)
        if frames < feats.grid[0]:
            keep = middle_positions(feats.grid[0], frames).to(feats.tokens.device)
            feats = VisualFeatures(tokens=feats.tokens[:, keep], grid=(frames, *feats.grid[1:]),
                                   mask=None if feats.mask is None else feats.mask[:, keep],
                                   timestamps=None if feats.timestamps is None else feats.timestamps[:, keep])
        if stride > 1:
            tokens, mask, grid = masked_avg_pool2d(feats.tokens, feats.grid, feats.mask, stride)
            feats = feats.with_(tokens=tokens, mask=mask, grid=grid)
        return feats


def middle_positions(total: int, keep: int) -> torch.Tensor:
    """The middles of `keep` equal segments of `total` positions (int64 [keep], ascending)."""
    return torch.tensor([int((i + 0.5) * total / keep) for i in range(keep)], dtype=torch.long)
