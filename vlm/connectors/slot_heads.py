"""The word-slot connector's heads: what each cell of a frame holds (an object's centre, its attributes) and what
the frame shows (the scene), and how an object moves, read from the frames around it (`vlm.connectors.words`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SlotHead(nn.Module):
    """Per cell: an object-centre logit and per-attribute logits (from the cell and its difference to the frame
    mean); per frame: per-scene-attribute logits (from the frame's mean and spread over cells and, with
    `scene_grid` g > 1, the means of its g x g regions: where in the frame a tone is, e.g. which end of a
    gradient is which)."""

    def __init__(self, in_dim: int, object_classes: int, scene_classes: int, hidden: int = 256, scene_grid: int = 1):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.cell = nn.Sequential(nn.Linear(2 * in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                  nn.Linear(hidden, 1 + object_classes))
        self.scene_grid = int(scene_grid)
        regions = self.scene_grid ** 2 if self.scene_grid > 1 else 0
        self.scene = nn.Sequential(nn.Linear((2 + regions) * in_dim, hidden), nn.GELU(),
                                   nn.Linear(hidden, max(1, scene_classes)))

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, N, C] on a (T, h, w) grid -> cell logits [B, T, N, 1 + object classes], scene logits [B, T, S]."""
        x = self.norm(x.to(self.norm.weight.dtype))
        frame = x.mean(2, keepdim=True)
        scene = [frame[:, :, 0], x.std(2)]
        if self.scene_grid > 1:
            b, t, _, c = x.shape
            maps = x.reshape(b * t, grid[1], grid[2], c).permute(0, 3, 1, 2)
            scene.append(F.adaptive_avg_pool2d(maps, self.scene_grid).flatten(1).reshape(b, t, -1))
        return self.cell(torch.cat([x, x - frame], -1)), self.scene(torch.cat(scene, -1))


class MotionHead(nn.Module):
    """Per queried cell: logits of the attributes that need time (how an object moves, grows, turns), from the
    cell and its 3x3 neighbourhood in the previous and the next frame (the edges repeat at the clip's ends)."""

    def __init__(self, in_dim: int, classes: int, hidden: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.net = nn.Sequential(nn.Linear(19 * in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int], b: torch.Tensor, t: torch.Tensor,
                c: torch.Tensor) -> torch.Tensor:
        """x [B, T, N, C]; b, t, c: [M] clip, frame and cell of each query -> [M, classes]."""
        x = self.norm(x.to(self.norm.weight.dtype))
        h, w = grid[1], grid[2]
        row, col = c // w, c % w
        offsets = torch.tensor([-1, 0, 1], device=c.device)
        rows = (row[:, None, None] + offsets[None, :, None]).clamp(0, h - 1)
        cols = (col[:, None, None] + offsets[None, None, :]).clamp(0, w - 1)
        around = (rows * w + cols).flatten(1)  # [M, 9]
        last = x.shape[1] - 1
        prev = x[b[:, None], (t - 1).clamp(min=0)[:, None], around]  # [M, 9, C]
        nxt = x[b[:, None], (t + 1).clamp(max=last)[:, None], around]
        return self.net(torch.cat([x[b, t, c], prev.flatten(1), nxt.flatten(1)], -1))
