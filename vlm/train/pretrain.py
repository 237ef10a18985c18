"""VideoMAE pretraining of a `video_vit` encoder: recipe (YAML -> dataclasses), data, loop, CLI.

    python -m vlm.train.videomae recipes/videomae_pretrain.yaml --set train.max_steps=200
    vlm pretrain recipes/videomae_pretrain.yaml --set objective.masking=random

One explicit loop on accelerate (the engine's `build_accelerator`, `lr_lambda`; single process or DDP under
torchrun), with the engine's atomic, resumable checkpoints (trainable weights, optimizer, scheduler, RNG states,
position; the mask of every step is a function of (seed, epoch, batch), so a resumed run draws the same masks),
a metrics JSONL and a loss PNG. At the end the encoder is written to `<output_dir>/encoder` with its
architecture and preprocessing: `{"name": "video_vit", "checkpoint": "<output_dir>/encoder"}` is then a tower.

Output folder:
    checkpoints/step-NNNNNNN/   resumable state (last `keep_last` kept)
    metrics.jsonl, loss_curves.png, skipped.txt (undecodable clips, skipped and counted), pretrain.json
    encoder/                    config.json + model.safetensors
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from tqdm.auto import tqdm

from vlm.data.conversation import read_records
from vlm.data.dataset import steps_for
from vlm.model import PARTS
from vlm.towers.hf import IMAGENET_MEAN, IMAGENET_STD
from vlm.towers.video_vit import VideoViT, VideoViTConfig, save_encoder
from vlm.train.resume import list_checkpoints, load_checkpoint, save_checkpoint
from vlm.train.engine import build_accelerator, lr_lambda, warmup_for
from vlm.train.metrics import MetricsLog, plot_loss_curves
from vlm.train.recipe import DataSpec, PartSpec, RecipeError, StageSpec, _build, _interpolate
from vlm.train.videomae import MAEConfig, VideoMAE
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


@dataclass
class PretrainTrain:
    batch_size: int = 8  # per process
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 1.5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0
    precision: str = "bf16"  # fp32 | bf16 | fp16
    max_grad_norm: float = 0.0  # 0 = no clipping (VideoMAE does not clip)
    save_every: int = 0
    keep_last: int = 2
    log_every: int = 1


@dataclass
class PretrainRecipe:
    name: str
    encoder: dict[str, Any]  # VideoViTConfig fields
    data: PretrainData
    objective: MAEConfig = field(default_factory=MAEConfig)
    train: PretrainTrain = field(default_factory=PretrainTrain)
    output_dir: str = "runs/${name}"
    seed: int = 0
    vars: dict[str, Any] = field(default_factory=dict)
    source: str = "<recipe>"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_key(raw: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to the raw recipe dict."""
    if "=" not in assignment:
        raise RecipeError(f"--set '{assignment}': expected key=value")
    key, text = assignment.split("=", 1)
    node = raw
    *path, last = key.strip().split(".")
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set '{assignment}': '{part}' is not a mapping")
    node[last] = yaml.safe_load(text)


def parse_pretrain_recipe(raw: dict[str, Any], source: str = "<recipe>") -> PretrainRecipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a mapping")
    raw = copy.deepcopy(raw)
    variables = dict(raw.get("vars") or {})
    variables.setdefault("name", raw.get("name", "videomae"))
    raw = _interpolate(raw, variables, source)
    for key in ("name", "encoder", "data"):
        if key not in raw:
            raise RecipeError(f"{source}: missing '{key}'")
    try:
        encoder = VideoViTConfig.from_dict(raw["encoder"] or {})
        objective = MAEConfig.from_dict(raw.get("objective") or {})
        VideoMAE.check(encoder, objective)
    except ValueError as e:
        raise RecipeError(f"{source}: {e}") from None
    data = _build(PretrainData, raw["data"], f"{source}: data")
    train = _build(PretrainTrain, raw.get("train") or {}, f"{source}: train")
    if not data.sources:
        raise RecipeError(f"{source}: data.sources is empty")
    if train.precision not in ("fp32", "bf16", "fp16"):
        raise RecipeError(f"{source}: train.precision must be fp32, bf16 or fp16, got {train.precision!r}")
    rest = {k: v for k, v in raw.items() if k not in ("data", "train", "objective")}
    return _build(PretrainRecipe, {**rest, "encoder": encoder.to_dict(), "data": data, "objective": objective,
                                   "train": train, "source": source}, source)


def load_pretrain_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> PretrainRecipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for assignment in overrides:
        set_key(raw, assignment)
    return parse_pretrain_recipe(raw, str(path))


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
            item = {"pixels": self.preprocessor(clip.frames)}
        except (VideoDecodeError, OSError) as e:
            item = {"error": f"{path}: {e}"}
        if self.cache is not None:
            self.cache[i] = item
        return item


def collate_clips(items: list[dict[str, Any]]) -> tuple[torch.Tensor | None, list[str]]:
    good = [x["pixels"] for x in items if "pixels" in x]
    return (torch.stack(good) if good else None), [x["error"] for x in items if "error" in x]


def epoch_batches(n: int, batch_size: int, processes: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """This process's batches of one epoch: a seeded permutation cut into global batches (the last, partial
    one dropped unless it is the only one), each split evenly between processes."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    step = batch_size * processes
    starts = range(0, max(n - step + 1, 1), step)
    return [perm[s : s + step][rank::processes] for s in starts]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, position tables, the mask token and the relative-position bias."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or "pos." in name or "mask_token" in name or "rel_bias" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


# ---------------------------------------------------------------------------------------------- loop
def pretrain(recipe: PretrainRecipe, resume: bool = True, progress: bool = True) -> Path:
    """Run (or resume) the pretraining; returns the saved encoder folder."""
    out = Path(recipe.output_dir)
    tr, data = recipe.train, recipe.data
    torch.manual_seed(recipe.seed)
    enc_cfg = VideoViTConfig.from_dict(recipe.encoder)
    model = VideoMAE(VideoViT(enc_cfg), recipe.objective)
    pre = VideoPreprocessor(size=enc_cfg.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, mode="resize_crop")
    stage = StageSpec(name=recipe.name, parts={p: PartSpec() for p in PARTS}, data=DataSpec(), batch_size=tr.batch_size,
                      grad_accum=tr.grad_accum, precision=tr.precision, max_grad_norm=tr.max_grad_norm)
    accelerator, deepspeed = build_accelerator(stage)
    main = accelerator.is_main_process

    videos, bad_records = list_videos(data.sources, data.media_root)
    if data.max_samples:
        videos = videos[: data.max_samples]
    if not videos:
        raise RecipeError(f"{recipe.source}: no videos in data.sources {data.sources}")
    if data.cache and data.num_workers:
        raise RecipeError(f"{recipe.source}: data.cache keeps clips in this process: use it with data.num_workers=0")
    dataset = ClipDataset(videos, data.frames, data.sampling, pre, cache=data.cache)
    nproc, rank = accelerator.num_processes, accelerator.process_index
    per_epoch = len(epoch_batches(len(dataset), tr.batch_size, nproc, rank, recipe.seed, 0))
    total = steps_for(per_epoch, tr.grad_accum, tr.epochs, tr.max_steps)
    warmup = warmup_for(tr.warmup_steps, tr.warmup_ratio, total)

    optimizer = torch.optim.AdamW(param_groups(model, tr.weight_decay), lr=tr.lr, betas=tuple(tr.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, warmup, tr.min_lr_ratio))
    wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    ckpt_dir = out / "checkpoints"
    position = {"step": 0, "epoch": 0, "batch": 0, "skipped": 0}
    existing = list_checkpoints(ckpt_dir) if resume else []
    if existing:
        position = load_checkpoint(accelerator, wrapped, optimizer, scheduler, existing[-1], deepspeed)
        log.info("videomae: resumed from %s (step %d)", existing[-1], position["step"])
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=position["step"]) if main else None
    skipped_log = open(out / "skipped.txt", "a", encoding="utf-8") if main else None
    summary = {"recipe": recipe.source, "name": recipe.name, "total_steps": total, "batches_per_epoch": per_epoch,
               "videos": len(videos), "malformed_records": len(bad_records), "processes": nproc,
               "params": {"encoder": sum(p.numel() for p in model.encoder.parameters()),
                          "decoder": sum(p.numel() for p in model.decoder.parameters())},
               "recipe_values": recipe.to_dict()}
    if main:
        (out / "pretrain.json").write_text(json.dumps(summary, indent=2, default=str))

    wrapped.train()
    bar = tqdm(total=total, initial=position["step"], desc=f"videomae {recipe.name}", unit="step",
               disable=not (progress and accelerator.is_local_main_process))
    loss_sum, micro, t0, clips, last_loss = 0.0, 0, time.time(), 0, float("nan")
    while position["step"] < total:
        batches = epoch_batches(len(dataset), tr.batch_size, nproc, rank, recipe.seed, position["epoch"])
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches[position["batch"]:],
                                             collate_fn=collate_clips, num_workers=data.num_workers)
        for pixels, skipped in loader:
            index = position["batch"]
            position["batch"] += 1
            if skipped:
                position["skipped"] += len(skipped)
                if skipped_log:
                    skipped_log.write("\n".join(skipped) + "\n")
                    skipped_log.flush()
            if pixels is None:
                continue
            gen = torch.Generator().manual_seed((recipe.seed * 1_000_003 + position["epoch"] * 10_007 + index) * 31 + rank)
            with accelerator.accumulate(wrapped):
                out_mae = wrapped(pixels.to(accelerator.device), generator=gen)
                accelerator.backward(out_mae.loss)
                if accelerator.sync_gradients:
                    if tr.max_grad_norm:
                        accelerator.clip_grad_norm_(wrapped.parameters(), tr.max_grad_norm)
                    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses, before the scheduler moves it
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += float(out_mae.loss.detach())
            micro += 1
            clips += pixels.shape[0] * nproc
            if not accelerator.sync_gradients:
                continue
            position["step"] += 1
            last_loss = float(accelerator.reduce(torch.tensor(loss_sum / micro, device=accelerator.device), "mean"))
            record = {"step": position["step"], "epoch": position["epoch"], "loss": last_loss, "lr": lr,
                      "clips_per_s": clips / max(time.time() - t0, 1e-9), "skipped": position["skipped"]}
            if metrics and position["step"] % tr.log_every == 0:
                metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
            loss_sum, micro, t0, clips = 0.0, 0, time.time(), 0
            if tr.save_every and position["step"] % tr.save_every == 0 and position["step"] < total:
                save_checkpoint(accelerator, wrapped, optimizer, scheduler, position, ckpt_dir, tr.keep_last, deepspeed)
            if position["step"] >= total:
                break
        else:
            position["epoch"] += 1
            position["batch"] = 0
    bar.close()
    save_checkpoint(accelerator, wrapped, optimizer, scheduler, position, ckpt_dir, tr.keep_last, deepspeed)

    encoder_dir = out / "encoder"
    if main:
        inner = accelerator.unwrap_model(wrapped)
        save_encoder(inner.encoder, encoder_dir, preprocessor=pre.to_dict(), extra={"pretraining": {
            "objective": "videomae", **recipe.objective.to_dict(), "steps": position["step"], "final_loss": last_loss,
            "recipe": recipe.source, "videos": len(videos)}})
        metrics.close()
        skipped_log.close()
        plot_loss_curves([(f"videomae ({recipe.objective.masking} masking {recipe.objective.mask_ratio:.0%})",
                           out / "metrics.jsonl")], out / "loss_curves.png")
        summary |= {"steps": position["step"], "final_loss": last_loss, "skipped_clips": position["skipped"],
                    "encoder": str(encoder_dir)}
        (out / "pretrain.json").write_text(json.dumps(summary, indent=2, default=str))
        if position["skipped"]:
            log.warning("videomae: %d undecodable clips were skipped (listed in %s)", position["skipped"],
                        out / "skipped.txt")
    accelerator.wait_for_everyone()
    return encoder_dir


# ---------------------------------------------------------------------------------------------- CLI
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m vlm.train.videomae",
                                               description="VideoMAE pretraining of a video_vit encoder")
    parser.add_argument("recipe", help="recipes/videomae_pretrain.yaml")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a recipe value, e.g. train.max_steps=100, objective.masking=random")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    return parser


def run_cli(args: argparse.Namespace) -> int:
    recipe = load_pretrain_recipe(args.recipe, args.set or [])
    encoder = pretrain(recipe, resume=not args.no_resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pretrained encoder: {encoder}  (tower: {{\"name\": \"video_vit\", \"checkpoint\": \"{encoder}\"}})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_cli(args)


if __name__ == "__main__":
    raise SystemExit(main())
