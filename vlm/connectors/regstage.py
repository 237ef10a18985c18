"""A RegNet stage (Radosavovic et al. 2020, "Designing Network Design Spaces"): bottleneck blocks with SE.

Written for the STC connector (VideoLLaMA2), which uses RegNet stages with channel LayerNorm and SiLU instead of
BatchNorm and ReLU: BatchNorm statistics are meaningless over padded and pruned visual tokens. Blocks accept an
optional keep-mask so pruned positions stay zero and do not dilute the squeeze-excitation average.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of [N, C, H, W]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): channel gates from the (masked) spatial mean."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x [N, C, H, W], mask [N, 1, H, W] float (1 = kept) or None
        if mask is None:
            s = x.mean(dim=(2, 3), keepdim=True)  # [N, C, 1, 1]
        else:
            s = (x * mask).sum(dim=(2, 3), keepdim=True) / mask.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


class RegBottleneck(nn.Module):
    """RegNet Y-block: 1x1 conv -> norm/act -> grouped 3x3 conv -> norm/act -> SE -> 1x1 conv -> norm, plus a
    shortcut (identity, or 1x1 conv + norm when channels change), then the activation."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        bottle_ratio: float = 1.0,
        group_size: int = 1,
        se_ratio: float = 0.25,
    ):
        super().__init__()
        mid = int(round(out_chs * bottle_ratio))
        if mid % group_size != 0:
            raise ValueError(f"RegBottleneck: bottleneck width {mid} is not a multiple of group_size {group_size}")
        self.conv1 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.norm1 = LayerNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, groups=mid // group_size, bias=False)
        self.norm2 = LayerNorm2d(mid)
        self.se = SqueezeExcite(mid, max(1, int(round(in_chs * se_ratio)))) if se_ratio > 0 else None
        self.conv3 = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.norm3 = LayerNorm2d(out_chs)
        self.act = nn.SiLU()
        if in_chs != out_chs:
            self.shortcut: nn.Module = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, bias=False), LayerNorm2d(out_chs))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x [N, C_in, H, W] -> [N, C_out, H, W]
        y = self.act(self.norm1(self.conv1(x)))
        y = self.act(self.norm2(self.conv2(y)))
        if self.se is not None:
            y = self.se(y, mask)
        y = self.norm3(self.conv3(y))
        return self.act(y + self.shortcut(x))


class RegStage(nn.Module):
    """`depth` RegBottleneck blocks at stride 1 (the first maps in_chs -> out_chs); 2-D, applied per frame.

    With a mask [N, 1, H, W] (1 = kept), pruned positions are re-zeroed after every block, so their content never
    reaches kept positions (only the zeros and biases there do, through the 3x3 convolutions).
    """

    def __init__(
        self,
        depth: int,
        in_chs: int,
        out_chs: int,
        bottle_ratio: float = 1.0,
        group_size: int = 1,
        se_ratio: float = 0.25,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"RegStage: depth must be >= 1, got {depth}")
        self.blocks = nn.ModuleList(
            RegBottleneck(in_chs if i == 0 else out_chs, out_chs, bottle_ratio, group_size, se_ratio)
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
            if mask is not None:
                x = x * mask
        return x
