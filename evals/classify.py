"""Action classification with multi-view testing, and a linear probe on a frozen tower so it runs end to end.

Multi-view testing (the protocol of e.g. SlowFast / VideoMAE evaluation): each video is cut into `num_clips`
equal temporal windows, `num_frames` frames are sampled in each (`uniform` by default), and each clip is
cropped spatially into `num_crops` squares of the short side (1: the centre; 3: start, centre and end of the
long side). The classifier sees every view; the softmax probabilities of all views are averaged and the
top-1 / top-5 accuracy of the average is reported (top-k is a hit when the true class is among the k most
probable; k is capped at the number of classes). Each video is decoded once for all its views.

The evaluator takes any callable `classifier(clip: vlm.video.Clip) -> logits [C]` (a torch tensor or an
array), so a trained video-transformer head plugs in the same way as the probe here.

Data: JSONL (or a JSON list) of {"video", "label", ["label_id"]} with video paths relative to `root` (default:
the file's folder), and `classes.json` (a list of class names, index = label id) next to it or given; read by
`vlm.data.classification.load_classification`, the loader classification training uses too.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from evals.features import describe_tower, extract_features
from evals.results import EvalResult, PredictionLog
from vlm.data.classification import ClassItem
from vlm.towers.base import VisionTower
from vlm.train.loop import CONSTANT_LR, ScheduleSpec
from vlm.video import Clip, VideoReader, sample_indices
from vlm.video.prefetch import prefetch_clips

log = logging.getLogger(__name__)
Classifier = Callable[[Clip], Any]  # clip -> logits [C]


def spatial_crops(frames: np.ndarray, num_crops: int) -> list[np.ndarray]:
    """Square crops of the short side, uint8 [T, S, S, 3] each: 1 -> centre; 3 -> start, centre, end of the long side."""
    t, h, w, _ = frames.shape
    s = min(h, w)
    if num_crops == 1:
        offsets = [(max(h - s, 0) // 2, max(w - s, 0) // 2)]
    elif num_crops == 3:
        if w >= h:
            offsets = [(0, 0), (0, (w - s) // 2), (0, w - s)]
        else:
            offsets = [(0, 0), ((h - s) // 2, 0), (h - s, 0)]
    else:
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    return [frames[:, y : y + s, x : x + s] for y, x in offsets]


def multiview_clips(path: str | os.PathLike, *, num_frames: int = 8, num_clips: int = 1, num_crops: int = 1,
                    sampling: str = "uniform") -> list[Clip]:
    """num_clips x num_crops views of one video, decoded in one pass (clip-major order)."""
    with VideoReader(path) as video:
        info = video.info
        duration = info.num_frames / info.fps
        windows = [(None, None)] if num_clips == 1 else [
            (duration * k / num_clips, duration * (k + 1) / num_clips) for k in range(num_clips)]
        per_window = [sample_indices(info.num_frames, info.fps, num_frames, sampling, a, b) for a, b in windows]
        whole = video.get(np.concatenate(per_window))  # one decode for every view
    views = []
    for k, idx in enumerate(per_window):
        sl = slice(k * num_frames, k * num_frames + len(idx))
        for crop in spatial_crops(whole.frames[sl], num_crops):
            views.append(Clip(np.ascontiguousarray(crop), whole.timestamps[sl], whole.indices[sl], whole.source,
                              whole.fps, whole.num_frames_total))
    return views


def evaluate_classification(
    classifier: Classifier,
    items: Sequence[ClassItem],
    classes: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    num_frames: int = 8,
    num_clips: int = 1,
    num_crops: int = 1,
    sampling: str = "uniform",
    model_name: str = "classifier",
    dataset: str = "",
    progress: bool = True,
    workers: int = 2,
) -> EvalResult:
    """Top-1 / top-5 of the view-averaged softmax; predictions logged per video (resumable); `workers` processes
    decode videos ahead of the classifier (0: in this process)."""
    out = Path(out_dir)
    plog = PredictionLog(out / "predictions.jsonl", identity={"model": model_name,
                                                             "views": f"{num_clips}x{num_crops}x{num_frames}"})
    k5 = min(5, len(classes))
    t0 = time.perf_counter()
    with plog:
        todo = [i for i in items if not plog.done(i.uid)]
        read = functools.partial(_item_views, num_frames=num_frames, num_clips=num_clips, num_crops=num_crops,
                                 sampling=sampling)
        for item, views, e in tqdm(prefetch_clips(todo, read, workers=workers), total=len(todo), desc="classify",
                                   unit="video", disable=not progress):
            if e is not None:
                log.warning("classify: skipping %s: %s", item.video, e)
                plog.write({"uid": item.uid, "video": str(item.video), "error": f"decode: {e}"})
                continue
            logits = _view_logits(classifier, views)  # [V, C]
            if logits.shape[1] != len(classes):
                raise ValueError(f"classifier returned {logits.shape[1]} logits for {len(classes)} classes")
            probs = F.softmax(logits, dim=-1).mean(0)  # [C]
            top = probs.topk(k5).indices.tolist()
            plog.write({"uid": item.uid, "video": str(item.video), "label_id": item.label_id, "top": top,
                        "top_probs": [round(float(probs[i]), 6) for i in top], "correct1": top[0] == item.label_id,
                        "correct5": item.label_id in top, "views": len(views)})
    records = plog.select(i.uid for i in items)
    scored = [r for r in records if not r.get("error")]
    per_class: dict[str, dict[str, Any]] = {}
    for cid, name in enumerate(classes):
        rs = [r for r in scored if r["label_id"] == cid]
        per_class[name] = {"accuracy": 100.0 * sum(r["correct1"] for r in rs) / len(rs) if rs else None, "videos": len(rs)}
    with_videos = [v["accuracy"] for v in per_class.values() if v["accuracy"] is not None]
    metrics = {"top1": 100.0 * sum(r["correct1"] for r in scored) / len(scored) if scored else None,
               f"top{k5}": 100.0 * sum(r["correct5"] for r in scored) / len(scored) if scored else None,
               "mean_class_accuracy": sum(with_videos) / len(with_videos) if with_videos else None}
    result = EvalResult(
        task_type="classify", model=model_name, dataset={"name": dataset or "classification", "classes": len(classes)},
        metrics=metrics, per_task=per_class,
        counts={"videos": len(items), "scored": len(scored), "skipped": len(items) - len(scored),
                "resumed": plog.resumed, "elapsed_seconds": round(time.perf_counter() - t0, 3)},
        settings={"num_frames": num_frames, "num_clips": num_clips, "num_crops": num_crops, "sampling": sampling,
                  "views": num_clips * num_crops, "aggregation": "mean of per-view softmax", "top_k": [1, k5]},
    )
    result.save(out / "results.json")
    from evals.report import write_report

    write_report([result], out)
    return result


def _item_views(item: ClassItem, **views: Any) -> list[Clip]:
    return multiview_clips(item.video, **views)


def _view_logits(classifier: Classifier, views: Sequence[Clip]) -> torch.Tensor:
    rows = []
    for v in views:
        out = classifier(v)
        rows.append((out if torch.is_tensor(out) else torch.as_tensor(np.asarray(out))).detach().float().view(-1).cpu())
    return torch.stack(rows)  # [V, C]


# ---------------------------------------------------------------------- linear probe on a frozen tower
class LinearProbe(nn.Module):
    """Standardised features -> linear classifier. mean/std are buffers fitted on the training features."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear((feats - self.mean) / self.std)


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, steps: int = 300,
                     lr: float = 1e-2, weight_decay: float = 1e-3, seed: int = 0,
                     schedule: ScheduleSpec = CONSTANT_LR) -> LinearProbe:
    """Full-batch AdamW on cross-entropy over features [N, D] with integer labels [N], its rate following the
    training loop's warmup + cosine `schedule` (default: constant)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = LinearProbe(features.shape[1], num_classes)
    probe.mean.copy_(features.mean(0))
    probe.std.copy_(features.std(0).clamp(min=1e-6) if features.shape[0] > 1 else torch.ones(features.shape[1]))
    opt = torch.optim.AdamW(probe.linear.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = schedule.scheduler(opt, steps)
    for _ in range(steps):
        loss = F.cross_entropy(probe(features), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        scheduler.step()
    probe.eval()
    log.info("linear probe: final training loss %.4f, training accuracy %.1f%%", float(loss.detach()),
             100.0 * float((probe(features).argmax(1) == labels).float().mean()))
    return probe


class ProbeClassifier:
    """clip -> logits: the frozen tower's space- and time-pooled tokens through a fitted LinearProbe."""

    def __init__(self, tower: VisionTower, probe: LinearProbe):
        self.tower, self.probe = tower, probe

    @torch.no_grad()
    def __call__(self, clip: Clip) -> torch.Tensor:
        from evals.features import clip_features

        feats = clip_features(self.tower, [clip]).mean(dim=1)  # [1, D]
        return self.probe(feats)[0]


def train_probe(tower: VisionTower, items: Sequence[ClassItem], num_classes: int, *, num_frames: int = 8,
                cache: str | os.PathLike | None = None, tower_spec: Any = None, steps: int = 300,
                progress: bool = True, workers: int = 2) -> ProbeClassifier:
    """Fit a linear probe on one centre view per training video (frozen tower features, cached if `cache`)."""
    feats, index, errors = extract_features(tower, [i.video for i in items], num_frames=num_frames, cache=cache,
                                            tower_id=describe_tower(tower, tower_spec), progress=progress,
                                            workers=workers)
    if errors:
        log.warning("linear probe: %d training videos skipped (undecodable)", len(errors))
    labels = torch.tensor([items[i].label_id for i in index])
    probe = fit_linear_probe(feats.mean(dim=1), labels, num_classes, steps=steps)
    return ProbeClassifier(tower, probe)
