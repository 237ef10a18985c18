"""Space-time self-attention variants, all on `torch.nn.functional.scaled_dot_product_attention`.

Tokens travel as x [B, T, N, D]: T time steps of N tokens each. `grid` is (T, h, w) with N == h * w when the
tokens form the full spatial grid, or None for an unstructured set (VideoMAE's visible tokens); the modes that
need the spatial layout (window, pooling) require a grid.

    MultiHeadAttention(scope="joint")  every token attends to every token          ViViT model 1 (Arnab et al. 2021)
    MultiHeadAttention(scope="space")  the N tokens of each time step              ViViT model 2's spatial encoder,
    MultiHeadAttention(scope="time")   the T tokens at each spatial position       TimeSformer's divided space-time
                                                                                    (Bertasius et al. 2021) = ViViT 3
    FactorizedDotProductAttention      half the heads in space, half in time        ViViT model 4
    WindowAttention3D                  3D (shifted) windows + relative position bias Video Swin (Liu et al. 2022)
    PoolingAttention                   keys/values (and optionally queries) pooled  MViT (Fan et al. 2021)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.towers.video_vit.config import pooled

Grid = tuple[int, int, int] | None
SCOPES = ("joint", "space", "time")


def _require_grid(grid: Grid, n: int, what: str) -> tuple[int, int, int]:
    if grid is None or grid[1] * grid[2] != n:
        raise ValueError(f"video_vit: {what} attention needs the full token grid (got grid {grid} for {n} tokens "
                         "per time step); it cannot run on a masked token subset")
    return grid


class TokenMixer(nn.Module):
    """Base of the attention modules: forward(x [B, T, N, D], grid) -> (y [B, T', N', D], grid'), and the
    matching residual path (identity unless the module pools its queries)."""

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:  # pragma: no cover
        raise NotImplementedError

    def residual(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        return x


class MultiHeadAttention(TokenMixer):
    """Multi-head self-attention over one scope of [B, T, N, D]: joint (all T*N tokens), space (the N tokens of
    each time step) or time (the T tokens at each of the N positions)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, scope: str = "joint") -> None:
        super().__init__()
        if scope not in SCOPES:
            raise ValueError(f"attention scope must be one of {SCOPES}, got {scope!r}")
        self.heads, self.scope = heads, scope
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        b, t, n, d = x.shape  # [B, T, N, D]
        if self.scope == "joint":
            seq = x.reshape(b, t * n, d)  # [B, L, D]
        elif self.scope == "space":
            seq = x.reshape(b * t, n, d)  # [B*T, N, D]
        else:
            seq = x.transpose(1, 2).reshape(b * n, t, d)  # [B*N, T, D]
        s, length, _ = seq.shape
        qkv = self.qkv(seq).view(s, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [3, S, H, L, hd]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [S, H, L, hd]
        out = self.proj(out.transpose(1, 2).reshape(s, length, d))  # [S, L, D]
        if self.scope == "time":
            return out.view(b, n, t, d).transpose(1, 2), grid  # [B, T, N, D]
        return out.view(b, t, n, d), grid


class FactorizedDotProductAttention(TokenMixer):
    """ViViT model 4: one qkv projection; the first half of the heads attends over the N tokens of the same time
    step, the second half over the T tokens at the same position; the heads are concatenated and projected."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if heads % 2:
            raise ValueError(f"factorized dot-product attention needs an even number of heads, got {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        b, t, n, d = x.shape  # [B, T, N, D]
        hd, half = d // self.heads, self.heads // 2
        qkv = self.qkv(x).view(b, t, n, 3, self.heads, hd)  # [B, T, N, 3, H, hd]
        sp = qkv[..., :half, :].permute(3, 0, 1, 4, 2, 5).reshape(3, b * t, half, n, hd)  # [3, B*T, H/2, N, hd]
        tm = qkv[..., half:, :].permute(3, 0, 2, 4, 1, 5).reshape(3, b * n, half, t, hd)  # [3, B*N, H/2, T, hd]
        out_s = F.scaled_dot_product_attention(sp[0], sp[1], sp[2])  # [B*T, H/2, N, hd]
        out_t = F.scaled_dot_product_attention(tm[0], tm[1], tm[2])  # [B*N, H/2, T, hd]
        out_s = out_s.view(b, t, half, n, hd).permute(0, 1, 3, 2, 4)  # [B, T, N, H/2, hd]
        out_t = out_t.view(b, n, half, t, hd).permute(0, 3, 1, 2, 4)  # [B, T, N, H/2, hd]
        out = torch.cat([out_s, out_t], dim=3).reshape(b, t, n, d)  # [B, T, N, D]
        return self.proj(out), grid


class WindowAttention3D(TokenMixer):
    """Video Swin's 3D window attention: tokens attend within non-overlapping (wt, wh, ww) windows, with a learned
    relative position bias per head; `shifted` blocks roll the grid by half a window first (so information crosses
    window borders in alternate blocks) and mask pairs of tokens that the roll brought together from opposite
    edges. A grid not divisible by the window is zero-padded; padded tokens are masked as keys. Along an axis
    shorter than the window, the window covers the whole axis and is not shifted (as Video Swin)."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int, int], shifted: bool, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads, self.window, self.shifted = heads, tuple(window), shifted
        wt, wh, ww = self.window
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_bias = nn.Parameter(torch.zeros((2 * wt - 1) * (2 * wh - 1) * (2 * ww - 1), heads))  # [R, H]
        nn.init.trunc_normal_(self.rel_bias, std=0.02)

    def _sizes(self, grid: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        win = tuple(min(w, g) for w, g in zip(self.window, grid))
        shift = tuple(w // 2 if self.shifted and g > w else 0 for w, g in zip(self.window, grid))
        return win, shift

    def _bias(self, win: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Relative position bias for a window of size `win`: [H, Nw, Nw]."""
        _, wh, ww = self.window
        coords = torch.stack(torch.meshgrid(*[torch.arange(w, device=device) for w in win], indexing="ij")).flatten(1)
        rel = coords[:, :, None] - coords[:, None, :]  # [3, Nw, Nw], each in -(w-1)..(w-1)
        wt_, wh_, ww_ = (w - 1 for w in self.window)
        index = (rel[0] + wt_) * (2 * wh - 1) * (2 * ww - 1) + (rel[1] + wh_) * (2 * ww - 1) + (rel[2] + ww_)
        return self.rel_bias[index].permute(2, 0, 1)  # [H, Nw, Nw]

    @staticmethod
    def _partition(x: torch.Tensor, win: tuple[int, ...]) -> torch.Tensor:
        """[B, Tp, Hp, Wp, C] -> [B, nWin, Nw, C]."""
        b, tp, hp, wp, c = x.shape
        wt, wh, ww = win
        x = x.view(b, tp // wt, wt, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(b, -1, wt * wh * ww, c)

    def _mask(self, padded: tuple[int, ...], grid: tuple[int, ...], win: tuple[int, ...], shift: tuple[int, ...],
              device: torch.device) -> torch.Tensor:
        """Allowed (query, key) pairs per window: [nWin, Nw, Nw] bool."""
        region = torch.zeros(padded, dtype=torch.long, device=device)
        is_pad = torch.zeros(padded, dtype=torch.bool, device=device)
        for axis, (size, w, s, g) in enumerate(zip(padded, win, shift, grid)):
            index = [slice(None)] * 3
            index[axis] = slice(g, None)
            is_pad[tuple(index)] = True
            if s:  # three regions along a shifted axis: untouched, the border, the wrapped-around part
                labels = torch.zeros(size, dtype=torch.long, device=device)
                labels[size - w : size - s] = 1
                labels[size - s :] = 2
                shape = [1, 1, 1]
                shape[axis] = size
                region = region * 3 + labels.view(shape)
        if any(shift):
            is_pad = torch.roll(is_pad, shifts=tuple(-s for s in shift), dims=(0, 1, 2))
        region = self._partition(region[None, ..., None], win)[0, ..., 0]  # [nWin, Nw]
        is_pad = self._partition(is_pad[None, ..., None], win)[0, ..., 0]  # [nWin, Nw]
        same = region[:, :, None] == region[:, None, :]
        # a real query never attends to a pad key; a pad query (whose output is dropped) may, so no row is empty
        return same & (~is_pad[:, None, :] | is_pad[:, :, None])

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        b, t, n, d = x.shape  # [B, T, N, D]
        t, h, w = _require_grid(grid, n, "window")
        win, shift = self._sizes((t, h, w))
        x = x.view(b, t, h, w, d)
        pads = [(-g) % wsz for g, wsz in zip((t, h, w), win)]
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))  # [B, Tp, Hp, Wp, D]
        padded = tuple(x.shape[1:4])
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        windows = self._partition(x, win)  # [B, nWin, Nw, D]
        nwin, nw = windows.shape[1], windows.shape[2]
        hd = d // self.heads
        qkv = self.qkv(windows).view(b, nwin, nw, 3, self.heads, hd).permute(3, 0, 1, 4, 2, 5)  # [3, B, nWin, H, Nw, hd]
        bias = self._bias(win, x.device).to(qkv.dtype)  # [H, Nw, Nw]
        allowed = self._mask(padded, (t, h, w), win, shift, x.device)  # [nWin, Nw, Nw]
        mask = bias[None].masked_fill(~allowed[:, None], float("-inf"))  # [nWin, H, Nw, Nw]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask[None])  # [B, nWin, H, Nw, hd]
        out = self.proj(out.transpose(2, 3).reshape(b, nwin, nw, d))  # [B, nWin, Nw, D]
        wt, wh, ww = win
        tp, hp, wp = padded
        out = out.view(b, tp // wt, hp // wh, wp // ww, wt, wh, ww, d).permute(0, 1, 4, 2, 5, 3, 6, 7)
        out = out.reshape(b, tp, hp, wp, d)
        if any(shift):
            out = torch.roll(out, shifts=shift, dims=(1, 2, 3))
        return out[:, :t, :h, :w].reshape(b, t, h * w, d), grid


def _pool_layer(kind: str, channels: int, stride: tuple[int, int, int]) -> nn.Module:
    """A 3D pool with an odd kernel (stride, or stride + 1 when even) and 'same' padding: each axis -> ceil(n / s)."""
    kernel = tuple(s + (s % 2 == 0) if s > 1 else 1 for s in stride)
    padding = tuple(k // 2 for k in kernel)
    if kind == "conv":  # depthwise, as MViT
        return nn.Conv3d(channels, channels, kernel, stride=stride, padding=padding, groups=channels, bias=False)
    if kind == "max":
        return nn.MaxPool3d(kernel, stride=stride, padding=padding)
    return nn.AvgPool3d(kernel, stride=stride, padding=padding, count_include_pad=False)


class PoolingAttention(TokenMixer):
    """MViT's multi-head pooling attention: keys and values are pooled over the (t, h, w) grid per head (depthwise
    Conv3d, max or avg pooling, then LayerNorm) before attention, so each query attends to L / prod(kv_stride)
    keys. With `q_stride` the queries are pooled too: the output grid shrinks and the residual path is max-pooled
    to match (a stage transition in MViT; the width stays constant here)."""

    def __init__(self, dim: int, heads: int, kv_stride: tuple[int, int, int], kind: str = "conv",
                 q_stride: tuple[int, int, int] | None = None, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads, self.kv_stride, self.q_stride = heads, tuple(kv_stride), tuple(q_stride) if q_stride else None
        hd = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.pool_k, self.pool_v = _pool_layer(kind, hd, self.kv_stride), _pool_layer(kind, hd, self.kv_stride)
        self.norm_k, self.norm_v = nn.LayerNorm(hd), nn.LayerNorm(hd)
        if self.q_stride:
            self.pool_q, self.norm_q = _pool_layer(kind, hd, self.q_stride), nn.LayerNorm(hd)
            self.pool_skip = _pool_layer("max", dim, self.q_stride)

    @staticmethod
    def _pool(x: torch.Tensor, grid: tuple[int, int, int], pool: nn.Module) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B, H, L, c] on grid (t, h, w) -> [B, H, L', c] on the pooled grid."""
        b, heads, _, c = x.shape
        y = pool(x.reshape(b * heads, *grid, c).permute(0, 4, 1, 2, 3))  # [B*H, c, t', h', w']
        new = tuple(y.shape[2:])
        return y.flatten(2).transpose(1, 2).reshape(b, heads, -1, c), new  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        b, t, n, d = x.shape  # [B, T, N, D]
        grid = _require_grid(grid, n, "pooling")
        qkv = self.qkv(x.reshape(b, t * n, d)).view(b, t * n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, L, hd]
        k = self.norm_k(self._pool(k, grid, self.pool_k)[0])  # [B, H, L_kv, hd]
        v = self.norm_v(self._pool(v, grid, self.pool_v)[0])
        out_grid = grid
        if self.q_stride:
            q, out_grid = self._pool(q, grid, self.pool_q)
            q = self.norm_q(q)  # [B, H, L_q, hd]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, L_q, hd]
        out = self.proj(out.transpose(1, 2).reshape(b, -1, d))  # [B, L_q, D]
        ot, oh, ow = out_grid
        return out.view(b, ot, oh * ow, d), out_grid

    def residual(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        if not self.q_stride:
            return x
        b, t, n, d = x.shape
        t, h, w = _require_grid(grid, n, "pooling")
        y = self.pool_skip(x.view(b, t, h, w, d).permute(0, 4, 1, 2, 3))  # [B, D, t', h', w']
        expect = tuple(pooled(g, s) for g, s in zip((t, h, w), self.q_stride))
        assert tuple(y.shape[2:]) == expect, (y.shape, expect)
        return y.flatten(3).permute(0, 2, 3, 1)  # [B, t', h'*w', D]
