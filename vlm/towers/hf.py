"""Transformers-backed towers: CLIP and SigLIP (per-frame ViTs) and VideoMAE (tubelet ViT).

Each tower is built either from a checkpoint (`model=`: a local folder or hub id, loaded with `from_pretrained`,
never with remote code, and preprocessed as its (video_)preprocessor_config.json says) or from a config dict
(`config=`: random weights, used by tests); layers are tapped as `vlm/towers/common.py` says (-2, the
penultimate, by default).
With `truncate=True` (the default) the tower keeps only what its output depends on: the encoder layers after the
tap are deleted at load time (and `num_hidden_layers` in the kept config is lowered to match; a layer-0 tap keeps
one layer, since transformers records hidden states through layer hooks), and so are the parts that only feed the
pooled output (CLIP's and SigLIP's `post_layernorm`, SigLIP's attention-pool head, VideoMAE's final layernorm).
That saves their compute and makes every parameter of the tower reach its output, which DDP needs when the tower
is trained.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlm.towers.base import VisionTower, register_tower
from vlm.towers.common import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, resolve_dtype, resolve_layer
from vlm.video.transforms import MODES, VideoPreprocessor

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)
_PREPROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")


def _read_preprocessor_config(model: str) -> dict[str, Any] | None:
    """The checkpoint's (video_)preprocessor_config.json as a dict, or None when it has none."""
    for name in _PREPROCESSOR_FILES:
        path: str | None = None
        if os.path.isdir(model):
            candidate = os.path.join(model, name)
            path = candidate if os.path.isfile(candidate) else None
        else:
            try:
                from transformers.utils import cached_file

                path = cached_file(
                    model,
                    name,
                    _raise_exceptions_for_missing_entries=False,
                    _raise_exceptions_for_connection_errors=False,
                )
            except Exception as exc:  # a hub id that cannot be reached: the model load reports it
                logger.debug("no %s for %s: %s", name, model, exc)
        if path:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    return None


def _size_from_hf(value: Any) -> int | tuple[int, int] | None:
    """HF size dicts ({"shortest_edge": n} / {"height": h, "width": w}) or ints -> our size."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
    return None


def preprocessor_for(
    model: str | None,
    default: VideoPreprocessor,
    image_size: int | None,
    mode: str | None,
) -> VideoPreprocessor:
    """The tower's preprocessor: the checkpoint's preprocessor config when present, else `default`;
    `image_size` and `mode` override either."""
    pre = default
    hf = _read_preprocessor_config(model) if model is not None else None
    if hf is not None:
        mean = tuple(hf.get("image_mean", pre.mean))
        std = tuple(hf.get("image_std", pre.std))
        if hf.get("do_center_crop", False) and _size_from_hf(hf.get("crop_size")) is not None:
            size, hf_mode = _size_from_hf(hf.get("crop_size")), "resize_crop"
        else:
            size = _size_from_hf(hf.get("size"))
            hf_mode = "squash" if isinstance(size, tuple) else "resize_crop"
        pre = VideoPreprocessor(size=size or pre.size, mean=mean, std=std, mode=hf_mode)  # type: ignore[arg-type]
        logger.info("%s: preprocessing from its preprocessor config: %s", model, pre.to_dict())
    if mode is not None and mode not in MODES:
        raise ValueError(f"preprocess_mode must be one of {', '.join(MODES)}; got {mode!r}")
    return replace(pre, **{k: v for k, v in (("size", image_size), ("mode", mode)) if v is not None})


SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


class _HFTower(VisionTower):
    """A transformers vision model behind the tower API, tapped at `hidden_states[layer_index]`."""

    def _load(self, class_name: str, model: str | os.PathLike | None,
              config: "dict[str, Any] | PretrainedConfig | None", dtype: str | torch.dtype | None, layer: int) -> None:
        """`self.model`: from_pretrained(model) or a random model from a config dict (exactly one of them)."""
        import transformers  # here, not at module import, so `import vlm.towers` stays cheap

        what = type(self).__name__
        model_class = getattr(transformers, class_name)
        config_class = model_class.config_class
        if (model is None) == (config is None):
            raise ValueError(f"{what}: pass exactly one of model= (a folder or hub id) or config= (a config dict)")
        if model is not None:
            logger.info("%s: loading %s", what, model)
            self.model = model_class.from_pretrained(str(model), dtype=resolve_dtype(dtype))  # never remote code
        else:
            if isinstance(config, dict):
                config = dict(config.get("vision_config", config))  # a full CLIP/SigLIP config dict works too
                config.pop("model_type", None)
                config = config_class(**config)
            if not isinstance(config, config_class):
                raise TypeError(f"{what}: config must be a dict or a {config_class.__name__}, "
                                f"got {type(config).__name__}")
            self.model = model_class(config).to(resolve_dtype(dtype))
        self.num_layers = int(self.model.config.num_hidden_layers)
        self.layer = layer
        self.layer_index = resolve_layer(layer, self.num_layers, what)
        self.hidden_size = int(self.model.config.hidden_size)
        self.patch_size = int(self.model.config.patch_size)

    def _keep_layers(self, layers: nn.ModuleList) -> int:
        """Delete the encoder layers after the tap; returns how many are kept."""
        keep = max(self.layer_index, 1)  # transformers records hidden_states from layer hooks: keep >= 1 layer
        del layers[keep:]
        self.model.config.num_hidden_layers = keep
        return keep

    def extra_repr(self) -> str:
        return f"layer={self.layer} (hidden_states[{self.layer_index}] of {self.num_layers})"


# ---------------------------------------------------------------------------------------------- CLIP / SigLIP
class _PerFrameViTTower(_HFTower):
    """A transformers image ViT applied to every frame: [B, T, 3, H, W] -> [B, T, N, D]."""

    model_class: str  # a transformers class name
    has_cls: bool = True
    default_mean: tuple[float, float, float]
    default_std: tuple[float, float, float]
    default_mode: str = "resize_crop"
    lora_targets = ("q_proj", "v_proj")

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        config: "dict[str, Any] | PretrainedConfig | None" = None,
        layer: int = -2,
        select: str = "patch",
        image_size: int | None = None,
        dtype: str | torch.dtype | None = "float32",
        truncate: bool = True,
        preprocess_mode: str | None = None,
    ) -> None:
        super().__init__()
        what = type(self).__name__
        if select not in ("patch", "cls_patch"):
            raise ValueError(f"{what}: select must be 'patch' or 'cls_patch', got {select!r}")
        if select == "cls_patch" and not self.has_cls:
            raise ValueError(f"{what}: this model has no CLS token; use select='patch'")
        self._load(self.model_class, model, config, dtype, layer)
        self.select = select
        self.native_image_size = int(self.model.config.image_size)
        default = VideoPreprocessor(
            size=self.native_image_size, mean=self.default_mean, std=self.default_std, mode=self.default_mode
        )
        self.preprocessor = preprocessor_for(
            str(model) if model is not None else None, default, image_size, preprocess_mode
        )
        if truncate:
            self._truncate()

    def _truncate(self) -> None:
        """Drop the encoder layers after the tap and the pooled-output-only modules."""
        keep = self._keep_layers(self.model.encoder.layers)
        if isinstance(getattr(self.model, "post_layernorm", None), nn.Module):
            self.model.post_layernorm = nn.Identity()
        self.tap_is_last = self.layer_index == keep  # then last_hidden_state is the tap: keep no other layer outputs

    def grid_for(self, num_frames: int, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        h_px, w_px = self.preprocessor.hw
        height, width = height or h_px, width or w_px
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"{type(self).__name__}: frames {height}x{width} are not a multiple of the patch size {self.patch_size}"
            )
        h, w = height // self.patch_size, width // self.patch_size
        if self.select == "cls_patch":
            return (num_frames, 1, 1 + h * w)  # CLS + patches: an unstructured token set
        return (num_frames, h, w)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, t, c, height, width = pixel_values.shape  # [B, T, 3, H, W]
        x = pixel_values.reshape(b * t, c, height, width).to(self.model.dtype)  # [B*T, 3, H, W]
        interpolate = (height, width) != (self.native_image_size, self.native_image_size)
        last = getattr(self, "tap_is_last", False)
        out = self.model(pixel_values=x, output_hidden_states=not last, interpolate_pos_encoding=interpolate)
        hidden = out.last_hidden_state if last else out.hidden_states[self.layer_index]  # [B*T, (1 +) h*w, D]
        if self.has_cls and self.select == "patch":
            hidden = hidden[:, 1:]  # drop CLS
        return hidden.reshape(b, t, hidden.shape[1], hidden.shape[2])  # [B, T, N, D]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, select={self.select}"


@register_tower("clip")
class CLIPTower(_PerFrameViTTower):
    """CLIP ViT (transformers `CLIPVisionModel`) per frame; CLS dropped unless select='cls_patch'.

    A full `CLIPModel` checkpoint (e.g. openai/clip-vit-large-patch14-336) loads too: its text tower is ignored.
    """

    model_class = "CLIPVisionModel"
    default_mean = CLIP_MEAN
    default_std = CLIP_STD


@register_tower("siglip")
class SigLIPTower(_PerFrameViTTower):
    """SigLIP ViT (transformers `SiglipVisionModel`) per frame; no CLS token; squash-resized as its processor."""

    model_class = "SiglipVisionModel"
    has_cls = False
    default_mean = SIGLIP_MEAN
    default_std = SIGLIP_STD
    default_mode = "squash"

    def _truncate(self) -> None:
        super()._truncate()
        if getattr(self.model, "use_head", False):  # attention-pool head: feeds only pooler_output
            self.model.use_head = False
            del self.model.head
            self.model.config.vision_use_head = False


# ---------------------------------------------------------------------------------------------- VideoMAE
def sinusoid_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The fixed sin/cos table of VideoMAE evaluated at (possibly fractional) positions: [P] -> [1, P, dim]."""
    j = torch.arange(dim, dtype=torch.float64)
    angles = positions.to(torch.float64)[:, None] / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.to(torch.float32).unsqueeze(0)  # [1, P, dim]


@register_tower("videomae")
class VideoMAETower(_HFTower):
    """VideoMAE (transformers `VideoMAEModel`): tubelets of `tubelet_size` frames -> [B, T / 2, h*w, D].

    VideoMAE adds a fixed sin/cos position table over the flattened (t, y, x) token index, sized for the
    config's `num_frames`. `num_frames=` builds the tower for another clip length by evaluating that table
    at fractional time steps spread over the same span (so the original length reproduces it exactly);
    the tower then accepts exactly that many frames and says so otherwise.
    """

    lora_targets = ("query", "value")

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        config: "dict[str, Any] | PretrainedConfig | None" = None,
        layer: int = -2,
        num_frames: int | None = None,
        dtype: str | torch.dtype | None = "float32",
        truncate: bool = True,
        preprocess_mode: str | None = None,
    ) -> None:
        super().__init__()
        what = "VideoMAETower"
        self._load("VideoMAEModel", model, config, dtype, layer)
        cfg = self.model.config
        self.temporal_patch = int(cfg.tubelet_size)
        self.image_size = int(cfg.image_size)
        self.native_num_frames = int(cfg.num_frames)
        self.num_frames = int(num_frames or cfg.num_frames)
        if self.num_frames % self.temporal_patch:
            raise ValueError(
                f"{what}: num_frames={self.num_frames} is not a multiple of tubelet_size {self.temporal_patch}"
            )
        if self.num_frames != self.native_num_frames:
            self._set_num_frames(self.num_frames)
        default = VideoPreprocessor(size=self.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, mode="resize_crop")
        self.preprocessor = preprocessor_for(str(model) if model is not None else None, default, None, preprocess_mode)
        if self.preprocessor.hw != (self.image_size, self.image_size):
            raise ValueError(
                f"{what}: preprocessing size {self.preprocessor.hw} differs from the model's {self.image_size}"
            )
        if truncate:
            self._keep_layers(self.model.encoder.layer)
            if isinstance(getattr(self.model, "layernorm", None), nn.Module):
                self.model.layernorm = None  # the model skips a None final norm (use_mean_pooling checkpoints)

    def _set_num_frames(self, num_frames: int) -> None:
        """Re-evaluate the position table for `num_frames` frames over the checkpoint's time span."""
        hw = (self.image_size // self.patch_size) ** 2
        t_native = self.native_num_frames // self.temporal_patch
        t_new = num_frames // self.temporal_patch
        if t_new > 1:  # spread over the checkpoint's span [0, t_native - 1]
            steps = torch.linspace(0, t_native - 1, t_new, dtype=torch.float64)
        else:
            steps = torch.zeros(1, dtype=torch.float64)
        positions = (steps[:, None] * hw + torch.arange(hw, dtype=torch.float64)[None, :]).reshape(-1)  # [T' * hw]
        emb = self.model.embeddings
        emb.position_embeddings = sinusoid_positions(positions, self.hidden_size)  # [1, T' * hw, D]
        emb.num_patches = emb.patch_embeddings.num_patches = t_new * hw
        self.model.config.num_frames = num_frames
        logger.info(
            "VideoMAETower: position table re-evaluated for %d frames (checkpoint: %d)", num_frames, self.native_num_frames
        )

    def grid_for(self, num_frames: int, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        height, width = height or self.image_size, width or self.image_size
        if num_frames % self.temporal_patch:
            raise ValueError(
                f"VideoMAETower: {num_frames} frames is not a multiple of the tubelet size {self.temporal_patch}"
            )
        if num_frames != self.num_frames:
            raise ValueError(
                f"VideoMAETower: built for {self.num_frames} frames, got {num_frames}; sample {self.num_frames} "
                f"frames or build the tower with num_frames={num_frames}"
            )
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(f"VideoMAETower: frames must be {self.image_size}x{self.image_size}, got {height}x{width}")
        side = self.image_size // self.patch_size
        return (num_frames // self.temporal_patch, side, side)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, t, c, height, width = pixel_values.shape  # [B, T, 3, H, W]
        tp, h, w = self.grid_for(t, height, width)
        out = self.model(pixel_values=pixel_values.to(self.model.dtype), output_hidden_states=True)
        hidden = out.hidden_states[self.layer_index]  # [B, T' * h * w, D], time-major
        return hidden.reshape(b, tp, h * w, hidden.shape[-1])  # [B, T', N, D]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_frames={self.num_frames}"
