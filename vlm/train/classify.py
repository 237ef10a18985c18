"""Classification training of a `VideoClassifier` on the shared training loop: cross-entropy on labelled clips
decoded once into memory (`vlm.data.classification.load_labelled`); its recipe and run.

    history = train_classifier(model, data.pixels, data.labels, ClassifyTrainConfig(epochs=10), out_dir="runs/cls")
    vlm classify recipes/video_vit_classify.yaml --set train.epochs=20      # the same from a recipe

`<output_dir>` receives checkpoints/, metrics.jsonl, loss_curves.png, classify.json and classifier/
(`VideoClassifier.from_pretrained`); multi-view testing is `evals.classify.evaluate_classification`.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from vlm.classifier import VideoClassifier
from vlm.data.classification import load_labelled
from vlm.data.dataset import BatchPlan
from vlm.towers import build_tower
from vlm.train.loop import LoopSpec, ScheduleSpec, build_accelerator, setup, train
from vlm.train.metrics import plot_loss_curves
from vlm.train.recipe import RecipeBase, RecipeError, build, check_loop, interpolate, read_recipe


@dataclass(kw_only=True)
class ClassifyTrainConfig(LoopSpec):
    """The loop's settings (batch_size, grad_accum, epochs, max_steps, precision, max_grad_norm, save_every,
    keep_last, log_every) and the optimizer's: AdamW over every trainable parameter (freeze the tower beforehand
    for a probe), linear warmup + cosine."""

    epochs: float = 10.0
    batch_size: int = 16
    precision: str = "fp32"
    lr: float = 1e-3
    lr_groups: dict[str, float] = field(default_factory=dict)  # per-part lr, e.g. {"tower": 3e-4} for fine-tuning
    weight_decay: float = 0.05
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0  # the order of the clips (a recipe's is its top-level seed)


def collate_labelled(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[tuple[torch.Tensor, torch.Tensor], list[str]]:
    return (torch.stack([p for p, _ in items]), torch.stack([y for _, y in items])), []


def train_classifier(model: VideoClassifier, pixels: torch.Tensor, labels: torch.Tensor,
                     config: ClassifyTrainConfig | None = None, out_dir: str | os.PathLike | None = None,
                     progress: bool = True, resume: bool = True) -> list[dict[str, Any]]:
    """Train `model` in place on pixels [N, T, 3, S, S] and labels [N]; returns one record per step of this run
    (loss, acc, lr, ...). Checkpoints and metrics.jsonl go to `out_dir`, and a run started again on it resumes
    (without `out_dir` they go to a temporary folder, deleted at the end)."""
    cfg = config or ClassifyTrainConfig()
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="vlm-classify-") as tmp:
            return train_classifier(model, pixels, labels, cfg, tmp, progress, resume=False)
    accelerator, _ = build_accelerator(cfg)
    groups = []
    for part in ("tower", "head"):
        params = [p for p in getattr(model, part).parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": cfg.lr_groups.get(part, cfg.lr), "name": part})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    plan = BatchPlan(len(labels), cfg.batch_size, accelerator.num_processes, accelerator.process_index, cfg.seed,
                     group_by_length=False, shuffle="torch_stream")
    run = setup(cfg, ScheduleSpec(cfg.warmup_ratio, cfg.warmup_steps, cfg.min_lr_ratio), accelerator, False, model,
                optimizer, torch.utils.data.TensorDataset(pixels, labels), collate_labelled, plan, out_dir,
                resume=resume)

    def step(net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], epoch: int,
             batch_index: int) -> dict[str, torch.Tensor]:
        x, y = (t.to(accelerator.device) for t in batch)
        logits = net(x)  # [B, C]
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        return {"loss": loss, "acc": (logits.argmax(1) == y).float().mean()}

    history = train(run, step, "classify train", progress=progress)
    model.eval()
    return history


# ---------------------------------------------------------------------------------------------- recipe
@dataclass
class ClassifyData:
    train: str  # classification JSONL (see vlm.data.classification)
    root: str | None = None  # video paths are relative to it (default: the file's folder)
    classes: str | list[str] | None = None  # a classes.json path or the names (default: classes.json next to train)
    frames: int = 8
    sampling: str = "uniform"


@dataclass
class ClassifyRecipe(RecipeBase):
    tower: dict[str, Any]  # a tower registry spec: {"name": "video_vit", ...}
    data: ClassifyData
    train: ClassifyTrainConfig = field(default_factory=ClassifyTrainConfig)
    dropout: float = 0.0  # before the head's Linear


def parse_classify_recipe(raw: dict[str, Any], source: str = "<recipe>") -> ClassifyRecipe:
    raw = interpolate(raw, source, "classify", ("name", "tower", "data"))
    if not isinstance(raw["tower"], dict) or "name" not in raw["tower"]:
        raise RecipeError(f"{source}: tower needs a registry 'name'")
    if "seed" in (raw.get("train") or {}):
        raise RecipeError(f"{source}: train.seed: the recipe's top-level seed seeds the head and the clip order")
    data = build(ClassifyData, raw["data"], f"{source}: data")
    train_cfg = build(ClassifyTrainConfig, {**(raw.get("train") or {}), "seed": raw.get("seed", 0)}, f"{source}: train")
    check_loop(train_cfg, f"{source}: train")
    rest = {k: v for k, v in raw.items() if k not in ("data", "train")}
    return build(ClassifyRecipe, {**rest, "data": data, "train": train_cfg, "source": source}, source)


def load_classify_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ClassifyRecipe:
    return parse_classify_recipe(read_recipe(path, overrides), str(path))


def classify(recipe: ClassifyRecipe, resume: bool = True, progress: bool = True) -> Path:
    """Run (or resume) a classification recipe; returns the saved classifier folder."""
    out = Path(recipe.output_dir)
    torch.manual_seed(recipe.seed)
    tower = build_tower(**copy.deepcopy(recipe.tower))
    d = recipe.data
    data = load_labelled(d.train, d.frames, tower.preprocessor, d.sampling, d.root, d.classes, progress)
    model = VideoClassifier(tower, len(data.classes), recipe.dropout)
    history = train_classifier(model, data.pixels, data.labels, recipe.train, out, progress, resume)
    folder = out / "classifier"
    if int(os.environ.get("RANK", "0")) == 0:
        model.save_pretrained(folder, recipe.tower, data.classes)
        plot_loss_curves([(f"classify {recipe.name}", out / "metrics.jsonl")], out / "loss_curves.png")
        (out / "classify.json").write_text(json.dumps({
            "recipe": recipe.to_dict(), "clips": len(data.labels), "undecodable": data.skipped,
            "final_loss": history[-1]["loss"] if history else None, "classifier": str(folder)}, indent=2, default=str))
    return folder
