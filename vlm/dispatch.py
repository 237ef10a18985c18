"""A model that does not fit one device: accelerate's big-model inference over a loaded VideoLLM.

    model = VideoLLM.from_pretrained(folder, device_map="auto")                 # spread over the GPUs, then CPU
    model = VideoLLM.from_pretrained(folder, device_map="auto", max_memory={0: "20GiB", "cpu": "60GiB"},
                                     offload_folder="offload")                  # what does not fit goes to disk

The tower and the connector are never split, nor is a decoder layer (the LLM's own `_no_split_modules`); inputs
are placed on the device of the LLM's input embeddings, which must be a real device (not "disk"). accelerate's
hooks move activations between devices as the forward goes, and bring offloaded weights in when needed.
The weights are loaded into CPU memory first, then dispatched.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def no_split_classes(model: nn.Module) -> list[str]:
    """Module classes that must stay on one device: the tower, the connector and the LLM's decoder layers."""
    names = {type(model.tower).__name__, type(model.connector).__name__}  # type: ignore[union-attr]
    for m in model.llm.modules():  # type: ignore[union-attr]  # through a PEFT wrapper to the HF model
        names.update(getattr(m, "_no_split_modules", None) or [])
    return sorted(names)


def dispatch(model: nn.Module, device_map: str | dict[str, Any], dtype: torch.dtype, *,
             max_memory: dict[Any, Any] | None = None, offload_folder: str | None = None) -> nn.Module:
    """`model` (on the CPU) cast to `dtype` and spread by `device_map` ("auto", "balanced", "sequential" or an
    explicit {module name: device}); returns it with accelerate's hooks and `hf_device_map` set."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    model = model.to(dtype=dtype)
    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "sequential"):
            raise ValueError(f"device_map must be 'auto', 'balanced', 'sequential' or a dict, got '{device_map}'")
        no_split = no_split_classes(model)
        if device_map != "sequential" and max_memory is None:
            max_memory = get_balanced_memory(model, dtype=dtype, no_split_module_classes=no_split)
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    embed = _device_of(device_map, _embedding_name(model))
    if embed in ("disk", "meta"):
        raise ValueError(f"device_map puts the LLM's input embeddings on '{embed}'; give the first device more memory "
                         f"(max_memory) so that the tower, connector and embeddings fit on it: {device_map}")
    if any(str(d) == "disk" for d in device_map.values()) and not offload_folder:
        raise ValueError("device_map offloads modules to disk: give offload_folder")
    log.info("device map: %s", device_map)
    model = dispatch_model(model, device_map=device_map, offload_dir=offload_folder)
    model.hf_device_map = device_map
    return model


def _embedding_name(model: nn.Module) -> str:
    table = model.llm.get_input_embeddings()  # type: ignore[union-attr]
    return next(name for name, m in model.named_modules() if m is table)


def _device_of(device_map: dict[str, Any], name: str) -> str:
    """The device the map gives module `name` (its own entry or its closest mapped ancestor's)."""
    parts = name.split(".")
    for k in range(len(parts), -1, -1):
        key = ".".join(parts[:k])
        if key in device_map:
            return str(device_map[key])
    raise ValueError(f"device_map places no ancestor of '{name}'")
