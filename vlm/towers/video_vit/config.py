"""The architecture of a `video_vit` encoder as one JSON-able dataclass (saved next to its weights)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

ATTENTION_MODES = ("joint", "factorized_encoder", "divided", "factorized_dot_product", "window", "pooling")
POS_EMBEDS = ("factorized", "joint", "none")
KV_POOLS = ("conv", "max", "avg")


def _triple(name: str, value: Any) -> tuple[int, int, int]:
    values = (int(value),) * 3 if isinstance(value, (int, float)) else tuple(int(v) for v in value)
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"video_vit: {name} must be 3 positive ints (t, h, w), got {value!r}")
    return values  # type: ignore[return-value]


def pooled(size: int, stride: int) -> int:
    """Tokens along one axis after a stride-`stride` pool (odd kernel, 'same' padding): ceil(size / stride)."""
    return math.ceil(size / stride)


@dataclass
class VideoViTConfig:
    """Architecture of the encoder. Sizes are in pixels / frames; `window`, strides are in tokens (t, h, w).

    attention: joint | factorized_encoder | divided | factorized_dot_product | window | pooling
      (see vlm/towers/video_vit/__init__.py for what each computes and where it comes from).
    pos_embed: factorized (learned time [T0, D] + space [H0, W0, D]), joint (learned [T0, H0, W0, D]) or none;
      either table is resized to the token grid of the input at forward time.
    temporal_depth: factorized_encoder only: how many of the `depth` layers form the temporal encoder
      (default max(1, depth // 4); the other layers are the per-frame spatial encoder).
    window, shift: window only: the 3D window in tokens and whether every second block shifts it by half.
    kv_pool, kv_stride: pooling only: how keys/values are pooled (conv = depthwise Conv3d, max, avg) and the stride.
    q_pool_blocks, q_stride: pooling only: blocks (0-based) that also pool the queries, shrinking the token grid.
    """

    depth: int = 12
    width: int = 768
    heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    tubelet: int = 2
    image_size: int = 224
    num_frames: int = 16
    attention: str = "joint"
    pos_embed: str = "factorized"
    qkv_bias: bool = True
    temporal_depth: int | None = None
    window: tuple[int, int, int] = (2, 7, 7)
    shift: bool = True
    kv_pool: str = "conv"
    kv_stride: tuple[int, int, int] = (1, 2, 2)
    q_pool_blocks: tuple[int, ...] = field(default_factory=tuple)
    q_stride: tuple[int, int, int] = (1, 2, 2)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"video_vit: attention must be one of {', '.join(ATTENTION_MODES)}; got {self.attention!r}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"video_vit: pos_embed must be one of {', '.join(POS_EMBEDS)}; got {self.pos_embed!r}")
        if self.kv_pool not in KV_POOLS:
            raise ValueError(f"video_vit: kv_pool must be one of {', '.join(KV_POOLS)}; got {self.kv_pool!r}")
        for name in ("depth", "width", "heads", "patch_size", "tubelet", "image_size", "num_frames"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"video_vit: {name} must be >= 1, got {getattr(self, name)!r}")
        if self.width % self.heads:
            raise ValueError(f"video_vit: width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"video_vit: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.attention == "factorized_dot_product" and self.heads % 2:
            raise ValueError("video_vit: factorized_dot_product splits the heads in two halves (space, time): "
                             f"heads must be even, got {self.heads}")
        self.window = _triple("window", self.window)
        self.kv_stride = _triple("kv_stride", self.kv_stride)
        self.q_stride = _triple("q_stride", self.q_stride)
        self.q_pool_blocks = tuple(sorted({int(i) for i in self.q_pool_blocks}))
        if any(not 0 <= i < self.depth for i in self.q_pool_blocks):
            raise ValueError(f"video_vit: q_pool_blocks {list(self.q_pool_blocks)} must be block indices 0..{self.depth - 1}")
        if self.q_pool_blocks and self.attention != "pooling":
            raise ValueError("video_vit: q_pool_blocks only applies to attention='pooling'")
        if self.attention == "factorized_encoder":
            td = self.temporal_depth if self.temporal_depth is not None else max(1, self.depth // 4)
            if not 1 <= td < self.depth:
                raise ValueError(f"video_vit: temporal_depth must be in 1..depth-1 ({self.depth - 1}), got {td}")
            self.temporal_depth = int(td)

    # ---------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def native_grid(self) -> tuple[int, int, int]:
        """Token grid (T0, H0, W0) of the position tables: the grid of `num_frames` frames at `image_size`."""
        side = self.image_size // self.patch_size
        return (math.ceil(self.num_frames / self.tubelet), side, side)

    @property
    def num_spatial_blocks(self) -> int:
        """factorized_encoder: layers of the per-frame spatial encoder (the rest are temporal); else depth."""
        return self.depth - int(self.temporal_depth or 0) if self.attention == "factorized_encoder" else self.depth

    def grid_after(self, grid: tuple[int, int, int], num_blocks: int) -> tuple[int, int, int]:
        """The token grid after the first `num_blocks` blocks (query pooling shrinks it)."""
        t, h, w = grid
        for i in self.q_pool_blocks:
            if i < num_blocks:
                st, sh, sw = self.q_stride
                t, h, w = pooled(t, st), pooled(h, sh), pooled(w, sw)
        return (t, h, w)

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("window", "kv_stride", "q_stride", "q_pool_blocks"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VideoViTConfig":
        allowed = {f.name for f in fields(cls)}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"video_vit: unknown architecture key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**data)
