"""Tubelet embedding (ViViT's Conv3d over t x p x p tubes) and learned position tables resized at forward time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pad_frames(pixels: torch.Tensor, tubelet: int) -> torch.Tensor:
    """[B, T, C, H, W] -> [B, ceil(T / tubelet) * tubelet, C, H, W] by repeating the last frame
    (so an image, T = 1, goes through a tubelet-2 encoder as a still clip)."""
    pad = (-pixels.shape[1]) % tubelet
    if pad == 0:
        return pixels
    return torch.cat([pixels, pixels[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)


class TubeletEmbed(nn.Module):
    """Non-overlapping tubes of `tubelet` frames x `patch` x `patch` pixels, linearly embedded (Conv3d with
    kernel = stride, ViViT's "tubelet embedding"): [B, T, 3, H, W] -> [B, T', h, w, D]."""

    def __init__(self, width: int, patch_size: int, tubelet: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size, self.tubelet = patch_size, tubelet
        kernel = (tubelet, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, width, kernel_size=kernel, stride=kernel)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = pixels.shape  # [B, T, 3, H, W]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"video_vit: frames {h}x{w} are not a multiple of the patch size {self.patch_size}")
        x = pad_frames(pixels, self.tubelet).transpose(1, 2)  # [B, 3, T, H, W]
        x = self.proj(x.to(self.proj.weight.dtype))  # [B, D, T', h, w]
        return x.permute(0, 2, 3, 4, 1)  # [B, T', h, w, D]


class PositionEmbedding(nn.Module):
    """Learned absolute positions on the native token grid (T0, H0, W0), resized to any grid at forward time.

    kind="factorized": a time table [T0, D] plus a space table [H0, W0, D] (ViViT's factorised embeddings);
      resized by linear (time) and bilinear (space) interpolation.
    kind="joint": one table [T0, H0, W0, D], resized by trilinear interpolation.
    kind="none": no absolute positions (forward returns None; the window mode then relies on its relative bias).
    The native grid is returned exactly (no interpolation) when asked for.
    """

    def __init__(self, kind: str, grid: tuple[int, int, int], width: int) -> None:
        super().__init__()
        self.kind, self.grid, self.width = kind, tuple(grid), width
        t0, h0, w0 = grid
        if kind == "factorized":
            self.time = nn.Parameter(torch.zeros(t0, width))  # [T0, D]
            self.space = nn.Parameter(torch.zeros(h0, w0, width))  # [H0, W0, D]
            nn.init.trunc_normal_(self.time, std=0.02)
            nn.init.trunc_normal_(self.space, std=0.02)
        elif kind == "joint":
            self.table = nn.Parameter(torch.zeros(t0, h0, w0, width))  # [T0, H0, W0, D]
            nn.init.trunc_normal_(self.table, std=0.02)
        elif kind != "none":
            raise ValueError(f"position embedding kind must be factorized, joint or none; got {kind!r}")

    def forward(self, grid: tuple[int, int, int]) -> torch.Tensor | None:
        """The table for grid (t, h, w): [t, h, w, D] (broadcasts over the batch); None for kind="none"."""
        t, h, w = grid
        if self.kind == "none":
            return None
        if self.kind == "joint":
            table = self.table
            if (t, h, w) != self.grid:
                x = table.permute(3, 0, 1, 2).unsqueeze(0)  # [1, D, T0, H0, W0]
                x = F.interpolate(x, size=(t, h, w), mode="trilinear", align_corners=False)
                table = x[0].permute(1, 2, 3, 0)  # [t, h, w, D]
            return table
        time, space = self.time, self.space  # [T0, D], [H0, W0, D]
        if t != self.grid[0]:
            time = F.interpolate(time.t().unsqueeze(0), size=t, mode="linear", align_corners=False)[0].t()  # [t, D]
        if (h, w) != self.grid[1:]:
            x = space.permute(2, 0, 1).unsqueeze(0)  # [1, D, H0, W0]
            space = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)  # [h, w, D]
        return time[:, None, None, :] + space[None]  # [t, h, w, D]
