"""Pre-norm transformer blocks around the attention variants, and the per-mode block stack."""

from __future__ import annotations

import torch
from torch import nn

from vlm.towers.video_vit.attention import (
    FactorizedDotProductAttention,
    Grid,
    MultiHeadAttention,
    PoolingAttention,
    TokenMixer,
    WindowAttention3D,
)
from vlm.towers.video_vit.config import VideoViTConfig


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """x <- residual(x) + attn(LN(x)); x <- x + MLP(LN(x)), on [B, T, N, D] tokens."""

    def __init__(self, dim: int, mlp_ratio: float, attn: TokenMixer) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attn
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        y, out_grid = self.attn(self.norm1(x), grid)
        x = self.attn.residual(x, grid) + y
        return x + self.mlp(self.norm2(x)), out_grid


class DividedBlock(nn.Module):
    """TimeSformer's divided space-time block (ViViT model 3): temporal attention (the T tokens at each position),
    then spatial attention (the N tokens of each time step), then the MLP; each pre-norm and residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm_t, self.attn_t = nn.LayerNorm(dim), MultiHeadAttention(dim, heads, qkv_bias, scope="time")
        self.norm1, self.attn = nn.LayerNorm(dim), MultiHeadAttention(dim, heads, qkv_bias, scope="space")
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        x = x + self.attn_t(self.norm_t(x), grid)[0]
        x = x + self.attn(self.norm1(x), grid)[0]
        return x + self.mlp(self.norm2(x)), grid


def build_blocks(cfg: VideoViTConfig) -> nn.ModuleList:
    """The `depth` blocks of the configured attention mode (factorized_encoder: spatial blocks, then temporal)."""
    d, h, r, bias = cfg.width, cfg.heads, cfg.mlp_ratio, cfg.qkv_bias
    blocks: list[nn.Module] = []
    for i in range(cfg.depth):
        if cfg.attention == "joint":
            blocks.append(Block(d, r, MultiHeadAttention(d, h, bias, "joint")))
        elif cfg.attention == "factorized_encoder":
            scope = "space" if i < cfg.num_spatial_blocks else "time"
            blocks.append(Block(d, r, MultiHeadAttention(d, h, bias, scope)))
        elif cfg.attention == "divided":
            blocks.append(DividedBlock(d, h, r, bias))
        elif cfg.attention == "factorized_dot_product":
            blocks.append(Block(d, r, FactorizedDotProductAttention(d, h, bias)))
        elif cfg.attention == "window":
            blocks.append(Block(d, r, WindowAttention3D(d, h, cfg.window, shifted=cfg.shift and i % 2 == 1, qkv_bias=bias)))
        else:  # pooling
            q_stride = cfg.q_stride if i in cfg.q_pool_blocks else None
            blocks.append(Block(d, r, PoolingAttention(d, h, cfg.kv_stride, cfg.kv_pool, q_stride, bias)))
    return nn.ModuleList(blocks)
