"""Word-slot heads against held-out per-frame annotations: does the connector name what is in the frame?

    vlm eval slots --model runs/quickstart/final --data demo_data/synth/regions_test.json --out OUT

For a model whose connector is `word_slots`, every record of `data` that carries `regions` (vlm.data.regions) is
read at the model's frames; the heads' choices are compared with the annotation nearest each frame. Metrics (in
percent): object-centre precision and recall over cells, and for each object attribute the accuracy at the cells
that truly hold an object (so a colour is scored even where the centre was missed), each scene attribute's
accuracy per frame, and what the LLM is given: `count_accuracy` (frames where as many objects are named as there
are, up to the connector's slots) and `named_precision` / `named_recall` (named objects whose identity, e.g.
"red circle", is one of the frame's, over those named / over those there). The numbers say whether the words the
LLM reads are right, separately from whether the LLM uses them (`vlm eval reliance`) and answers well (`vlm eval mcq`).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch

from evals.reliance import _sample_clip
from evals.results import EvalResult
from vlm.data.dataset import SourceSpec, load_mixture
from vlm.video.prefetch import prefetch_clips

log = logging.getLogger(__name__)


def slot_metrics(counts: dict[str, int]) -> dict[str, float]:
    """Percentages from summed `WordSlots.slot_counts`."""
    tp, fp, fn = (counts[k] for k in ("objects_true_positive", "objects_false_positive", "objects_missed"))
    out = {"object_precision": 100.0 * tp / max(1, tp + fp), "object_recall": 100.0 * tp / max(1, tp + fn)}
    if counts.get("frames"):
        out["count_accuracy"] = 100.0 * counts["frames_count_right"] / counts["frames"]
        out["named_precision"] = 100.0 * counts["named_right"] / max(1, counts["named"])
        out["named_recall"] = 100.0 * counts["named_right"] / max(1, counts["named_true"])
    for key in counts:
        if key.endswith("_correct"):
            name = key[: -len("_correct")]
            out[f"{name}_accuracy"] = 100.0 * counts[key] / max(1, counts[f"{name}_total"])
    return out


@torch.no_grad()
def evaluate_slots(model: Any, data: str | Path, out_dir: str | Path | None = None, *,
                   media_root: str | Path | None = None, limit: int | None = None, batch_size: int = 8,
                   model_name: str | None = None, workers: int = 2) -> EvalResult:
    """Score a `word_slots` connector's heads on the records of `data` that carry regions; records without usable
    regions and clips that fail to decode are skipped, counted and named (counts.skipped_reasons)."""
    connector = model.connector
    if not hasattr(connector, "slot_counts"):
        raise ValueError(f"{model_name or 'model'}: its connector ({type(connector).__name__}) has no slot heads; "
                         "`vlm eval slots` scores word_slots connectors")
    t0 = time.time()
    root = Path(media_root) if media_root else Path(data).parent
    items, bad = load_mixture([SourceSpec(str(data), str(root))])
    samples = []
    for it in items:
        problems = connector.region_problems(it.sample.extra.get("regions"))
        if problems:
            bad.append(f"{it.sample.location}: " + "; ".join(problems))
        elif it.sample.media_type == "video":
            samples.append(it.sample)
    samples = samples[:limit] if limit else samples
    frames, sampling = model.config.num_frames, model.config.sampling
    read = functools.partial(_sample_clip, root=root, num_frames=frames, sampling=sampling)
    totals: dict[str, int] = {}
    pending: list[tuple[Any, Any]] = []

    def run(batch: list[tuple[Any, Any]]) -> None:
        pixels, stamps = zip(*(model.processor.preprocess_clip(clip) for _, clip in batch))
        feats = model.tower_features(torch.stack(pixels), torch.stack(stamps))
        for key, value in connector.slot_counts(feats, [s.extra["regions"] for s, _ in batch]).items():
            totals[key] = totals.get(key, 0) + value

    scored = 0
    for s, clip, e in prefetch_clips(samples, read, workers=workers, ahead=batch_size):
        if e is not None:
            log.warning("slots: skipped %s: %s", s.location, e)
            bad.append(f"{s.location}: {e}")
            continue
        if pending and clip.frames.shape != pending[0][1].frames.shape:
            run(pending)
            pending = []
        pending.append((s, clip))
        scored += 1
        if len(pending) == batch_size:
            run(pending)
            pending = []
    if pending:
        run(pending)
    if not scored:
        raise ValueError(f"{data}: no clip with usable regions ({len(bad)} skipped; first: {bad[0] if bad else '-'})")
    result = EvalResult(
        task_type="slots", model=model_name or type(model).__name__, dataset={"path": str(data), "name": Path(data).stem},
        metrics=slot_metrics(totals),
        counts={"asked": scored + len(bad), "scored": scored, "skipped": len(bad), "skipped_reasons": bad,
                "cells": totals, "elapsed_seconds": time.time() - t0},
        settings={"num_frames": frames, "sampling": sampling, "threshold": connector.threshold},
    )
    if out_dir is not None:
        result.save(Path(out_dir) / "results.json")
    return result
