"""The `video_vit` tower: a VideoViT (random init, or a saved encoder such as VideoMAE's) behind the tower API."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from vlm.towers.base import VisionTower, register_tower
from vlm.towers.common import IMAGENET_MEAN, IMAGENET_STD, resolve_dtype, resolve_layer
from vlm.towers.video_vit.config import VideoViTConfig
from vlm.towers.video_vit.encoder import VideoViT, load_encoder
from vlm.video.transforms import VideoPreprocessor

logger = logging.getLogger(__name__)

# Keys that describe preprocessing or the clip length, not weights: a checkpointed tower may change them.
_FREE_WITH_CHECKPOINT = ("image_size", "num_frames")


@register_tower("video_vit")
class VideoViTTower(VisionTower):
    """Our video transformer: [B, T, 3, H, W] -> [B, ceil(T / tubelet), h', w' tokens, width].

    Architecture kwargs (`**arch`, None = default): the fields of VideoViTConfig (depth, width, heads, attention, ...).
    checkpoint: a folder written by `save_encoder` (e.g. VideoMAE pretraining's `runs/videomae/encoder`): the
      architecture and preprocessing come from its config.json and its weights are loaded strictly; architecture
      kwargs given as well must agree with it, except image_size (the preprocessing size; positions are
      interpolated) and num_frames (informational: any clip length works).
    layer: which residual-stream state to emit, indexing [embeddings, block 1, ..., block depth]; -2 (default,
      as LLaVA) is the penultimate block. With `truncate` the blocks after it are not kept.
    Any number of frames and any frame size that is a multiple of the patch size work: the position tables are
    interpolated to the token grid; a clip whose length is not a multiple of the tubelet repeats its last frame.
    """

    lora_targets = ("qkv",)

    def __init__(
        self,
        layer: int = -2,
        checkpoint: str | os.PathLike | None = None,
        truncate: bool = True,
        dtype: str | torch.dtype | None = "float32",
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        preprocess_mode: str | None = None,
        **arch: Any,
    ) -> None:
        super().__init__()
        given = {k: v for k, v in arch.items() if v is not None}
        saved_pre: dict[str, Any] | None = None
        self.loaded_from_checkpoint = False
        if checkpoint is not None:
            self.encoder, meta = load_encoder(checkpoint)
            saved_pre = meta.get("preprocessor")
            cfg = self.encoder.config
            saved = cfg.to_dict()
            probe = VideoViTConfig.from_dict({**saved, **given}).to_dict()  # normalises tuples / validates keys
            clash = [k for k in given if k not in _FREE_WITH_CHECKPOINT and probe[k] != saved[k]]
            if clash:
                raise ValueError(f"video_vit: checkpoint {checkpoint} has {', '.join(f'{k}={saved[k]!r}' for k in clash)}"
                                 f" but the tower was given {', '.join(f'{k}={given[k]!r}' for k in clash)}")
            self.loaded_from_checkpoint = True
            self.checkpoint = str(checkpoint)
            logger.info("video_vit: loaded encoder from %s (%s, depth %d, width %d)", checkpoint, cfg.attention,
                        cfg.depth, cfg.width)
        else:
            self.encoder = VideoViT(VideoViTConfig.from_dict(given))
            cfg = self.encoder.config
        self.config = cfg
        self.layer = layer
        self.layer_index = resolve_layer(layer, cfg.depth, "video_vit")
        if truncate:
            self.encoder.truncate(self.layer_index)
        self.encoder.to(resolve_dtype(dtype))
        self.hidden_size = cfg.width
        self.temporal_patch = cfg.tubelet
        self.patch_size = cfg.patch_size
        self.num_frames = int(given.get("num_frames", cfg.num_frames))
        pre = dict(saved_pre or {"size": cfg.image_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                                 "mode": "resize_crop"})
        for key, value in (("size", given.get("image_size")), ("mean", mean), ("std", std), ("mode", preprocess_mode)):
            if value is not None:
                pre[key] = value
        self.preprocessor = VideoPreprocessor.from_dict(pre)

    def grid_for(self, num_frames: int, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        h, w = height or self.preprocessor.hw[0], width or self.preprocessor.hw[1]
        return self.encoder.grid_for(num_frames, h, w, self.layer_index)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder.hidden(pixel_values, self.layer_index)  # [B, T', N, D]

    def extra_repr(self) -> str:
        c = self.config
        src = f", checkpoint={self.checkpoint}" if self.loaded_from_checkpoint else ""
        return (f"attention={c.attention}, depth={c.depth}, width={c.width}, heads={c.heads}, "
                f"tubelet={c.tubelet}x{c.patch_size}x{c.patch_size}, layer={self.layer} (tap {self.layer_index}){src}")
