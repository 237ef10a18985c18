"""The connector interface: visual features in, LLM-width tokens out, with the count known up front."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from vlm.registry import Registry
from vlm.towers.base import VisualFeatures


@dataclass
class Instruction:
    """The instruction text as LLM input embeddings, for instruction-aware connectors (InstructBLIP)."""

    embeds: torch.Tensor  # [B, S, D_llm]
    mask: torch.Tensor  # [B, S] bool, True = real token


@dataclass
class VisualTokens:
    """Connector output, in chronological order: `groups` equal consecutive chunks, one per output time step."""

    embeds: torch.Tensor  # [B, L, D_llm]
    groups: int  # L % groups == 0; 1 when the connector summarises the whole clip
    mask: torch.Tensor | None = None  # [B, L] bool, True = keep (pruned tokens are False); None = all kept
    timestamps: torch.Tensor | None = None  # [B, groups] seconds at which each group starts; None = unknown


class TokenReducer(nn.Module):
    """Reduces visual tokens before a connector (pooling, merging, pruning). Usable on its own."""

    def output_grid(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        raise NotImplementedError

    def forward(self, feats: VisualFeatures) -> VisualFeatures:
        raise NotImplementedError


class Connector(nn.Module):
    """Maps VisualFeatures [B, T', N, D_vis] to VisualTokens [B, L, D_llm], after optional token reducers.

    Subclasses implement `project` and `project_grid`; `num_tokens(grid)` is exact for every connector whose
    output does not depend on the data, and an upper bound when a reducer prunes (the mask says what is kept).
    """

    uses_instruction: bool = False

    def __init__(self, in_dim: int, out_dim: int, reducers: Sequence[TokenReducer] = ()):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.reducers = nn.ModuleList(reducers)

    def project_grid(self, grid: tuple[int, int, int]) -> tuple[int, int]:
        """(groups, tokens per group) that `project` emits for features on `grid`."""
        raise NotImplementedError

    def project(self, feats: VisualFeatures, instruction: Instruction | None = None) -> VisualTokens:
        raise NotImplementedError

    def reduced_grid(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        for reducer in self.reducers:
            grid = reducer.output_grid(grid)
        return grid

    def output_grid(self, grid: tuple[int, int, int]) -> tuple[int, int]:
        return self.project_grid(self.reduced_grid(grid))

    def num_tokens(self, grid: tuple[int, int, int]) -> int:
        groups, per_group = self.output_grid(grid)
        return groups * per_group

    def forward(self, feats: VisualFeatures, instruction: Instruction | None = None) -> VisualTokens:
        for reducer in self.reducers:
            feats = reducer(feats)
        return self.project(feats, instruction)


CONNECTORS: Registry[Connector] = Registry("connector", Connector)
REDUCERS: Registry[TokenReducer] = Registry("token reducer", TokenReducer)
register_connector = CONNECTORS.register
register_reducer = REDUCERS.register


def build_connector(
    name: str, in_dim: int, out_dim: int, reduce: Sequence[dict[str, Any]] = (), **kwargs: Any
) -> Connector:
    """Build a connector by key; `reduce` is a list of {"name": reducer_key, **kwargs} applied in order first."""
    reducers = []
    for spec in reduce:
        spec = dict(spec)
        reducers.append(REDUCERS.build(spec.pop("name"), **spec))
    return CONNECTORS.get(name)(in_dim=in_dim, out_dim=out_dim, reducers=reducers, **kwargs)
