"""VLM training stages on the shared training loop (`vlm.train.loop`), single-process, DDP or DeepSpeed ZeRO-2/3.

    run_recipe(recipe)                      every stage in order, each starting from the previous one's output
      train_stage(recipe, i, init_from)     one stage: setup_stage -> loop -> save
        setup_stage(...)                    model, accelerator, data (+ feature cache), optimizer, schedule, resume
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vlm.data.conversation import resolve_media
from vlm.data.dataset import BatchPlan, ConversationDataset, MixtureItem, load_mixture, subsample
from vlm.data.stream import is_streamed, streamed_data
from vlm.llm.packing import enable_packing
from vlm.model import PARTS, SETTINGS, VideoLLM
from vlm.objectives import reads_text
from vlm.processor import clip_pixels
from vlm.train.feature_cache import FeatureCache, clip_key, tower_fingerprint
from vlm.train.loop import Run, build_accelerator, setup, train
from vlm.train.metrics import plot_loss_curves
from vlm.train.recipe import Recipe, StageSpec
from vlm.video import read_clip
from vlm.video.errors import VideoDecodeError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- setup
def make_optimizer(model: VideoLLM, stage: StageSpec) -> torch.optim.Optimizer:
    """AdamW with one group per trainable part, at the stage's rate and weight decay for that part."""
    groups = []
    for part, params in model.parameter_groups().items():
        if params:
            spec = stage.parts[part]
            groups.append({"params": params, "lr": spec.lr, "weight_decay": spec.weight_decay, "name": part})
    if not groups:
        raise ValueError(f"stage '{stage.name}': no trainable parameters")
    return torch.optim.AdamW(groups, betas=(0.9, 0.999))


def changed_settings(model: VideoLLM, block: dict[str, Any]) -> dict[str, Any]:
    """The settings (`vlm.model.SETTINGS`) in a model config mapping that differ from `model`'s: each top-level one
    given, and the connector's keys one by one (any key that differs, a setting or not: `apply_settings` refuses the
    ones that change the weights)."""
    changed = {k: block[k] for k in SETTINGS if k != "connector" and k in block and block[k] != getattr(model.config, k)}
    connector = {k: v for k, v in (block.get("connector") or {}).items() if model.config.connector.get(k) != v}
    return changed | ({"connector": connector} if connector else {})


def recipe_settings(recipe: Recipe, model: VideoLLM) -> dict[str, Any]:
    """The settings (config fields that change no weights) a stage's starting model takes from the recipe: all of
    the model block when the recipe starts from a saved model (`init_from`); otherwise those of the recipe's
    model that differ from the previous stage's saved config (a recipe edited after that stage finished: the
    stage is reused, the edit is not lost)."""
    if recipe.init_from is not None:
        return recipe.model
    changed = changed_settings(model, recipe.model)
    connector = {k: v for k, v in changed.pop("connector", {}).items() if k in model.connector.settings}
    if connector:
        changed["connector"] = connector
    if changed:
        log.info("the recipe changes settings of the previous stage's model: %s", changed)
    return changed


def stage_model(recipe: Recipe, index: int, init_from: Path | None) -> VideoLLM:
    """Stage `index`'s starting model (the previous stage's output, or built from the recipe with the stage's
    seed) with its modes set."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # The model is built whole before DeepSpeed is set up: a previous ZeRO-3 stage must not make transformers
    # build it partitioned (saved parts are loaded into full tensors; DeepSpeed partitions at prepare()).
    unset_hf_deepspeed_config()
    stage = recipe.stages[index]
    torch.manual_seed(recipe.seed + index)
    if init_from is None:
        model = VideoLLM.from_config(recipe.model_config())
    else:
        model = VideoLLM.from_pretrained(init_from)
        model.apply_settings(recipe_settings(recipe, model))
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
        self.distinct = model.processor.distinct_frames  # a repeated frame read once, as the model reads clips
        self.frames = frames
        self.policy = policy
        self.cache = cache
        self.bad: dict[str, str] = {}

    def clip_args(self, sample: Any) -> tuple[int, str, float | None, float | None]:
        frames = 1 if sample.media_type == "image" else self.frames
        return frames, self.policy, sample.extra.get("start"), sample.extra.get("end")

    def cache_key(self, path: Path, sample: Any) -> str:
        """The feature-cache key of a sample's clip as this loader reads it (precompute and lookup both use it)."""
        return clip_key(path, *self.clip_args(sample), self.distinct)

    def decode(self, path: Path, sample: Any) -> dict[str, Any]:
        frames, policy, start, end = self.clip_args(sample)
        clip = read_clip(path, frames, policy, start, end)
        return dict(zip(("pixel_values", "timestamps"), clip_pixels(self.preprocessor, clip, self.distinct)))

    def __call__(self, path: Path, sample: Any) -> dict[str, Any]:
        if self.cache is None:
            return self.decode(path, sample)
        key = self.cache_key(path, sample)
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
    for it in items:
        s = it.sample
        if s.media:
            try:
                path = resolve_media(it.media_root, s.media, s.location)
                key = loader.cache_key(path, s)
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
        return self.model.processor.collate(items), skipped


@dataclass
class StageData:
    """What a stage trains on: its mixture, how clips (or cached features) are read, the dataset, the batches."""

    items: list[MixtureItem]
    bad_records: list[str]  # malformed records left out of the mixture
    visual: VisualLoader
    dataset: ConversationDataset
    plan: BatchPlan
    cache_stats: dict[str, int] | None = None  # what the feature-cache precompute did (None: no cache)


def stage_data(recipe: Recipe, index: int, model: VideoLLM, rank: int = 0, world_size: int = 1,
               cache_dir: Path | None = None) -> StageData:
    """Stage `index`'s data for process `rank` of `world_size`; with the tower frozen and `feature_cache` on, clips
    are read from the feature cache under `cache_dir` (default `<output_dir>/feature_cache`)."""
    stage = recipe.stages[index]
    seed = recipe.seed + index
    tokens = model.num_visual_tokens(stage.data.frames)
    encode = model.processor.encode_sample if reads_text(stage.objective) else \
        functools.partial(model.processor.encode_sample, text=False)
    if is_streamed(stage.data.mixture):  # read while training runs: no feature cache, no grouping by length
        visual = VisualLoader(model, stage.data.frames, stage.data.sampling)
        dataset, plan = streamed_data(stage.data.mixture, visual, encode, stage.batch_size,
                                      world_size, rank, seed, tokens)
        return StageData([], [], visual, dataset, plan)
    items, bad_records = load_mixture(stage.data.mixture, seed)
    if stage.objective == "slots":  # records without usable per-frame annotations are left out, each reported
        items, dropped = with_regions(items, model)
        bad_records += dropped
    if stage.data.max_samples:
        items = subsample(items, stage.data.max_samples, seed)
    cache = None
    if stage.feature_cache and stage.parts["tower"].mode == "frozen":
        fp = tower_fingerprint(model.config.tower, model.tower.preprocessor.to_dict(), model.tower)
        cache = FeatureCache(cache_dir or Path(recipe.output_dir) / "feature_cache", fp, rank=rank)
    visual = VisualLoader(model, stage.data.frames, stage.data.sampling, cache)
    dataset = ConversationDataset(items, visual, encode, tokens)
    plan = BatchPlan([dataset.length(i) for i in range(len(dataset))], stage.batch_size, world_size, rank, seed,
                     stage.group_by_length, window=stage.group_window)
    return StageData(items, bad_records, visual, dataset, plan)


def written_lengths(model: VideoLLM, data: StageData, show: bool = True) -> list[int]:
    """Each item's visual token count as the stage's frozen connector writes it from the cached features: a word
    connector's story is as long as its clip has changes to tell. An item whose clip cannot be read keeps the
    stage's estimate (the stage skips and reports it when it is drawn)."""
    counts = []
    with torch.no_grad():
        for it in tqdm(data.items, desc="visual lengths", unit="clip", disable=not show):
            n = data.dataset.visual_tokens
            if it.sample.media:
                try:
                    v = data.visual(resolve_media(it.media_root, it.sample.media, it.sample.location), it.sample)
                except (VideoDecodeError, OSError, ValueError):
                    counts.append(n)
                    continue
                out = model.encode_visual([], [v["timestamps"]], features=[v["features"]], grids=[v["grid"]])
                n = out.embeds.shape[1] if out.mask is None else int(out.mask.sum())
            counts.append(n)
    return counts


def with_regions(items: list[MixtureItem], model: VideoLLM) -> tuple[list[MixtureItem], list[str]]:
    """The items whose records carry `regions` the connector can learn from, and a reason for each other one."""
    check = getattr(model.connector, "region_problems", None)
    if check is None:
        raise ValueError(f"objective 'slots' trains a connector with slot heads (word_slots), not {type(model.connector).__name__}")
    kept, dropped = [], []
    for it in items:
        problems = check(it.sample.extra.get("regions"))
        if problems:
            dropped.append(f"{it.sample.location} (id {it.sample.id}): " + "; ".join(problems))
            log.warning("left out of the 'slots' stage: %s", dropped[-1])
        else:
            kept.append(it)
    return kept, dropped


def setup_stage(recipe: Recipe, index: int, init_from: Path | None, stage_dir: Path,
                resume: bool = True) -> tuple[Run, StageData]:
    """Everything stage `index` trains with: its model, accelerator, data (the feature cache filled first), optimizer
    and schedule, prepared and resumed from the newest checkpoint in `stage_dir` (unless resume=False)."""
    stage = recipe.stages[index]
    model = stage_model(recipe, index, init_from)
    accelerator, deepspeed = build_accelerator(stage, stage.deepspeed)
    if stage.padding_free:
        enable_packing(model.llm)  # before the first step: a stage that cannot pack fails here, with the reason
    data = stage_data(recipe, index, model, accelerator.process_index, accelerator.num_processes)
    if data.visual.cache is not None:
        data.cache_stats = precompute_features(model, data.items, data.visual, accelerator)
        # a frozen connector's own lengths, where grouping changes which samples share a batch (one process sorting
        # one global batch at a time does not)
        regroups = stage.group_window > 1 or accelerator.num_processes > 1
        if stage.group_by_length and regroups and stage.parts["connector"].mode == "frozen":
            data.dataset.visual_tokens = written_lengths(model, data, accelerator.is_local_main_process)
            data.plan = BatchPlan([data.dataset.length(i) for i in range(len(data.dataset))], stage.batch_size,
                                  data.plan.world_size, data.plan.rank, data.plan.seed, window=stage.group_window)
    run = setup(stage, stage.schedule, accelerator, deepspeed, model, make_optimizer(model, stage), data.dataset,
                Collate(model), data.plan, stage_dir, stage.data.num_workers, resume)
    return run, data


def train_stage(recipe: Recipe, index: int, init_from: Path | None, stage_dir: Path, resume: bool = True) -> Path:
    """Train stage `index` into `stage_dir`; returns the saved model folder (`stage_dir/final`)."""
    stage = recipe.stages[index]
    t_stage = time.time()
    run, data = setup_stage(recipe, index, init_from, stage_dir, resume)
    accelerator = run.accelerator
    model = accelerator.unwrap_model(run.model)
    main = accelerator.is_main_process
    if main:
        (stage_dir / "stage.json").write_text(json.dumps({
            "recipe": recipe.source, "stage": index, "name": stage.name, "init_from": str(init_from) if init_from else None,
            "total_steps": run.total_steps, "batches_per_epoch": len(data.plan), "processes": accelerator.num_processes,
            "deepspeed": stage.deepspeed, "padding_free": stage.padding_free, "feature_cache": data.cache_stats,
            "malformed_records": len(data.bad_records),
            "visual_tokens": model.num_visual_tokens(stage.data.frames),
            "trainable": {p: sum(x.numel() for x in ps) for p, ps in model.parameter_groups().items()},
        }, indent=2))

    def step(net: torch.nn.Module, batch: Any, epoch: int, batch_index: int) -> dict[str, torch.Tensor]:
        return {"loss": net(batch.to(accelerator.device), objective=stage.objective,
                            padding_free=stage.padding_free).loss}

    train(run, step, f"stage {index + 1}/{len(recipe.stages)} {stage.name}", tags={"stage": stage.name})
    state = accelerator.get_state_dict(run.model) if run.deepspeed else None  # gathers ZeRO-3 partitions
    final = stage_dir / "final"
    if main:
        model.save_pretrained(final, state_dict=state)
        if stage.save == "connector":
            model.save_connector(stage_dir / "connector", state_dict=state)
        summary = json.loads((stage_dir / "stage.json").read_text()) | {
            "skipped_samples": run.position["skipped"], "final": str(final),
            "seconds": round(time.time() - t_stage, 1),  # this run's wall time (feature cache included)
            "resumed_from_step": run.resumed_from}
        (stage_dir / "stage.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    del run, data, model
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
    previous: Path | None = None if recipe.init_from is None else Path(recipe.init_from)
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
