"""VideoMAE pretraining of a `video_vit` encoder: its recipe, data and step function on the shared training loop.

    vlm pretrain recipes/videomae_pretrain.yaml --set train.max_steps=200 --set objective.masking=random

The mask of every step is a function of (seed, epoch, batch, process), so a resumed run draws the same masks.
Output folder: checkpoints/, metrics.jsonl, loss_curves.png, skipped.txt (undecodable clips, skipped and counted),
pretrain.json, and encoder/ (config.json + model.safetensors), which `{"name": "video_vit", "checkpoint": ...}`
loads as a tower.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from vlm.data.conversation import read_records
from vlm.data.dataset import BatchPlan
from vlm.towers.common import IMAGENET_MEAN, IMAGENET_STD
from vlm.towers.video_vit import VideoViT, VideoViTConfig, save_encoder
from vlm.towers.video_vit.mae import MAEConfig, VideoMAE
from vlm.train.loop import LoopSpec, ScheduleSpec, build_accelerator, setup, train
from vlm.train.metrics import plot_loss_curves
from vlm.train.recipe import RecipeBase, RecipeError, build, check_loop, interpolate, read_recipe
from vlm.video import read_clip
from vlm.video.errors import VideoDecodeError
from vlm.video.transforms import VideoPreprocessor

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".gif")


# ---------------------------------------------------------------------------------------------- recipe
@dataclass
class PretrainData:
    sources: list[str] = field(default_factory=list)  # JSON/JSONL files of records with "video", or video folders
    media_root: str | None = None  # default: each file's folder
    frames: int = 16
    sampling: str = "uniform"
    num_workers: int = 0
    max_samples: int | None = None
    cache: bool = False  # keep decoded clips in memory after their first read (small data sets, num_workers 0)


@dataclass(kw_only=True)
class PretrainTrain(LoopSpec):
    """The loop's settings (batch_size, grad_accum, epochs, max_steps, precision, save_every, keep_last, log_every)
    and VideoMAE's optimizer and schedule."""

    max_grad_norm: float = 0.0  # 0 = no clipping (VideoMAE does not clip)
    lr: float = 1.5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0


@dataclass
class PretrainRecipe(RecipeBase):
    encoder: dict[str, Any]  # VideoViTConfig fields
    data: PretrainData
    objective: MAEConfig = field(default_factory=MAEConfig)
    train: PretrainTrain = field(default_factory=PretrainTrain)


def parse_pretrain_recipe(raw: dict[str, Any], source: str = "<recipe>") -> PretrainRecipe:
    raw = interpolate(raw, source, "videomae", ("name", "encoder", "data"))
    try:
        encoder = VideoViTConfig.from_dict(raw["encoder"] or {})
        objective = build(MAEConfig, raw.get("objective") or {}, f"{source}: objective")
        VideoMAE.check(encoder, objective)
    except RecipeError:
        raise
    except ValueError as e:
        raise RecipeError(f"{source}: {e}") from None
    data = build(PretrainData, raw["data"], f"{source}: data")
    train = build(PretrainTrain, raw.get("train") or {}, f"{source}: train")
    if not data.sources:
        raise RecipeError(f"{source}: data.sources is empty")
    check_loop(train, f"{source}: train")
    rest = {k: v for k, v in raw.items() if k not in ("data", "train", "objective")}
    return build(PretrainRecipe, {**rest, "encoder": encoder.to_dict(), "data": data, "objective": objective,
                                  "train": train, "source": source}, source)


def load_pretrain_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> PretrainRecipe:
    return parse_pretrain_recipe(read_recipe(path, overrides), str(path))


# ---------------------------------------------------------------------------------------------- data
def list_videos(sources: Sequence[str], media_root: str | None = None) -> tuple[list[Path], list[str]]:
    """Video paths from JSON/JSONL records (their "video" field, relative to media_root or the file's folder) or
    from folders (every video file, recursively); plus the malformed records that were left out."""
    videos: list[Path] = []
    bad: list[str] = []
    for src in sources:
        path = Path(src)
        if path.is_dir():
            videos += sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
            continue
        root = Path(media_root) if media_root else path.parent
        for location, record in read_records(path):
            if isinstance(record, Exception) or not isinstance(record, dict) or not record.get("video"):
                bad.append(f"{location}: no 'video' field" if not isinstance(record, Exception) else str(record))
                continue
            videos.append(root / str(record["video"]))
    return videos, bad


class ClipDataset(torch.utils.data.Dataset):
    """Video i -> {"pixels": [T, 3, S, S]} (or {"error": "path: reason"} when it cannot be decoded)."""

    def __init__(self, videos: Sequence[Path], frames: int, sampling: str, preprocessor: VideoPreprocessor,
                 cache: bool = False) -> None:
        self.videos, self.frames, self.sampling, self.preprocessor = list(videos), frames, sampling, preprocessor
        self.cache: dict[int, dict[str, Any]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        path = self.videos[i]
        try:
            clip = read_clip(path, self.frames, self.sampling)
            item = {"pixels": self.preprocessor.clip(clip)[0]}
        except (VideoDecodeError, OSError) as e:
            item = {"error": f"{path}: {e}"}
        if self.cache is not None:
            self.cache[i] = item
        return item


def collate_clips(items: list[dict[str, Any]]) -> tuple[torch.Tensor | None, list[str]]:
    good = [x["pixels"] for x in items if "pixels" in x]
    return (torch.stack(good) if good else None), [x["error"] for x in items if "error" in x]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, position tables, the mask token and the relative-position bias."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or "pos." in name or "mask_token" in name or "rel_bias" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


# ---------------------------------------------------------------------------------------------- run
def pretrain(recipe: PretrainRecipe, resume: bool = True, progress: bool = True) -> Path:
    """Run (or resume) the pretraining; returns the saved encoder folder."""
    out = Path(recipe.output_dir)
    tr, data = recipe.train, recipe.data
    torch.manual_seed(recipe.seed)
    enc_cfg = VideoViTConfig.from_dict(recipe.encoder)
    model = VideoMAE(VideoViT(enc_cfg), recipe.objective)
    pre = VideoPreprocessor(size=enc_cfg.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, mode="resize_crop")
    accelerator, _ = build_accelerator(tr)
    main, rank = accelerator.is_main_process, accelerator.process_index

    videos, bad_records = list_videos(data.sources, data.media_root)
    if data.max_samples:
        videos = videos[: data.max_samples]
    if not videos:
        raise RecipeError(f"{recipe.source}: no videos in data.sources {data.sources}")
    if data.cache and data.num_workers:
        raise RecipeError(f"{recipe.source}: data.cache keeps clips in this process: use it with data.num_workers=0")
    dataset = ClipDataset(videos, data.frames, data.sampling, pre, cache=data.cache)
    plan = BatchPlan(len(dataset), tr.batch_size, accelerator.num_processes, rank, recipe.seed, group_by_length=False,
                     shuffle="torch")
    optimizer = torch.optim.AdamW(param_groups(model, tr.weight_decay), lr=tr.lr, betas=tuple(tr.betas))
    run = setup(tr, ScheduleSpec(tr.warmup_ratio, tr.warmup_steps, tr.min_lr_ratio), accelerator, False, model,
                optimizer, dataset, collate_clips, plan, out, data.num_workers, resume)
    summary = {"recipe": recipe.source, "name": recipe.name, "total_steps": run.total_steps,
               "batches_per_epoch": len(plan), "videos": len(videos), "malformed_records": len(bad_records),
               "processes": accelerator.num_processes,
               "params": {"encoder": sum(p.numel() for p in model.encoder.parameters()),
                          "decoder": sum(p.numel() for p in model.decoder.parameters())},
               "recipe_values": recipe.to_dict()}
    if main:
        (out / "pretrain.json").write_text(json.dumps(summary, indent=2, default=str))

    def step(net: torch.nn.Module, pixels: torch.Tensor, epoch: int, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed((recipe.seed * 1_000_003 + epoch * 10_007 + index) * 31 + rank)
        return {"loss": net(pixels.to(accelerator.device), generator=gen).loss}

    history = train(run, step, f"videomae {recipe.name}", progress=progress)
    last_loss = history[-1]["loss"] if history else float("nan")
    encoder_dir = out / "encoder"
    if main:
        save_encoder(model.encoder, encoder_dir, preprocessor=pre.to_dict(), extra={"pretraining": {
            "objective": "videomae", **asdict(recipe.objective), "steps": run.position["step"],
            "final_loss": last_loss, "recipe": recipe.source, "videos": len(videos)}})
        plot_loss_curves([(f"videomae ({recipe.objective.masking} masking {recipe.objective.mask_ratio:.0%})",
                           out / "metrics.jsonl")], out / "loss_curves.png")
        summary |= {"steps": run.position["step"], "final_loss": last_loss,
                    "skipped_clips": run.position["skipped"], "encoder": str(encoder_dir)}
        (out / "pretrain.json").write_text(json.dumps(summary, indent=2, default=str))
    accelerator.wait_for_everyone()
    return encoder_dir
