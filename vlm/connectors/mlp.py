"""LLaVA's projector: a linear layer or a GELU MLP applied to every visual token, with optional spatial pooling."""

from __future__ import annotations

import re
from typing import Sequence

from torch import nn

from vlm.connectors.base import Connector, Instruction, TokenReducer, VisualTokens, register_connector
from vlm.connectors.reduce import check_reducer_chain, masked_avg_pool2d
from vlm.towers.base import VisualFeatures

_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """"linear" -> Linear(in, out); "mlpNx_gelu" -> Linear(in, out) followed by N-1 x (GELU, Linear(out, out))."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    match = _MLP_RE.match(kind)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"mlp connector: projector must be 'linear' or 'mlpNx_gelu' (N >= 1), got {kind!r}")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


@register_connector("mlp")
class MLPConnector(Connector):
    """Per-token projector of LLaVA (Liu et al. 2023, "linear"; LLaVA-1.5 2024, "mlp2x_gelu").

    kwargs: projector "linear" | "mlpNx_gelu" (default "mlp2x_gelu"); pool (int, default 1): average-pooling
    stride over (h, w) before projecting, ceil at odd edges (same as the pool2d reducer in "avg" mode).
    Tokens: groups = T', tokens per group = ceil(h/pool) * ceil(w/pool) (on the grid after reducers).
    Mask rule: the projector is per token, so the incoming mask is carried as is (pool averages kept tokens only
    and keeps an output iff any of its sources is kept).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        reducers: Sequence[TokenReducer] = (),
        projector: str = "mlp2x_gelu",
        pool: int = 1,
    ):
        super().__init__(in_dim, out_dim, reducers)
        if pool < 1:
            raise ValueError(f"mlp connector: pool must be >= 1, got {pool}")
        check_reducer_chain(self.reducers, consumer=f"mlp(pool={pool})", consumer_needs_spatial=pool > 1)
        self.pool = pool
        self.projector = build_projector(projector, in_dim, out_dim)

    def project_grid(self, grid: tuple[int, int, int]) -> tuple[int, int]:
        t, h, w = grid
        return t, -(-h // self.pool) * -(-w // self.pool)

    def project(self, feats: VisualFeatures, instruction: Instruction | None = None) -> VisualTokens:
        tokens, mask = feats.tokens, feats.mask  # [B, T', N, D], [B, T', N] | None
        if self.pool > 1:
            tokens, mask, _ = masked_avg_pool2d(tokens, feats.grid, mask, self.pool)
        b, t, n, _ = tokens.shape
        param = next(self.projector.parameters())
        embeds = self.projector(tokens.to(param.dtype)).reshape(b, t * n, self.out_dim)  # [B, L, D_llm]
        return VisualTokens(
            embeds=embeds,
            groups=t,
            mask=None if mask is None else mask.reshape(b, t * n),
            timestamps=feats.timestamps,
        )
