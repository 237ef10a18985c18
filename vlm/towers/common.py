"""What every tower family resolves the same way: the dtype name (the LLM loaders' too), where a loaded model
runs, the layer tap, and ImageNet / CLIP normalisation.

Layer taps index `hidden_states` as transformers defines it: index 0 is the embedding output, index k the output
of encoder layer k, so a model with L layers has L + 1 entries and -1 is the last layer, -2 the penultimate (the
default, as LLaVA).
"""

from __future__ import annotations

import os

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """"bfloat16" / torch.bfloat16 / None (float32) -> torch.dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16'")
    return resolved


def placement(device: str | torch.device | None = None,
              dtype: str | torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """Where a loaded model runs: `device` None/"auto" -> CUDA when available, else CPU ("cuda" under torchrun:
    the process's own GPU, cuda:LOCAL_RANK); `dtype` None/"auto" -> bfloat16 on CUDA, float32 elsewhere."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else torch.device(device)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:  # one GPU per torchrun process
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if dtype in (None, "auto"):
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, resolve_dtype(dtype)


def resolve_layer(layer: int, num_layers: int, what: str) -> int:
    """Map a hidden_states index (negative from the end) of a `num_layers`-layer encoder to 0..num_layers."""
    index = layer if layer >= 0 else num_layers + 1 + layer
    if not 0 <= index <= num_layers:
        raise ValueError(
            f"{what}: layer {layer} is out of range for a {num_layers}-layer encoder "
            f"(hidden_states has {num_layers + 1} entries: valid layers are {-(num_layers + 1)}..{num_layers})"
        )
    return index
