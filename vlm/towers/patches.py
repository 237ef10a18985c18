"""No vision encoder: every frame cut into p x p patches of raw pixels, each patch one token (Fuyu's way).

Adept's Fuyu-8B (2023) feeds image patches to the LLM through a single linear projection, with no pretrained
vision tower. Here the tower is that linear patch embedding: [B, T, 3, H, W] -> [B, T, (H/p)(W/p), D]. With the
default width D = 3 p^2 it starts as the identity (the tokens are the normalised pixels themselves, row-major
over the patch, channels last), so a frozen `patches` tower hands the connector exactly what the frames hold;
trained (`mode: full` or LoRA on `proj`) it becomes Fuyu's learned patch embedding. A baseline for towers
pretrained elsewhere, and a diagnostic: what a model learns when nothing is lost before the connector.
"""

from __future__ import annotations

import torch
from torch import nn

from vlm.towers.base import VisionTower, register_tower
from vlm.towers.common import CLIP_MEAN, CLIP_STD
from vlm.video.transforms import VideoPreprocessor


@register_tower("patches")
class PatchTower(VisionTower):
    """patch: side of a square patch in pixels; image_size must be a multiple of it. hidden_size: token width
    (default 3 * patch^2, identity-initialised; otherwise an orthogonal random projection)."""

    lora_targets = ("proj",)

    def __init__(self, patch: int = 16, image_size: int = 128, hidden_size: int | None = None,
                 preprocess_mode: str = "squash"):
        super().__init__()
        self.preprocessor = VideoPreprocessor(size=image_size, mean=CLIP_MEAN, std=CLIP_STD, mode=preprocess_mode)
        if any(s % patch for s in self.preprocessor.hw):
            raise ValueError(f"patches tower: image size {self.preprocessor.hw} is not a multiple of patch {patch}")
        self.patch = patch
        width = 3 * patch * patch
        self.hidden_size = int(hidden_size or width)
        self.proj = nn.Linear(width, self.hidden_size)
        with torch.no_grad():
            if self.hidden_size == width:
                self.proj.weight.copy_(torch.eye(width))
            else:
                nn.init.orthogonal_(self.proj.weight)
            self.proj.bias.zero_()

    def grid_for(self, num_frames: int, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        h, w = height or self.preprocessor.hw[0], width or self.preprocessor.hw[1]
        return (num_frames, h // self.patch, w // self.patch)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, t, c, height, width = pixel_values.shape  # [B, T, 3, H, W]
        p, gh, gw = self.patch, height // self.patch, width // self.patch
        x = pixel_values.reshape(b, t, c, gh, p, gw, p).permute(0, 1, 3, 5, 4, 6, 2)  # [B, T, gh, gw, p, p, 3]
        x = x.reshape(b, t, gh * gw, p * p * c).to(self.proj.weight.dtype)  # [B, T, N, 3p^2]
        return self.proj(x)  # [B, T, N, D]
