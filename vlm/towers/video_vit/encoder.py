"""VideoViT: tubelet embedding + positions + the block stack of one attention mode (the model behind the tower and
behind VideoMAE pretraining), with save/load of an encoder folder."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.weights import atomic_dir, load_module, save_tensors
from vlm.towers.video_vit.attention import Grid
from vlm.towers.video_vit.blocks import build_blocks
from vlm.towers.video_vit.config import VideoViTConfig
from vlm.towers.video_vit.embed import PositionEmbedding, TubeletEmbed

logger = logging.getLogger(__name__)

ENCODER_FORMAT = "vlm.video_vit/1"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"

# Which VideoMAE masking strategies each mode can run on with the encoder seeing visible tokens only.
MAE_MASKINGS = {
    "joint": ("tube", "random", "frame"),  # any token subset
    "divided": ("tube", "frame"),  # needs a [T_v, N_v] product: the same positions in every kept time step
    "factorized_dot_product": ("tube", "frame"),
    "factorized_encoder": ("tube", "frame"),
    "window": (),  # needs the full spatial grid
    "pooling": (),
}


def init_weights(module: nn.Module) -> None:
    """ViT/MAE initialisation: truncated-normal linears (std 0.02), xavier tubelet projection, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv3d) and m.groups == 1:
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class VideoViT(nn.Module):
    """The encoder: pixels [B, T, 3, H, W] -> tokens [B, T', N, D] after any number of blocks.

    `hidden(pixels, num_blocks)` is the residual stream after the first `num_blocks` blocks (0 = embeddings):
    what the tower taps. `encode_visible` runs every block on a subset of tokens and applies the final
    LayerNorm: what VideoMAE's decoder reads.

    factorized_encoder (ViViT model 2): the first `num_spatial_blocks` blocks attend within each time step; the
    frame token of each time step is the mean of its spatial tokens (ViViT uses a CLS token; the mean carries the
    same time embedding, which every input token received); the temporal blocks run on the T' frame tokens.
    The token output keeps the spatial tokens: after temporal block k the tokens are
    `spatial tokens + (frame token_k - frame token_0)`, i.e. each spatial token receives its frame's temporal
    context, so the grid stays (T', h, w) like every other mode, and the mean over a frame's tokens is exactly the
    temporal encoder's frame output.
    """

    def __init__(self, config: VideoViTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = TubeletEmbed(config.width, config.patch_size, config.tubelet)
        self.pos = PositionEmbedding(config.pos_embed, config.native_grid, config.width)
        self.blocks = build_blocks(config)
        self.norm: nn.Module = nn.LayerNorm(config.width)
        init_weights(self)

    # ---------------------------------------------------------------- pieces
    def grid_for(self, num_frames: int, height: int, width: int, num_blocks: int | None = None) -> tuple[int, int, int]:
        """Token grid (T', h, w) after `num_blocks` blocks (default all) for T frames of height x width pixels."""
        p, tub = self.config.patch_size, self.config.tubelet
        if height % p or width % p:
            raise ValueError(f"video_vit: frames {height}x{width} are not a multiple of the patch size {p}")
        grid = (-(-num_frames // tub), height // p, width // p)
        return self.config.grid_after(grid, self.config.depth if num_blocks is None else num_blocks)

    def embed_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B, T, 3, H, W] -> (tokens + positions [B, T', N, D], grid (T', h, w))."""
        x = self.embed(pixels)  # [B, T', h, w, D]
        b, t, h, w, d = x.shape
        pos = self.pos((t, h, w))
        if pos is not None:
            x = x + pos.to(x.dtype)  # [T', h, w, D] broadcast
        return x.reshape(b, t, h * w, d), (t, h, w)

    def run_blocks(self, x: torch.Tensor, grid: Grid, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, Grid]:
        """Blocks start..stop-1 on x [B, T, N, D]; grid None for an unstructured (masked) token set."""
        cfg, stop = self.config, self.config.depth if stop is None else stop
        spatial, z0 = None, None
        for i in range(start, stop):
            block = self.blocks[i]
            if cfg.attention == "factorized_encoder" and i >= cfg.num_spatial_blocks:
                if spatial is None:
                    if i != cfg.num_spatial_blocks:
                        raise ValueError("video_vit: factorized_encoder runs its temporal blocks from the first one")
                    spatial = x  # [B, T, N, D]
                    z0 = z = x.mean(dim=2, keepdim=True)  # frame tokens [B, T, 1, D]
                z, _ = block(z, None)
                x = spatial + (z - z0)
            else:
                x, grid = block(x, grid)
        return x, grid

    def hidden(self, pixels: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
        """The residual stream after `num_blocks` blocks (default all; no final norm): [B, T', N, D]."""
        x, grid = self.embed_tokens(pixels)
        x, _ = self.run_blocks(x, grid, 0, num_blocks)
        return x

    def encode_visible(self, pixels: torch.Tensor, visible: torch.Tensor, layout: tuple[int, int]) -> torch.Tensor:
        """VideoMAE's encoder pass: only the tokens at flat (time-major) indices `visible` [B, L_v] are embedded
        into the blocks; `layout` = (T_v, N_v) with T_v * N_v == L_v says how they form time steps ((1, L_v) for an
        unstructured set). Returns the final-normed tokens [B, L_v, D]."""
        x, grid = self.embed_tokens(pixels)  # [B, T', N, D]
        b, t, n, d = x.shape
        t_v, n_v = layout
        if t_v * n_v != visible.shape[1]:
            raise ValueError(f"video_vit: layout {layout} does not hold {visible.shape[1]} visible tokens")
        x = x.reshape(b, t * n, d).gather(1, visible[..., None].expand(-1, -1, d)).view(b, t_v, n_v, d)
        full = grid if (t_v, n_v) == (t, n) else None
        x, _ = self.run_blocks(x, full)
        return self.norm(x).reshape(b, t_v * n_v, d)  # [B, L_v, D]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """All blocks and the final norm: [B, T', N, D]."""
        return self.norm(self.hidden(pixels))

    def truncate(self, num_blocks: int) -> None:
        """Keep only what `hidden(., num_blocks)` needs: drop the later blocks and the final norm."""
        del self.blocks[num_blocks:]
        self.norm = nn.Identity()


# ---------------------------------------------------------------------------------------------- save / load
def save_encoder(encoder: VideoViT, folder: str | os.PathLike, preprocessor: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write an encoder folder (atomically): config.json (architecture, preprocessing, provenance) and
    model.safetensors. `build_tower("video_vit", checkpoint=folder)` rebuilds it from the folder alone."""
    if len(encoder.blocks) != encoder.config.depth or isinstance(encoder.norm, nn.Identity):
        raise ValueError("save_encoder: the encoder is truncated; save the full encoder")
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        meta = {"format": ENCODER_FORMAT, "encoder": encoder.config.to_dict(), "preprocessor": preprocessor,
                **(extra or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        save_tensors(encoder.state_dict(), tmp / WEIGHTS_FILE)
    logger.info("saved video_vit encoder to %s", folder)
    return folder


def read_encoder_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The encoder folder's config.json (format checked)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a video_vit encoder folder (no {CONFIG_FILE})")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != ENCODER_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {ENCODER_FORMAT!r}")
    return meta


def load_encoder(folder: str | os.PathLike) -> tuple[VideoViT, dict[str, Any]]:
    """(encoder with the saved weights loaded strictly, the folder's config.json)."""
    meta = read_encoder_config(folder)
    encoder = VideoViT(VideoViTConfig.from_dict(meta["encoder"]))
    load_module(encoder, Path(folder) / WEIGHTS_FILE, f"video_vit encoder ({folder})")
    return encoder, meta
