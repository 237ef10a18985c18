"""Transformers vision checkpoints for the HF towers: the model (from a checkpoint or a config dict) and the
preprocessing its checkpoint declares.

Models are built either from a checkpoint (`model=`: a local folder or hub id, loaded with `from_pretrained`,
never with remote code) or from a config dict (`config=`: random weights, used by tests).
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from vlm.video.transforms import MODES, VideoPreprocessor

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

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
    if image_size is not None:
        pre = VideoPreprocessor(size=image_size, mean=pre.mean, std=pre.std, mode=pre.mode)
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"preprocess_mode must be one of {', '.join(MODES)}; got {mode!r}")
        pre = VideoPreprocessor(size=pre.size, mean=pre.mean, std=pre.std, mode=mode)
    return pre


def load_hf_model(
    class_name: str,
    model: str | os.PathLike | None,
    config: "dict[str, Any] | PretrainedConfig | None",
    dtype: torch.dtype,
    what: str,
) -> "PreTrainedModel":
    """from_pretrained(model) or a random model from a config dict; exactly one of them.

    transformers is imported here, not at module import, so `import vlm.towers` stays cheap."""
    import transformers

    model_class = getattr(transformers, class_name)
    config_class = model_class.config_class
    if (model is None) == (config is None):
        raise ValueError(f"{what}: pass exactly one of model= (a folder or hub id) or config= (a config dict)")
    if model is not None:
        logger.info("%s: loading %s", what, model)
        return model_class.from_pretrained(str(model), dtype=dtype)  # remote code is never enabled here
    if isinstance(config, dict):
        config = dict(config.get("vision_config", config))  # a full CLIP/SigLIP config dict works too
        config.pop("model_type", None)
        config = config_class(**config)
    if not isinstance(config, config_class):
        raise TypeError(f"{what}: config must be a dict or a {config_class.__name__}, got {type(config).__name__}")
    return model_class(config).to(dtype)
