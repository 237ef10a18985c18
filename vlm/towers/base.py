"""The vision-tower interface: pixels [B, T, 3, H, W] in, visual tokens [B, T', N, D] out."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from vlm.registry import Registry
from vlm.video.transforms import VideoPreprocessor


@dataclass
class VisualFeatures:
    """What a tower emits and what token reducers and connectors consume."""

    tokens: torch.Tensor  # [B, T', N, D]
    grid: tuple[int, int, int]  # (T', h, w) with N == h * w; an unstructured token set is (T', 1, N)
    mask: torch.Tensor | None = None  # [B, T', N] bool, True = token kept; None = all kept
    timestamps: torch.Tensor | None = None  # [B, T'] seconds at which each temporal position starts

    def __post_init__(self) -> None:
        t, h, w = self.grid
        if self.tokens.dim() != 4 or self.tokens.shape[1] != t or self.tokens.shape[2] != h * w:
            raise ValueError(f"VisualFeatures: tokens {tuple(self.tokens.shape)} do not match grid {self.grid}")

    def with_(self, **changes: Any) -> "VisualFeatures":
        return replace(self, **changes)


class VisionTower(nn.Module):
    """A video/image encoder. Subclasses set the class attributes and implement `encode` and `grid_for`.

    Nothing here disables gradients: whether a tower is frozen, LoRA-tuned or fully trained is decided by
    the training stage through `requires_grad`, never by the tower.
    """

    hidden_size: int
    temporal_patch: int = 1  # frames per temporal token (2 for VideoMAE's tubelets)
    lora_targets: tuple[str, ...] = ()  # default module-name suffixes for LoRA on this tower
    preprocessor: VideoPreprocessor

    def grid_for(self, num_frames: int, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(T', h, w) of the tokens produced for `num_frames` preprocessed frames of size height x width."""
        raise NotImplementedError

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] float -> [B, T', N, D] tokens from the tapped layer."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor, timestamps: torch.Tensor | None = None) -> VisualFeatures:
        b, t, c, h, w = pixel_values.shape
        tokens = self.encode(pixel_values)  # [B, T', N, D]
        grid = self.grid_for(t, h, w)
        if timestamps is not None and self.temporal_patch > 1:
            timestamps = timestamps[:, :: self.temporal_patch][:, : grid[0]]  # [B, T']
        return VisualFeatures(tokens=tokens, grid=grid, timestamps=timestamps)


TOWERS: Registry[type[VisionTower]] = Registry("vision tower", VisionTower)
register_tower = TOWERS.register


def build_tower(name: str, **kwargs: Any) -> VisionTower:
    """Build a registered tower by key; importing `vlm.towers` registers the built-in families."""
    return TOWERS.build(name, **kwargs)
