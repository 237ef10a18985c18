"""What rebuilds a VideoLLM: its config (parts by registry key, video settings) and reading a saved one's."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlm.data.conversation import DataFormatError

PARTS = ("tower", "connector", "llm")
MODES = ("frozen", "lora", "full")


@dataclass
class VideoLLMConfig:
    """Everything needed to rebuild a model: parts by registry key + kwargs, and the video settings."""

    tower: dict[str, Any]  # {"name": "siglip", "model": "google/siglip-so400m-patch14-384", ...}
    connector: dict[str, Any]  # {"name": "stc", "downsample": [2, 2, 2], "reduce": [...]}
    llm: dict[str, Any]  # {"loader": "hf", "path": "Qwen/Qwen2-7B-Instruct", "dtype": "bfloat16"}
    num_frames: int = 16
    sampling: str = "uniform"
    time_stamps: bool = False  # "Time: 1.5s" before each temporal group of visual tokens
    distinct_frames: bool = False  # a clip's repeated frames (a short window's samples) read once each
    max_length: int = 2048
    system_prompt: str | None = None
    lora: dict[str, dict[str, Any]] = field(default_factory=dict)  # part -> LoRA settings in use
    token_budget: dict[str, Any] = field(default_factory=dict)  # {"max_tokens": 256, "policy": "pool"} (vlm.budget)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VideoLLMConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        for part in PARTS:
            if part not in d:
                raise ValueError(f"model config needs '{part}'")
        return cls(**copy.deepcopy(d))


# config fields that change no weights; "connector": the connector's own `settings` (e.g. word slots' layout)
SETTINGS = ("token_budget", "max_length", "system_prompt", "time_stamps", "distinct_frames", "connector")


def saved_config(folder: str | Path) -> tuple[VideoLLMConfig, dict[str, Any]]:
    """(the model config, the whole config.json) of a saved VideoLLM folder; errors name the folder or file."""
    meta_path = Path(folder) / "config.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: not a saved VideoLLM (no config.json)")
    try:
        meta = json.loads(meta_path.read_text())
        return VideoLLMConfig.from_dict(meta["config"]), meta
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataFormatError(f"{meta_path}: not a VideoLLM config ({type(e).__name__}: {e})") from None
