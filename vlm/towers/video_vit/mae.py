"""VideoMAE (Tong et al. 2022): masked-tubelet autoencoding to pretrain a `video_vit` encoder.

    model = VideoMAE(VideoViT(VideoViTConfig(...)), MAEConfig(mask_ratio=0.9, masking="tube"))
    out = model(pixels)            # pixels [B, T, 3, H, W] -> out.loss (MSE on the masked tubelets)

- Masking on the token grid (T', h, w), ratio = floor(mask_ratio * count) / count exactly:
  'tube'   one spatial mask per clip, shared by every time step (VideoMAE's default: a masked position stays
           masked in all frames, so it cannot be copied from a neighbouring frame);
  'random' each of the T' * h * w tokens independently (a fixed number per clip);
  'frame'  whole time steps masked (at least one is kept).
- The encoder sees the visible tokens only (a 90% mask leaves 10% of the tokens: the encoder's cost drops ~10x).
- The decoder (default 4 blocks at half the encoder width, joint attention) receives the projected visible
  tokens scattered back in place, a shared learned mask token everywhere else, plus its own learned positions,
  and predicts the pixels of every masked tubelet.
- Target: each masked tubelet's pixels, normalised per patch and per channel by their own mean and std
  (VideoMAE's norm_pix_loss). The normalisation removes any per-channel affine transform of the input, so it is
  computed on the tower-normalised pixels directly. Loss: MSE over the masked tubelets only.

Pretraining (recipe, data, the shared training loop) is `vlm.train.pretrain` (`vlm pretrain RECIPE`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vlm.towers.video_vit.attention import MultiHeadAttention
from vlm.towers.video_vit.blocks import Block
from vlm.towers.video_vit.config import VideoViTConfig
from vlm.towers.video_vit.embed import PositionEmbedding, pad_frames
from vlm.towers.video_vit.encoder import MAE_MASKINGS, VideoViT, init_weights

MASKINGS = ("tube", "random", "frame")


@dataclass
class MAEConfig:
    mask_ratio: float = 0.9
    masking: str = "tube"  # tube | random | frame
    decoder_depth: int = 4
    decoder_width: int | None = None  # default: half the encoder width
    decoder_heads: int | None = None  # default: half the encoder heads (same head width)
    norm_pix: bool = True  # normalise each target patch by its own mean / std

    def __post_init__(self) -> None:
        if self.masking not in MASKINGS:
            raise ValueError(f"videomae: masking must be one of {', '.join(MASKINGS)}; got {self.masking!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"videomae: mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.decoder_depth < 1:
            raise ValueError(f"videomae: decoder_depth must be >= 1, got {self.decoder_depth}")


class Mask(NamedTuple):
    visible: torch.Tensor  # [B, L_v] flat (time-major) token indices, ascending
    masked: torch.Tensor  # [B, L] bool, True = masked (to be reconstructed)
    layout: tuple[int, int]  # (T_v, N_v): how the visible tokens form time steps; (1, L_v) when unstructured


def num_masked(ratio: float, count: int) -> int:
    """floor(ratio * count), keeping at least one token visible."""
    return min(int(ratio * count + 1e-6), count - 1)


def make_mask(batch: int, grid: tuple[int, int, int], ratio: float, strategy: str,
              generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Mask:
    """Draw one mask per clip for a token grid (T', h, w) (see the module docstring for the strategies)."""
    t, h, w = grid
    n = h * w

    def keep(count: int, size: int) -> torch.Tensor:  # [B, size - masked] sorted random subsets of range(size)
        scores = torch.rand(batch, size, generator=generator)
        return scores.argsort(dim=1)[:, : size - count].sort(dim=1).values

    if strategy == "tube":
        pos = keep(num_masked(ratio, n), n)  # [B, N_v], the same positions in every time step
        visible = (torch.arange(t)[None, :, None] * n + pos[:, None, :]).reshape(batch, -1)  # [B, T * N_v]
        layout = (t, pos.shape[1])
    elif strategy == "frame":
        steps = keep(num_masked(ratio, t), t)  # [B, T_v]
        visible = (steps[:, :, None] * n + torch.arange(n)[None, None, :]).reshape(batch, -1)  # [B, T_v * N]
        layout = (steps.shape[1], n)
    elif strategy == "random":
        visible = keep(num_masked(ratio, t * n), t * n)  # [B, L_v]
        layout = (1, visible.shape[1])
    else:
        raise ValueError(f"videomae: masking must be one of {', '.join(MASKINGS)}; got {strategy!r}")
    masked = torch.ones(batch, t * n, dtype=torch.bool)
    masked.scatter_(1, visible, False)
    return Mask(visible.to(device), masked.to(device), layout)


def patchify(pixels: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """[B, T, C, H, W] -> tubelets [B, L, tubelet * patch * patch, C] in the encoder's (time-major) token order."""
    x = pad_frames(pixels, tubelet)
    b, t, c, h, w = x.shape
    x = x.view(b, t // tubelet, tubelet, c, h // patch, patch, w // patch, patch)
    x = x.permute(0, 1, 4, 6, 2, 5, 7, 3)  # [B, T', h, w, tubelet, p, p, C]
    return x.reshape(b, (t // tubelet) * (h // patch) * (w // patch), tubelet * patch * patch, c)


def reconstruction_targets(pixels: torch.Tensor, tubelet: int, patch: int, norm_pix: bool = True) -> torch.Tensor:
    """[B, T, C, H, W] -> [B, L, tubelet * p * p * C] targets, each patch normalised per channel if `norm_pix`."""
    x = patchify(pixels.float(), tubelet, patch)  # [B, L, P, C]
    if norm_pix:
        x = (x - x.mean(dim=2, keepdim=True)) / (x.var(dim=2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    return x.flatten(2)


class MAEOutput(NamedTuple):
    loss: torch.Tensor  # scalar
    pred: torch.Tensor  # [B, L_m, P] predictions for the masked tubelets
    target: torch.Tensor  # [B, L_m, P]
    mask: Mask


class MAEDecoder(nn.Module):
    """Visible encoder tokens + mask tokens -> pixel predictions for the masked tubelets."""

    def __init__(self, enc_width: int, width: int, depth: int, heads: int, grid: tuple[int, int, int],
                 out_dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.proj = nn.Linear(enc_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.pos = PositionEmbedding("factorized", grid, width)
        self.blocks = nn.ModuleList(Block(width, mlp_ratio, MultiHeadAttention(width, heads)) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(self, visible_tokens: torch.Tensor, mask: Mask, grid: tuple[int, int, int]) -> torch.Tensor:
        b, l_v, _ = visible_tokens.shape  # [B, L_v, D_enc]
        y = self.proj(visible_tokens)  # [B, L_v, D]
        d, length = y.shape[-1], mask.masked.shape[1]
        x = self.mask_token.to(y.dtype).expand(b, length, d)
        x = x.scatter(1, mask.visible[..., None].expand(-1, -1, d), y)  # [B, L, D]
        x = x + self.pos(grid).reshape(1, length, d).to(x.dtype)
        x = x.view(b, 1, length, d)
        for block in self.blocks:
            x, _ = block(x, None)
        x = x.view(b, length, d)[mask.masked].view(b, -1, d)  # [B, L_m, D]
        return self.head(self.norm(x))  # [B, L_m, P]


class VideoMAE(nn.Module):
    """Encoder (a VideoViT, the part that is kept) + decoder; forward(pixels) -> MAEOutput."""

    def __init__(self, encoder: VideoViT, config: MAEConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or MAEConfig()
        ecfg = encoder.config
        self.check(ecfg, cfg)
        self.encoder = encoder
        width = cfg.decoder_width or max(1, ecfg.width // 2)
        heads = cfg.decoder_heads or max(1, ecfg.heads // 2)
        if width % heads:
            raise ValueError(f"videomae: decoder width {width} is not divisible by its heads {heads}")
        out_dim = ecfg.tubelet * ecfg.patch_size ** 2 * 3
        self.decoder = MAEDecoder(ecfg.width, width, cfg.decoder_depth, heads, ecfg.native_grid, out_dim,
                                  ecfg.mlp_ratio)
        init_weights(self.decoder)

    @staticmethod
    def check(encoder: VideoViTConfig, config: MAEConfig) -> None:
        """Raise ValueError when the encoder's attention cannot run on the visible tokens of the masking."""
        allowed = MAE_MASKINGS[encoder.attention]
        if config.masking not in allowed:
            raise ValueError(
                f"videomae: attention '{encoder.attention}' cannot run on the visible tokens of '{config.masking}' "
                "masking " + (f"(it can with {', '.join(allowed)})" if allowed else
                              "(it needs the full token grid; pretrain a 'joint' encoder, as VideoMAE does)"))

    def forward(self, pixels: torch.Tensor, mask: Mask | None = None,
                generator: torch.Generator | None = None) -> MAEOutput:
        b, t, _, h, w = pixels.shape  # [B, T, 3, H, W]
        grid = self.encoder.grid_for(t, h, w, 0)
        if mask is None:
            mask = make_mask(b, grid, self.config.mask_ratio, self.config.masking, generator, pixels.device)
        tokens = self.encoder.encode_visible(pixels, mask.visible, mask.layout)  # [B, L_v, D]
        pred = self.decoder(tokens, mask, grid)  # [B, L_m, P]
        ecfg = self.encoder.config
        target = reconstruction_targets(pixels, ecfg.tubelet, ecfg.patch_size, self.config.norm_pix)  # [B, L, P]
        target = target[mask.masked].view(b, -1, target.shape[-1])  # [B, L_m, P]
        loss = F.mse_loss(pred.float(), target)
        return MAEOutput(loss, pred, target, mask)
