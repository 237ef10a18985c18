"""Eval-path preprocessing in torch only: uint8 frames [.., H, W, 3] -> normalised pixels [.., 3, S, S].

No torchvision, no PIL, no randomness: train-time augmentation lives in the training data pipeline.
Resizing is bilinear with antialias on uint8 (torch's fast path; it matches a float resize within one
grey level and is what image processors do on PIL images), then the result is normalised in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from vlm.video.clip import Clip

MODES = ("resize_crop", "squash", "pad")

# Frames resized per interpolate call: bounds peak memory on long, large clips.
_CHUNK = 32


def _as_tuple3(name: str, value: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"VideoPreprocessor: {name} must have 3 values (R, G, B), got {value!r}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class VideoPreprocessor:
    """Resize, crop/pad and normalise RGB frames for a vision tower.

    size: output size, an int (square) or (height, width).
    mean, std: per-channel normalisation in [0, 1] pixel units: out = (pixel / 255 - mean) / std.
    mode:
      - "resize_crop": shortest edge to size (the image covers the output), then center crop (CLIP's).
      - "squash": resize to size ignoring the aspect ratio (SigLIP's).
      - "pad": fit the whole frame inside size keeping the aspect ratio and fill the border with the mean
        colour (LLaVA's pad-to-square; here the frame is resized first and then padded, so the border
        normalises to exactly 0 and fewer pixels are resized).
    """

    size: int | tuple[int, int] = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    mode: str = "resize_crop"

    def __post_init__(self) -> None:
        size = self.size
        if isinstance(size, (list, tuple)):
            if len(size) != 2:
                raise ValueError(f"VideoPreprocessor: size must be an int or (height, width), got {size!r}")
            size = (int(size[0]), int(size[1]))
            if size[0] == size[1]:
                size = size[0]
        else:
            size = int(size)
        hw = (size, size) if isinstance(size, int) else size
        if min(hw) <= 0:
            raise ValueError(f"VideoPreprocessor: size must be positive, got {self.size!r}")
        if self.mode not in MODES:
            raise ValueError(f"VideoPreprocessor: mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        std = _as_tuple3("std", self.std)
        if min(std) <= 0:
            raise ValueError(f"VideoPreprocessor: std must be positive, got {std}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", _as_tuple3("mean", self.mean))
        object.__setattr__(self, "std", std)

    @property
    def hw(self) -> tuple[int, int]:
        """Output (height, width)."""
        return (self.size, self.size) if isinstance(self.size, int) else self.size  # type: ignore[return-value]

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (saved configs, feature-cache keys)."""
        size = self.size if isinstance(self.size, int) else list(self.size)
        return {"size": size, "mean": list(self.mean), "std": list(self.std), "mode": self.mode}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VideoPreprocessor":
        unknown = set(data) - {"size", "mean", "std", "mode"}
        if unknown:
            raise ValueError(f"VideoPreprocessor.from_dict: unknown keys {sorted(unknown)}")
        return cls(**data)

    # ---------------------------------------------------------------- processing
    def __call__(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> float32 [T, 3, S_h, S_w]; uint8 [B, T, H, W, 3] -> [B, T, 3, S_h, S_w]."""
        x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"VideoPreprocessor: expected a numpy array or tensor, got {type(frames).__name__}")
        if x.dtype != torch.uint8:
            raise TypeError(f"VideoPreprocessor: expected uint8 RGB frames, got dtype {x.dtype}")
        if x.dim() not in (4, 5) or x.shape[-1] != 3:
            raise ValueError(
                f"VideoPreprocessor: expected frames [T, H, W, 3] or [B, T, H, W, 3], got {tuple(x.shape)}"
            )
        lead = tuple(x.shape[:-3])  # (T,) or (B, T)
        flat = x.reshape(-1, *x.shape[-3:])  # [N, H, W, 3]
        if flat.shape[0] == 0:
            raise ValueError("VideoPreprocessor: no frames")
        out = torch.cat([self._process(flat[i : i + _CHUNK]) for i in range(0, flat.shape[0], _CHUNK)])
        return out.reshape(*lead, *out.shape[1:])  # [T, 3, S_h, S_w] or [B, T, 3, S_h, S_w]

    def clip(self, clip: Clip | np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A decoded clip (or bare uint8 frames [T, H, W, 3]) -> (pixel_values float32 [T, 3, S_h, S_w], timestamps
        float32 [T] in seconds; zeros for bare frames). The one clip-to-pixels step of training, eval and chat."""
        if isinstance(clip, (np.ndarray, torch.Tensor)):
            pixel_values = self(clip)
            return pixel_values, torch.zeros(pixel_values.shape[0])
        return self(clip.frames), torch.as_tensor(np.asarray(clip.timestamps), dtype=torch.float32)

    def batch(self, clips: Sequence["Clip"]) -> torch.Tensor:
        """Preprocess clips (each `.frames` uint8 [T, H, W, 3]; sizes may differ) -> [B, T, 3, S_h, S_w]."""
        if len(clips) == 0:
            raise ValueError("VideoPreprocessor.batch: no clips")
        first = clips[0]
        t0 = int(first.frames.shape[0])
        for clip in clips[1:]:
            t = int(clip.frames.shape[0])
            if t != t0:
                raise ValueError(
                    f"VideoPreprocessor.batch: clip {getattr(clip, 'source', '?')} has {t} frames but "
                    f"clip {getattr(first, 'source', '?')} has {t0}; sample the same number of frames per clip"
                )
        return torch.stack([self(clip.frames) for clip in clips])  # [B, T, 3, S_h, S_w]

    def _process(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> float32 [N, 3, S_h, S_w]."""
        x = frames.permute(0, 3, 1, 2)  # [N, 3, H, W] view, channels-last in memory (uint8 fast path)
        h, w = x.shape[-2:]
        th, tw = self.hw
        if self.mode == "squash":
            x = _resize(x, th, tw)
            return self._normalize(x)
        if self.mode == "resize_crop":
            scale = max(th / h, tw / w)  # the resized frame covers the output
            nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
            x = _resize(x, nh, nw)
            top, left = (nh - th) // 2, (nw - tw) // 2
            return self._normalize(x[:, :, top : top + th, left : left + tw])
        # pad: the resized frame fits inside the output; the border is the mean colour (0 after normalising)
        scale = min(th / h, tw / w)
        nh, nw = min(th, max(1, round(h * scale))), min(tw, max(1, round(w * scale)))
        x = self._normalize(_resize(x, nh, nw))  # [N, 3, nh, nw]
        if (nh, nw) == (th, tw):
            return x
        out = x.new_zeros(x.shape[0], 3, th, tw)
        top, left = (th - nh) // 2, (tw - nw) // 2
        out[:, :, top : top + nh, left : left + nw] = x
        return out

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, h, w] -> float32 (x / 255 - mean) / std, contiguous."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        scale = 1.0 / (255.0 * std)
        return (x.to(torch.float32) * scale - mean / std).contiguous(memory_format=torch.contiguous_format)


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear antialiased resize of uint8 [N, 3, H, W] (no-op when the size already matches)."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
