"""Action classification with any tower: mean-pooled tokens -> LayerNorm -> Linear, trained on labelled clips.

    model = VideoClassifier(build_tower("video_vit", ...), num_classes=12)
    data = load_labelled("demo_data/synth/classification_train.jsonl", num_frames=8, preprocessor=model.tower.preprocessor)
    history = train_classifier(model, data.pixels, data.labels, ClassifyTrainConfig(epochs=10))
    # multi-view testing with the evaluation harness (evals never runs inside vlm; call it from a script):
    #   evals.classify.evaluate_classification(model.classify_clip, items, classes, out_dir, num_clips=2, num_crops=3)

`model.classify_clip(clip) -> logits [C]` is the callable the evaluator takes (one view at a time).
Training reads clips decoded once into memory (the data sets this is for are small); it never augments
(a horizontal flip would swap "moving left" and "moving right").
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vlm.towers.base import VisionTower
from vlm.train.engine import lr_lambda
from vlm.train.metrics import MetricsLog
from vlm.video import Clip, read_clip
from vlm.video.errors import VideoDecodeError
from vlm.video.transforms import VideoPreprocessor

log = logging.getLogger(__name__)


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

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(pixels).tokens)  # [B, C]

    @torch.no_grad()
    def classify_clip(self, clip: Clip) -> torch.Tensor:
        """One view (uint8 frames [T, H, W, 3]) -> logits [C], in eval mode: the evaluator's callable."""
        was_training = self.training
        self.eval()
        pixels = self.tower.preprocessor(clip.frames)[None]  # [1, T, 3, S, S]
        logits = self(pixels)[0]
        self.train(was_training)
        return logits


class LabelledClips(NamedTuple):
    pixels: torch.Tensor  # [N, T, 3, S, S] float32, preprocessed
    labels: torch.Tensor  # [N] int64
    classes: list[str]
    videos: list[str]
    skipped: list[str]  # "path: reason" for clips that could not be decoded


def load_labelled(path: str | os.PathLike, num_frames: int, preprocessor: VideoPreprocessor, sampling: str = "uniform",
                  root: str | os.PathLike | None = None, classes: list[str] | None = None,
                  progress: bool = True) -> LabelledClips:
    """Decode every clip of a classification JSONL ({"video", "label"[, "label_id"]}; paths relative to `root`,
    default the file's folder; classes from `classes` or classes.json next to the file, else the sorted labels)."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if classes is None:
        classes_file = path.parent / "classes.json"
        classes = json.loads(classes_file.read_text()) if classes_file.is_file() else sorted({r["label"] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    pixels, labels, videos, skipped = [], [], [], []
    for i, row in enumerate(tqdm(rows, desc=f"decode {path.name}", unit="clip", disable=not progress)):
        if row.get("label") not in index:
            raise ValueError(f"{path}:{i + 1}: label {row.get('label')!r} is not one of the {len(classes)} classes")
        video = base / row["video"]
        try:
            clip = read_clip(video, num_frames, sampling)
        except (VideoDecodeError, OSError) as e:
            skipped.append(f"{video}: {e}")
            continue
        pixels.append(preprocessor(clip.frames))
        labels.append(index[row["label"]])
        videos.append(str(video))
    if skipped:
        log.warning("load_labelled: %d of %d clips of %s could not be decoded (skipped)", len(skipped), len(rows), path)
    if not pixels:
        raise ValueError(f"{path}: no decodable clips")
    return LabelledClips(torch.stack(pixels), torch.tensor(labels), list(classes), videos, skipped)


@dataclass
class ClassifyTrainConfig:
    epochs: float = 10.0
    batch_size: int = 16
    lr: float = 1e-3
    lr_groups: dict[str, float] = field(default_factory=dict)  # per-part lr, e.g. {"tower": 3e-4} for fine-tuning
    weight_decay: float = 0.05
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0


def train_classifier(model: VideoClassifier, pixels: torch.Tensor, labels: torch.Tensor,
                     config: ClassifyTrainConfig | None = None, progress: bool = True,
                     metrics_path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Cross-entropy training of every trainable parameter (freeze the tower beforehand for a probe): AdamW,
    linear warmup + cosine (the engine's schedule), shuffled with a seeded generator. Returns one record per step."""
    cfg = config or ClassifyTrainConfig()
    n = pixels.shape[0]
    per_epoch = max(1, n // cfg.batch_size)  # drop the last partial batch (every step sees a full batch)
    total = max(1, math.ceil(per_epoch * cfg.epochs))
    groups = []
    for part in ("tower", "head"):
        params = [p for p in getattr(model, part).parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": cfg.lr_groups.get(part, cfg.lr), "name": part})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, int(cfg.warmup_ratio * total), cfg.min_lr_ratio))
    gen = torch.Generator().manual_seed(cfg.seed)
    metrics = MetricsLog(metrics_path) if metrics_path else None
    history: list[dict[str, Any]] = []
    model.train()
    step, epoch = 0, 0
    with tqdm(total=total, desc="classify train", unit="step", disable=not progress) as bar:
        while step < total:
            perm = torch.randperm(n, generator=gen)
            for b in range(per_epoch):
                idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                logits = model(pixels[idx])  # [B, C]
                loss = F.cross_entropy(logits, labels[idx], label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                record = {"step": step, "epoch": epoch, "loss": float(loss.detach()),
                          "acc": float((logits.argmax(1) == labels[idx]).float().mean())}
                history.append(record)
                if metrics:
                    metrics.write(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                if step >= total:
                    break
            epoch += 1
    if metrics:
        metrics.close()
    model.eval()
    return history


@torch.no_grad()
def accuracy(model: VideoClassifier, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 32) -> float:
    """Top-1 accuracy (%) of single centre views already preprocessed: pixels [N, T, 3, S, S]."""
    model.eval()
    preds = torch.cat([model(pixels[i : i + batch_size]).argmax(1) for i in range(0, pixels.shape[0], batch_size)])
    return 100.0 * float((preds == labels).float().mean())
