"""OpenCLIP ViTs per frame: an optional extra (`pip install vlm[open_clip]`).

open_clip_torch requires torchvision, and torchvision has no CPU build for the torch this project pins, so
open_clip is never a core dependency: it is imported only when this tower is built. The key is registered
regardless, so recipes can name it and fail with a clear message where it is not installed.

This tower is not exercised by the test suite (no torchvision on the project machines); it relies on
`VisionTransformer.forward_intermediates` / `prune_intermediate_layers` of open_clip >= 2.26.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vlm.towers.base import VisionTower, register_tower
from vlm.towers.common import CLIP_MEAN, CLIP_STD, resolve_dtype, resolve_layer
from vlm.video.transforms import VideoPreprocessor

logger = logging.getLogger(__name__)


def _import_open_clip() -> Any:
    try:
        import open_clip
    except Exception as exc:  # ImportError, or a RuntimeError from a torchvision built for another torch
        raise ImportError(
            "the open_clip tower needs open_clip_torch: pip install 'vlm[open_clip]'. It is an optional extra "
            "because open_clip_torch requires torchvision, which has no CPU build for the pinned torch "
            f"(import failed with {type(exc).__name__}: {exc})"
        ) from exc
    return open_clip


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


@register_tower("open_clip")
class OpenCLIPTower(VisionTower):
    """An OpenCLIP ViT's patch tokens from a hidden layer, per frame: [B, T, 3, H, W] -> [B, T, N, D].

    model: an open_clip architecture name ("ViT-B-16") or "hf-hub:org/name".
    pretrained: an open_clip pretrained tag ("openai", "laion2b_s34b_b88k") or a local checkpoint path.
    layer: hidden_states-style index (1..L are block outputs; -2, the default, is the penultimate block).
    select: "patch" (CLS dropped) or "cls_patch".
    truncate: prune the blocks after the tap and the pooling head/projection.
    """

    lora_targets = ("c_fc", "c_proj")  # the MLP linears; attention is nn.MultiheadAttention (fused in_proj)

    def __init__(
        self,
        model: str = "ViT-B-16",
        pretrained: str | None = None,
        layer: int = -2,
        select: str = "patch",
        dtype: str | torch.dtype | None = "float32",
        truncate: bool = True,
    ) -> None:
        super().__init__()
        open_clip = _import_open_clip()
        if select not in ("patch", "cls_patch"):
            raise ValueError(f"open_clip tower: select must be 'patch' or 'cls_patch', got {select!r}")
        clip_model = open_clip.create_model(model, pretrained=pretrained)
        visual = clip_model.visual
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise ValueError(
                f"open_clip tower: {model} has no ViT trunk with forward_intermediates (needs open_clip >= 2.26)"
            )
        num_layers = len(visual.transformer.resblocks)
        index = resolve_layer(layer, num_layers, "open_clip tower")
        if index == 0:
            raise ValueError("open_clip tower: layer 0 (the embeddings) cannot be tapped; use 1.. or negative layers")
        self.block_index = index - 1  # hidden_states[k] is the output of block k - 1
        self.layer, self.layer_index, self.num_layers, self.select = layer, index, num_layers, select
        if truncate:
            visual.prune_intermediate_layers(indices=[self.block_index], prune_norm=True, prune_head=True)
        self.model = visual.to(resolve_dtype(dtype))
        del clip_model  # the text tower is not kept
        self.hidden_size = int(visual.transformer.width)
        self.patch_size = _pair(visual.patch_size)
        size = _pair(visual.image_size)
        mean = tuple(getattr(visual, "image_mean", None) or CLIP_MEAN)
        std = tuple(getattr(visual, "image_std", None) or CLIP_STD)
        self.preprocessor = VideoPreprocessor(size=size, mean=mean, std=std, mode="resize_crop")  # type: ignore
        logger.info("open_clip tower: %s (%s), tapping block %d of %d", model, pretrained, self.block_index, num_layers)

    def grid_for(self, num_frames: int, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        height, width = height or self.preprocessor.hw[0], width or self.preprocessor.hw[1]
        h, w = height // self.patch_size[0], width // self.patch_size[1]
        return (num_frames, 1, 1 + h * w) if self.select == "cls_patch" else (num_frames, h, w)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, t, c, height, width = pixel_values.shape  # [B, T, 3, H, W]
        x = pixel_values.reshape(b * t, c, height, width).to(next(self.model.parameters()).dtype)
        out = self.model.forward_intermediates(
            x,
            indices=[self.block_index],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=self.select == "cls_patch",
        )
        tokens = out["image_intermediates"][0]  # [B*T, h*w, D]
        if self.select == "cls_patch":
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)  # [B*T, 1 + h*w, D]
        return tokens.reshape(b, t, tokens.shape[1], tokens.shape[2])  # [B, T, N, D]
