"""VideoClassifier: any tower + a classification head (mean-pooled tokens -> LayerNorm -> Linear).

    model = VideoClassifier(build_tower("video_vit", ...), num_classes=12)   # trained by vlm.train.classify
    model.classify_clip(clip)                   # one view -> logits [C]: the callable evals.classify takes
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.towers import build_tower
from vlm.towers.base import VisionTower
from vlm.video import Clip
from vlm.weights import atomic_dir, load_module, save_tensors


class ClassificationHead(nn.Module):
    """tokens [B, T', N, D] -> mean over time and space -> LayerNorm -> (dropout) -> Linear -> logits [B, C]."""

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = tokens.mean(dim=(1, 2))  # [B, D]
        return self.fc(self.dropout(self.norm(pooled.float())))  # [B, C]


class VideoClassifier(nn.Module):
    """A tower with a classification head: pixels [B, T, 3, H, W] -> logits [B, C]."""

    def __init__(self, tower: VisionTower, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.tower = tower
        self.head = ClassificationHead(tower.hidden_size, num_classes, dropout)
        self.classes: list[str] | None = None  # the class names, when loaded from a saved folder

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(pixels).tokens)  # [B, C]

    @torch.no_grad()
    def classify_clip(self, clip: Clip) -> torch.Tensor:
        """One view (uint8 frames [T, H, W, 3]) -> logits [C], in eval mode: the evaluator's callable."""
        was_training = self.training
        self.eval()
        pixels = self.tower.preprocessor.clip(clip)[0][None]  # [1, T, 3, S, S]
        logits = self(pixels.to(self.head.fc.weight.device))[0]
        self.train(was_training)
        return logits

    def save_pretrained(self, folder: str | os.PathLike, tower: dict[str, Any], classes: list[str]) -> Path:
        """Write config.json (the tower's registry spec, the class names, the dropout) and model.safetensors."""
        with atomic_dir(folder) as tmp:
            config = {"tower": tower, "classes": list(classes), "dropout": self.head.dropout.p}
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            save_tensors(self.state_dict(), tmp / "model.safetensors")
        return Path(folder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> VideoClassifier:
        """Rebuild a saved classifier (strictly: same keys and shapes), in eval mode, with `classes` set."""
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        model = cls(build_tower(**copy.deepcopy(config["tower"])), len(config["classes"]), config["dropout"])
        load_module(model, Path(folder) / "model.safetensors", f"classifier ({folder})")
        model.classes = config["classes"]
        return model.eval()


@torch.no_grad()
def accuracy(model: VideoClassifier, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 32) -> float:
    """Top-1 accuracy (%) of single centre views already preprocessed: pixels [N, T, 3, S, S]."""
    model.eval()
    device = model.head.fc.weight.device
    preds = torch.cat([model(pixels[i : i + batch_size].to(device)).argmax(1).cpu()
                       for i in range(0, pixels.shape[0], batch_size)])
    return 100.0 * float((preds == labels).float().mean())
