"""The training loop: one explicit loop on accelerate, single-process, DDP or DeepSpeed ZeRO-2/3.

    run_recipe(recipe)                      every stage in order, each starting from the previous one's output
      train_stage(recipe, i, init_from)     one stage: build -> set modes -> (feature cache) -> loop -> save
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vlm.data.dataset import BatchPlan, ConversationDataset, SourceSpec, load_mixture, steps_for, subsample
from vlm.model import PARTS, VideoLLM
from vlm.train.resume import list_checkpoints, load_checkpoint, save_checkpoint
from vlm.train.feature_cache import FeatureCache, clip_key, tower_fingerprint
from vlm.train.metrics import MetricsLog, plot_loss_curves
from vlm.train.recipe import Recipe, StageSpec
from vlm.video import read_clip
from vlm.video.errors import VideoDecodeError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- setup
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_accelerator(stage: StageSpec) -> tuple[Any, bool]:
    """An Accelerator for the stage (DeepSpeed when the stage names a config) and whether DeepSpeed is on."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    AcceleratorState._reset_state()  # a new stage may switch between DDP and ZeRO (the process group stays)
    GradientState._reset_state()
    cuda = torch.cuda.is_available()
    if stage.precision == "fp16" and not cuda:
        raise ValueError(f"stage '{stage.name}': fp16 needs a GPU; use bf16 or fp32 on CPU")
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[stage.precision]
    handlers: list[Any] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    if not cuda and (int(os.environ.get("WORLD_SIZE", "1")) > 1 or stage.deepspeed):
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # CPU processes talk over gloo
    plugin = None
    if stage.deepspeed:
        ds = json.loads(Path(stage.deepspeed).read_text())
        ds["train_micro_batch_size_per_gpu"] = stage.batch_size
        ds["gradient_accumulation_steps"] = stage.grad_accum
        ds["gradient_clipping"] = stage.max_grad_norm
        ds["bf16"] = {"enabled": stage.precision == "bf16"}
        ds["fp16"] = {"enabled": stage.precision == "fp16"}
        ds.setdefault("zero_allow_untested_optimizer", True)  # a plain torch AdamW: no JIT-built fused optimizer
        ds.pop("train_batch_size", None)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())), ("RANK", "0"),
                           ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)  # a single process still needs a process group for DeepSpeed
        zero3 = ds.get("zero_optimization", {}).get("stage") == 3
        plugin = DeepSpeedPlugin(hf_ds_config=ds, zero3_save_16bit_model=zero3)
    else:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    accelerator = Accelerator(cpu=not cuda and plugin is None, mixed_precision=mixed, deepspeed_plugin=plugin,
                              gradient_accumulation_steps=stage.grad_accum, kwargs_handlers=handlers)
    return accelerator, plugin is not None


def lr_lambda(total_steps: int, warmup: int, min_ratio: float):
    """Linear warmup over `warmup` steps, then cosine decay to `min_ratio` of each group's lr."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)  # the first step already learns; the rate reaches 1 after warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def warmup_for(steps: int | None, ratio: float, total: int) -> int:
    """Warmup steps: the explicit count, else the ratio of the total rounded up (a nonzero ratio never means 0)."""
    return steps if steps is not None else math.ceil(ratio * total)


def make_optimizer(model: VideoLLM, stage: StageSpec) -> torch.optim.Optimizer:
    groups = []
    for part, params in model.parameter_groups().items():
        if params:
            spec = stage.parts[part]
            groups.append({"params": params, "lr": spec.lr, "weight_decay": spec.weight_decay, "name": part})
    if not groups:
        raise ValueError(f"stage '{stage.name}': no trainable parameters")
    return torch.optim.AdamW(groups, betas=(0.9, 0.999))


def stage_model(recipe: Recipe, stage: StageSpec, init_from: Path | None) -> VideoLLM:
    """The stage's starting model (the previous stage's output, or built from the recipe) with its modes set."""
    model = VideoLLM.from_pretrained(init_from) if init_from is not None else VideoLLM.from_config(recipe.model_config())
    model.config.num_frames = stage.data.frames
    model.config.sampling = stage.data.sampling
    for part in PARTS:
        spec = stage.parts[part]
        model.set_mode(part, spec.mode, spec.lora)
    if stage.gradient_checkpointing:
        if hasattr(model.llm, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# ---------------------------------------------------------------- data
class VisualLoader:
    """Decodes a sample's clip (or reads its cached tower features) for the dataset; picklable for workers."""

    def __init__(self, model: VideoLLM, frames: int, policy: str, cache: FeatureCache | None = None):
        self.preprocessor = model.tower.preprocessor
        self.frames = frames
        self.policy = policy
        self.cache = cache
        self.bad: dict[str, str] = {}

    def clip_args(self, sample: Any) -> tuple[int, str, float | None, float | None]:
        frames = 1 if sample.media_type == "image" else self.frames
        return frames, self.policy, sample.extra.get("start"), sample.extra.get("end")

    def decode(self, path: Path, sample: Any) -> dict[str, Any]:
        frames, policy, start, end = self.clip_args(sample)
        clip = read_clip(path, frames, policy, start, end)
        return {"pixel_values": self.preprocessor(clip.frames), "timestamps": torch.as_tensor(clip.timestamps, dtype=torch.float32)}

    def __call__(self, path: Path, sample: Any) -> dict[str, Any]:
        if self.cache is None:
            return self.decode(path, sample)
        key = clip_key(path, *self.clip_args(sample))
        if key in self.bad:
            raise VideoDecodeError(path, self.bad[key])
        entry = self.cache.get(key)
        if entry is None:
            raise VideoDecodeError(path, "no cached features (the clip failed to decode during precompute)")
        grid = tuple(int(g) for g in entry["grid"])
        return {"features": entry["tokens"], "grid": grid, "num_frames": len(entry["timestamps"]),
                "timestamps": entry["timestamps"]}


def precompute_features(model: VideoLLM, items: list[Any], loader: VisualLoader, accelerator: Any,
                        batch_size: int = 8) -> dict[str, int]:
    """Encode every distinct clip of the stage once with the frozen tower (split across processes)."""
    cache = loader.cache
    assert cache is not None
    jobs: dict[str, tuple[Path, Any]] = {}
    from vlm.data.conversation import resolve_media

    for it in items:
        s = it.sample
        if s.media:
            try:
                path = resolve_media(it.media_root, s.media, s.location)
                key = clip_key(path, *loader.clip_args(s))
            except (OSError, ValueError) as e:
                log.warning("%s: %s", s.location, e)
                continue
            if key not in cache and key not in jobs:
                jobs[key] = (path, s)
    keys = sorted(jobs)[accelerator.process_index:: accelerator.num_processes]
    tower = model.tower.to(accelerator.device).eval()
    stats = {"clips": len(jobs), "encoded": 0, "bad": 0}
    pending: list[tuple[str, dict[str, Any]]] = []

    def run(batch: list[tuple[str, dict[str, Any]]]) -> None:
        px = torch.stack([b["pixel_values"] for _, b in batch]).to(accelerator.device)
        ts = torch.stack([b["timestamps"] for _, b in batch]).to(accelerator.device)
        with torch.no_grad():  # the tower's own dtype: CPU autocast makes depthwise convs (EfficientNet) slower
            feats = tower(px.to(next(tower.parameters()).dtype), ts)
        for (key, b), tokens in zip(batch, feats.tokens):
            cache.put(key, tokens, b["timestamps"], feats.grid)
        stats["encoded"] += len(batch)

    for key in tqdm(keys, desc="feature cache", unit="clip", disable=not accelerator.is_local_main_process):
        path, sample = jobs[key]
        try:
            item = loader.decode(path, sample)
        except VideoDecodeError as e:
            loader.bad[key] = e.reason
            stats["bad"] += 1
            continue
        if pending and item["pixel_values"].shape != pending[0][1]["pixel_values"].shape:
            run(pending)
            pending = []
        pending.append((key, item))
        if len(pending) == batch_size:
            run(pending)
            pending = []
    if pending:
        run(pending)
    cache.flush()
    accelerator.wait_for_everyone()
    cache.reload()
    bad_file = cache.dir / f"bad-r{accelerator.process_index}.json"
    bad_file.write_text(json.dumps(loader.bad))
    accelerator.wait_for_everyone()
    for f in cache.dir.glob("bad-r*.json"):
        loader.bad.update(json.loads(f.read_text()))
    return stats


class Collate:
    def __init__(self, model: VideoLLM):
        self.model = model

    def __call__(self, items: list[dict[str, Any]]) -> tuple[Any, list[str]]:
        skipped = [r for it in items for r in it.pop("skipped", [])]
        return self.model.collate(items), skipped


# ---------------------------------------------------------------- one stage
def train_stage(recipe: Recipe, index: int, init_from: Path | None, stage_dir: Path, resume: bool = True) -> Path:
    """Train stage `index` into `stage_dir`; returns the saved model folder (`stage_dir/final`)."""
    stage = recipe.stages[index]
    t_stage = time.time()
    # The model is built whole before DeepSpeed is set up: a previous ZeRO-3 stage must not make transformers
    # build it partitioned (saved parts are loaded into full tensors; DeepSpeed partitions at prepare()).
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    torch.manual_seed(recipe.seed + index)
    model = stage_model(recipe, stage, init_from)
    accelerator, deepspeed = build_accelerator(stage)
    main = accelerator.is_main_process

    items, bad_records = load_mixture([SourceSpec(m.path, m.media_root, m.weight) for m in stage.data.mixture],
                                      recipe.seed + index)
    if stage.data.max_samples:
        items = subsample(items, stage.data.max_samples, recipe.seed + index)
    cache = None
    if stage.feature_cache and stage.parts["tower"].mode == "frozen":
        fp = tower_fingerprint(model.config.tower, model.tower.preprocessor.to_dict(), model.tower)
        cache = FeatureCache(Path(recipe.output_dir) / "feature_cache", fp, rank=accelerator.process_index)
    visual = VisualLoader(model, stage.data.frames, stage.data.sampling, cache)
    cache_stats = precompute_features(model, items, visual, accelerator) if cache else None
    dataset = ConversationDataset(items, visual, model.encode_sample, model.num_visual_tokens(stage.data.frames))
    plan = BatchPlan([dataset.length(i) for i in range(len(dataset))], stage.batch_size, accelerator.num_processes,
                     accelerator.process_index, recipe.seed + index, stage.group_by_length)
    total = steps_for(len(plan), stage.grad_accum, stage.epochs, stage.max_steps)
    warmup = warmup_for(stage.schedule.warmup_steps, stage.schedule.warmup_ratio, total)

    optimizer = make_optimizer(model, stage)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, warmup, stage.schedule.min_lr_ratio))
    wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    ckpt_dir = stage_dir / "checkpoints"
    position = {"step": 0, "epoch": 0, "batch": 0, "skipped": 0}
    existing = list_checkpoints(ckpt_dir) if resume else []
    if existing:
        position = load_checkpoint(accelerator, wrapped, optimizer, scheduler, existing[-1], deepspeed)
        log.info("resumed stage %s from %s (step %d)", stage.name, existing[-1], position["step"])
    start_step = position["step"]
    metrics = MetricsLog(stage_dir / "metrics.jsonl", resume_step=start_step) if main else None
    skipped_log = open(stage_dir / "skipped.txt", "a", encoding="utf-8") if main else None
    if main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "stage.json").write_text(json.dumps({
            "recipe": recipe.source, "stage": index, "name": stage.name, "init_from": str(init_from) if init_from else None,
            "total_steps": total, "batches_per_epoch": len(plan), "processes": accelerator.num_processes,
            "deepspeed": stage.deepspeed, "feature_cache": cache_stats, "malformed_records": len(bad_records),
            "visual_tokens": model.num_visual_tokens(stage.data.frames),
            "trainable": {p: sum(x.numel() for x in ps) for p, ps in model.parameter_groups().items()},
        }, indent=2))

    wrapped.train()
    bar = tqdm(total=total, initial=position["step"], desc=f"stage {index + 1}/{len(recipe.stages)} {stage.name}",
               unit="step", disable=not accelerator.is_local_main_process)
    loss_sum, micro, t0, samples = 0.0, 0, time.time(), 0
    while position["step"] < total:
        batches = plan.epoch(position["epoch"])[position["batch"]:]
        # a generator of its own: creating the loader must not draw from the global RNG (exact resume)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=Collate(model),
                                             num_workers=stage.data.num_workers,
                                             generator=torch.Generator().manual_seed(recipe.seed + position["epoch"]))
        for batch, skipped in loader:
            if skipped:
                position["skipped"] += len(skipped)
                if skipped_log:
                    skipped_log.write("\n".join(skipped) + "\n")
                    skipped_log.flush()
            with accelerator.accumulate(wrapped):
                out = wrapped(batch.to(accelerator.device), objective=stage.objective)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    if stage.max_grad_norm and not deepspeed:
                        accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], stage.max_grad_norm)
                    lrs = {g.get("name", str(k)): g["lr"] for k, g in enumerate(optimizer.param_groups)}  # this step's
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            position["batch"] += 1
            loss_sum += float(out.loss.detach())
            micro += 1
            samples += len(batch) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            position["step"] += 1
            loss = float(accelerator.reduce(torch.tensor(loss_sum / micro, device=accelerator.device), "mean"))
            elapsed = time.time() - t0
            record = {"stage": stage.name, "step": position["step"], "epoch": position["epoch"], "loss": loss,
                      "lr": lrs, "samples_per_s": samples / max(elapsed, 1e-9), "skipped": position["skipped"]}
            if metrics and position["step"] % stage.log_every == 0:
                metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{max(lrs.values()):.2e}", sps=f"{record['samples_per_s']:.1f}")
            loss_sum, micro, t0, samples = 0.0, 0, time.time(), 0
            if stage.save_every and position["step"] % stage.save_every == 0 and position["step"] < total:
                save_checkpoint(accelerator, wrapped, optimizer, scheduler, position, ckpt_dir, stage.keep_last, deepspeed)
            if position["step"] >= total:
                break
        else:
            position["epoch"] += 1
            position["batch"] = 0
    bar.close()
    save_checkpoint(accelerator, wrapped, optimizer, scheduler, position, ckpt_dir, stage.keep_last, deepspeed)

    state = accelerator.get_state_dict(wrapped) if deepspeed else None  # gathers ZeRO-3 partitions
    final = stage_dir / "final"
    if main:
        inner = accelerator.unwrap_model(wrapped)
        inner.save_pretrained(final, state_dict=state)
        if stage.save == "connector":
            inner.save_connector(stage_dir / "connector", state_dict=state)
        metrics.close()
        skipped_log.close()
        summary = json.loads((stage_dir / "stage.json").read_text()) | {
            "skipped_samples": position["skipped"], "final": str(final),
            "seconds": round(time.time() - t_stage, 1),  # this run's wall time (feature cache included)
            "resumed_from_step": start_step}
        (stage_dir / "stage.json").write_text(json.dumps(summary, indent=2))
        if position["skipped"]:
            log.warning("stage %s: %d bad samples were skipped (listed in %s)", stage.name, position["skipped"],
                        stage_dir / "skipped.txt")
    accelerator.wait_for_everyone()
    del wrapped, optimizer, scheduler, model
    accelerator.free_memory()
    gc.collect()
    return final


def stage_dir_for(recipe: Recipe, index: int) -> Path:
    return Path(recipe.output_dir) / f"{index + 1}-{recipe.stages[index].name}"


def run_recipe(recipe: Recipe, only_stage: int | None = None, resume: bool = True) -> Path:
    """Run every stage (or one), each starting from the previous stage's `final`; finished stages are skipped.
    Writes the loss-curve PNG of all stages to `<output_dir>/loss_curves.png`."""
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2, default=str))
    previous: Path | None = None
    for i in range(len(recipe.stages)):
        sdir = stage_dir_for(recipe, i)
        final = sdir / "final"
        if only_stage is not None and i != only_stage:
            previous = final if final.is_dir() else previous
            continue
        if only_stage is None and resume and (final / "config.json").is_file():
            log.info("stage %d (%s) is already trained: %s", i + 1, recipe.stages[i].name, final)
            previous = final
            continue
        if i > 0 and previous is None:
            raise FileNotFoundError(f"stage {i + 1} starts from stage {i}'s output, which is missing: {stage_dir_for(recipe, i - 1) / 'final'}")
        previous = train_stage(recipe, i, previous, sdir, resume)
    if int(os.environ.get("RANK", "0")) == 0:
        link = out / "final"  # <output_dir>/final: the last trained stage's model
        if previous is not None:
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(previous.resolve().relative_to(out.resolve()))
        plot_loss_curves([(f"{i + 1}-{s.name}", stage_dir_for(recipe, i) / "metrics.jsonl") for i, s in enumerate(recipe.stages)],
                         out / "loss_curves.png")
    assert previous is not None
    return previous
