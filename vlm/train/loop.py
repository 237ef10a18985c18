"""The one training loop. A trainer (VLM stages, VideoMAE pretraining, classification) gives a model, an optimizer,
its data and a step function; the rest happens here, in explicit steps:

    accelerator, deepspeed = build_accelerator(spec)
    run = setup(spec, schedule, accelerator, deepspeed, model, optimizer, dataset, collate, plan, out)
    history = train(run, step, desc="...")      # then the trainer saves accelerator.unwrap_model(run.model)

A step is `grad_accum` micro-batches; gradients are clipped to `max_grad_norm` (DeepSpeed clips itself); each value
the step function returns ("loss" and any other) is logged as its mean over micro-batches and processes. `out`
receives metrics.jsonl, skipped.txt (the bad samples the data reported) and checkpoints/ (`vlm.train.resume`): a
run started again on the same folder continues exactly (weights, optimizer, schedule, RNG states, position).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from vlm.data.dataset import BatchPlan, steps_for
from vlm.train.metrics import MetricsLog
from vlm.train.resume import list_checkpoints, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
#: (model, batch, epoch, batch index in the epoch) -> {"loss": scalar tensor, other logged scalars}
StepFn = Callable[[nn.Module, Any, int, int], dict[str, torch.Tensor]]


@dataclass(kw_only=True)
class LoopSpec:
    """The loop's settings: a VLM stage, VideoMAE's `train:` and classification's `train:` all hold these."""

    batch_size: int = 8  # per process
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    precision: str = "bf16"  # fp32 | bf16 | fp16
    max_grad_norm: float = 1.0  # 0: no clipping
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    keep_last: int = 2
    log_every: int = 1

    def problems(self) -> list[str]:
        """What is wrong with the settings, each as 'field: reason'."""
        found = [f"precision '{self.precision}': choose fp32, bf16 or fp16"] if self.precision not in PRECISIONS else []
        found += [f"{name} must be >= 1" for name in ("batch_size", "grad_accum", "keep_last") if getattr(self, name) < 1]
        if self.max_steps is None and not self.epochs > 0:
            found.append("epochs: set epochs > 0 or max_steps")
        return found


def lr_lambda(total_steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup over `warmup` steps, then cosine decay to `min_ratio` of each group's lr."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)  # the first step already learns; the rate reaches 1 after warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


@dataclass(frozen=True)
class ScheduleSpec:
    """Linear warmup, then cosine decay to `min_lr_ratio` of each group's rate (1.0: a constant rate)."""

    warmup_ratio: float = 0.03  # of the run's optimizer steps, rounded up: a nonzero ratio never means 0 (LLaVA's 0.03)
    warmup_steps: int | None = None  # overrides warmup_ratio
    min_lr_ratio: float = 0.0

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        warmup = self.warmup_steps if self.warmup_steps is not None else math.ceil(self.warmup_ratio * total_steps)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, self.min_lr_ratio))


CONSTANT_LR = ScheduleSpec(warmup_ratio=0.0, min_lr_ratio=1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_accelerator(spec: LoopSpec, deepspeed: str | None = None) -> tuple[Any, bool]:
    """An Accelerator for the run (DeepSpeed when a config file is named) and whether DeepSpeed is on."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    AcceleratorState._reset_state()  # a new stage may switch between DDP and ZeRO (the process group stays)
    GradientState._reset_state()
    cuda = torch.cuda.is_available()
    if spec.precision == "fp16" and not cuda:
        raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[spec.precision]
    handlers: list[Any] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    if not cuda and (int(os.environ.get("WORLD_SIZE", "1")) > 1 or deepspeed):
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # CPU processes talk over gloo
    plugin = None
    if deepspeed:
        ds = json.loads(Path(deepspeed).read_text())
        ds["train_micro_batch_size_per_gpu"] = spec.batch_size
        ds["gradient_accumulation_steps"] = spec.grad_accum
        ds["gradient_clipping"] = spec.max_grad_norm
        ds["bf16"] = {"enabled": spec.precision == "bf16"}
        ds["fp16"] = {"enabled": spec.precision == "fp16"}
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
                              gradient_accumulation_steps=spec.grad_accum, kwargs_handlers=handlers)
    return accelerator, plugin is not None


@dataclass
class Run:
    """Everything the loop needs; `setup` builds it."""

    spec: LoopSpec
    accelerator: Any
    deepspeed: bool
    model: nn.Module  # prepared: DDP- or DeepSpeed-wrapped when there are several processes
    optimizer: Any
    scheduler: Any
    dataset: torch.utils.data.Dataset
    collate: Callable[[list[Any]], tuple[Any, list[str]]]  # samples -> (batch, or None if all bad; "location: reason"s)
    plan: BatchPlan
    total_steps: int
    out: Path
    num_workers: int = 0
    position: dict[str, int] = field(default_factory=lambda: {"step": 0, "epoch": 0, "batch": 0, "skipped": 0})
    resumed_from: int = 0  # the step of the checkpoint this run started from


def setup(spec: LoopSpec, schedule: ScheduleSpec, accelerator: Any, deepspeed: bool, model: nn.Module,
          optimizer: torch.optim.Optimizer, dataset: torch.utils.data.Dataset, collate: Callable[[list[Any]], Any],
          plan: BatchPlan, out: str | os.PathLike, num_workers: int = 0, resume: bool = True) -> Run:
    """Schedule the optimizer over the run's steps, prepare model, optimizer and schedule on the accelerator, create
    `out` and restore the newest checkpoint under `out/checkpoints` (unless resume=False)."""
    total = steps_for(len(plan), spec.grad_accum, spec.epochs, spec.max_steps)
    scheduler = schedule.scheduler(optimizer, total)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    run = Run(spec, accelerator, deepspeed, model, optimizer, scheduler, dataset, collate, plan, total, Path(out),
              num_workers)
    if accelerator.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
    existing = list_checkpoints(run.out / "checkpoints") if resume else []
    if existing:
        run.position = load_checkpoint(accelerator, model, optimizer, scheduler, existing[-1], deepspeed)
        run.resumed_from = run.position["step"]
        log.info("resumed from %s (step %d)", existing[-1], run.resumed_from)
    return run


def train(run: Run, step: StepFn, desc: str, tags: dict[str, Any] | None = None,
          progress: bool = True) -> list[dict[str, Any]]:
    """Train from the run's position to its last step, then checkpoint; returns this run's step records (each
    `tags` + step, epoch, the step's values, lr per group, samples_per_s, skipped)."""
    acc, spec, pos, model, optimizer = run.accelerator, run.spec, run.position, run.model, run.optimizer
    main = acc.is_main_process
    metrics = MetricsLog(run.out / "metrics.jsonl", resume_step=pos["step"]) if main else None
    skipped_log = open(run.out / "skipped.txt", "a", encoding="utf-8") if main else None
    ckpts = run.out / "checkpoints"
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    bar = tqdm(total=run.total_steps, initial=pos["step"], desc=desc, unit="step",
               disable=not (progress and acc.is_local_main_process))
    history: list[dict[str, Any]] = []
    sums: dict[str, float] = {}
    micro, samples, t0 = 0, 0, time.time()
    while pos["step"] < run.total_steps:
        batches = run.plan.epoch(pos["epoch"])[pos["batch"]:]
        # a generator of its own: creating the loader must not draw from the global RNG (exact resume)
        loader = torch.utils.data.DataLoader(run.dataset, batch_sampler=batches, collate_fn=run.collate,
                                             num_workers=run.num_workers,
                                             generator=torch.Generator().manual_seed(run.plan.seed + pos["epoch"]))
        for indices, (batch, skipped) in zip(batches, loader):
            index = pos["batch"]
            pos["batch"] += 1
            if skipped:
                pos["skipped"] += len(skipped)
                if skipped_log:
                    skipped_log.write("\n".join(skipped) + "\n")
                    skipped_log.flush()
            if batch is None:  # every sample of the batch was bad
                continue
            with acc.accumulate(model):
                values = step(model, batch, pos["epoch"], index)
                acc.backward(values["loss"])
                if acc.sync_gradients:
                    if spec.max_grad_norm and not run.deepspeed:
                        acc.clip_grad_norm_(trainable, spec.max_grad_norm)
                    lrs = {g.get("name", str(k)): g["lr"] for k, g in enumerate(optimizer.param_groups)}  # this step's
                optimizer.step()
                run.scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            micro += 1
            samples += len(indices) * acc.num_processes
            if not acc.sync_gradients:
                continue
            pos["step"] += 1
            means = acc.reduce(torch.tensor([s / micro for s in sums.values()], device=acc.device), "mean").tolist()
            record = {**(tags or {}), "step": pos["step"], "epoch": pos["epoch"], **dict(zip(sums, means)), "lr": lrs,
                      "samples_per_s": samples / max(time.time() - t0, 1e-9), "skipped": pos["skipped"]}
            history.append(record)
            if metrics and pos["step"] % spec.log_every == 0:
                metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{max(lrs.values()):.2e}", sps=f"{record['samples_per_s']:.1f}")
            sums, micro, samples, t0 = {}, 0, 0, time.time()
            if spec.save_every and pos["step"] % spec.save_every == 0 and pos["step"] < run.total_steps:
                save_checkpoint(acc, model, optimizer, run.scheduler, pos, ckpts, spec.keep_last, run.deepspeed)
            if pos["step"] >= run.total_steps:
                break
        else:
            pos["epoch"] += 1
            pos["batch"] = 0
    bar.close()
    save_checkpoint(acc, model, optimizer, run.scheduler, pos, ckpts, spec.keep_last, run.deepspeed)
    if main:
        metrics.close()
        skipped_log.close()
        if pos["skipped"]:
            log.warning("%s: %d bad samples were skipped (listed in %s)", desc, pos["skipped"], run.out / "skipped.txt")
    return history
