"""VideoLLaMA2's spatial-temporal convolution (STC) connector."""

from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import nn

from vlm.connectors.base import Connector, Instruction, TokenReducer, VisualTokens, register_connector
from vlm.connectors.reduce import check_reducer_chain
from vlm.connectors.regstage import RegStage
from vlm.towers.base import VisualFeatures


@register_connector("stc")
class STCConnector(Connector):
    """RegStage -> Conv3d(kernel = stride = (t, s, s)) + SiLU -> RegStage -> MLP readout (Cheng et al. 2024,
    "VideoLLaMA 2"). The RegStages are 2-D and run per frame; the Conv3d windows do not overlap, so output group g
    depends only on input frames [g*t, (g+1)*t): tokens stay chronological.

    kwargs: downsample (t, s, s) (default (2, 2, 2)); depth (RegStage blocks, default 4); hidden_size (default
    out_dim); group_size / bottle_ratio / se_ratio of the RegNet blocks (defaults 1, 1.0, 0.25: depthwise 3x3,
    as VideoLLaMA2 gets from timm's RegStage defaults).
    Tokens: groups = ceil(T'/t), tokens per group = ceil(h/s) * ceil(w/s). T', h and w are padded up to multiples
    of the kernel by replicating the last frame / row / column, so a 1-frame image becomes t identical frames.
    Mask rule: pruned tokens are zeroed before the first RegStage and re-zeroed after every block; an output token
    is kept iff any input token in its (t, s, s) window is kept. Kept outputs may see zeros (not content) at pruned
    neighbours through the 3x3 convolutions.
    Not supported after `tome` (raises at build): its output has no spatial layout to convolve over.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        reducers: Sequence[TokenReducer] = (),
        downsample: Sequence[int] = (2, 2, 2),
        depth: int = 4,
        hidden_size: int | None = None,
        group_size: int = 1,
        bottle_ratio: float = 1.0,
        se_ratio: float = 0.25,
    ):
        super().__init__(in_dim, out_dim, reducers)
        check_reducer_chain(self.reducers, consumer="stc", consumer_needs_spatial=True)
        downsample = tuple(int(k) for k in downsample)
        if len(downsample) != 3 or min(downsample) < 1:
            raise ValueError(f"stc connector: downsample must be 3 positive ints (t, s, s), got {downsample}")
        self.downsample: tuple[int, int, int] = downsample  # type: ignore[assignment]
        hidden = hidden_size or out_dim
        self.hidden_size = hidden
        self.s1 = RegStage(depth, in_dim, hidden, bottle_ratio, group_size, se_ratio)
        self.sampler = nn.Conv3d(hidden, hidden, kernel_size=downsample, stride=downsample)
        self.sampler_act = nn.SiLU()
        self.s2 = RegStage(depth, hidden, hidden, bottle_ratio, group_size, se_ratio)
        self.readout = nn.Sequential(nn.Linear(hidden, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def project_grid(self, grid: tuple[int, int, int]) -> tuple[int, int]:
        t, h, w = grid
        kt, kh, kw = self.downsample
        return math.ceil(t / kt), math.ceil(h / kh) * math.ceil(w / kw)

    def project(self, feats: VisualFeatures, instruction: Instruction | None = None) -> VisualTokens:
        b, t, n, d = feats.tokens.shape
        _, h, w = feats.grid
        kt, kh, kw = self.downsample
        dtype = self.sampler.weight.dtype
        x = feats.tokens.to(dtype).reshape(b * t, h, w, d).permute(0, 3, 1, 2)  # [B*T', D, h, w]
        m = None
        if feats.mask is not None:
            m = feats.mask.reshape(b * t, 1, h, w).to(dtype)  # [B*T', 1, h, w]
            x = x * m
        x = self.s1(x, m)  # [B*T', C, h, w]

        c = x.shape[1]
        x = x.reshape(b, t, c, h, w).transpose(1, 2)  # [B, C, T', h, w]
        pad = (0, -w % kw, 0, -h % kh, 0, -t % kt)  # replicate the last column / row / frame up to the kernel
        if any(pad):
            x = F.pad(x, pad, mode="replicate")
        x = self.sampler_act(self.sampler(x))  # [B, C, T2, h2, w2]
        t2, h2, w2 = x.shape[2:]
        x = x.transpose(1, 2).reshape(b * t2, c, h2, w2)  # [B*T2, C, h2, w2]

        m2 = None
        if m is not None:
            m5 = m.reshape(b, t, 1, h, w).transpose(1, 2)  # [B, 1, T', h, w]
            if any(pad):
                m5 = F.pad(m5, pad, mode="replicate")
            m5 = F.max_pool3d(m5, kernel_size=self.downsample, stride=self.downsample)  # [B, 1, T2, h2, w2]
            m2 = m5.transpose(1, 2).reshape(b * t2, 1, h2, w2)
            x = x * m2
        x = self.s2(x, m2)  # [B*T2, C, h2, w2]

        x = x.reshape(b, t2, c, h2 * w2).transpose(2, 3)  # [B, T2, h2*w2, C]
        embeds = self.readout(x).reshape(b, t2 * h2 * w2, self.out_dim)  # [B, L, D_llm]
        mask = None if m2 is None else (m2 > 0.5).reshape(b, t2 * h2 * w2)
        timestamps = None if feats.timestamps is None else feats.timestamps[:, ::kt]  # [B, T2]
        return VisualTokens(embeds=embeds, groups=t2, mask=mask, timestamps=timestamps)
