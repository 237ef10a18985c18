"""Word-slot heads against held-out per-frame annotations: does the connector name what is in the frame?

    vlm eval slots --model runs/quickstart/final --data demo_data/synth/regions_test.json --out OUT

For a model whose connector is `word_slots`, every record of `data` that carries `regions` (vlm.data.regions) is
read at the model's frames; the heads' choices are compared with the annotation nearest each frame. Metrics (in
percent): object-centre precision and recall over cells, and for each object attribute the accuracy at the cells
that truly hold an object (so a colour is scored even where the centre was missed), each scene attribute's
accuracy per frame, and what the LLM is given: `count_accuracy` (frames where as many objects are named as there
are, up to the connector's slots) and `named_precision` / `named_recall` (named objects whose identity, e.g.
"red circle", is one of the frame's, over those named / over those there). Over time: the changes the heads'
detections tell once linked into tracks (an object starts or stops moving, bounces, turns green, appears; the story
layout's events, `vlm.connectors.story.timeline`, named by the connector's `events` rules) against those the
annotations tell the same way: `event_precision` / `event_recall` (the same change of the same object in the same
frame), `event_recall_near` (within one frame), `clips_events_right` (clips whose changes are all said, and only
they, in the right frames) and `clips_order_right` (in the right order, times aside); `per_task` holds, per kind of
change (appears, disappears, background, each rule's words), how many are true, said, missed and invented. The
numbers say whether the words the LLM reads are right, separately from whether the LLM uses them (`vlm eval
reliance`) and answers well (`vlm eval mcq`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch

from evals.reliance import _sample_clip
from evals.results import EvalResult
from vlm.connectors.story import timeline
from vlm.connectors.tracks import linking
from vlm.connectors.truth import true_detected
from vlm.data.dataset import SourceSpec, load_mixture
from vlm.data.regions import nearest_frames
from vlm.video.prefetch import prefetch_clips

log = logging.getLogger(__name__)


def slot_metrics(counts: dict[str, int]) -> dict[str, float]:
    """Percentages from summed `slot_counts` and `event_counts`."""
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
    if counts.get("centre_error_total"):
        out["centre_error_cells"] = counts["centre_error_milli"] / 1000 / counts["centre_error_total"]
    if counts.get("clips"):
        out["event_precision"] = 100.0 * counts["events_right"] / max(1, counts["events_said"])
        out["event_recall"] = 100.0 * counts["events_right"] / max(1, counts["events_true"])
        out["event_recall_near"] = 100.0 * counts["events_near"] / max(1, counts["events_true"])
        out["clips_events_right"] = 100.0 * counts["clips_events_right"] / counts["clips"]
        out["clips_order_right"] = 100.0 * counts["clips_order_right"] / counts["clips"]
    return out


def slot_counts(connector: Any, feats: Any, regions: list[Any]) -> dict[str, int]:
    """What the heads get right against the annotations, as counts to sum over batches: object centres found
    (true/false positives, misses), each object attribute right at the true centres, each scene attribute, and
    what the LLM is given per frame: whether as many objects are named as there are (up to `slots`), and how
    many named objects' identities (their object attributes' words together) match one of the frame's; and over
    time, `event_counts`. `connector`: a `word_slots` connector; `feats`: the tower's, before the reducers."""
    feats = connector.reduced(feats)
    target = connector.slot_targets(feats, regions)
    found, objects, scenes, offsets = connector.split_logits(feats, with_offsets=True)
    pred, real = found.sigmoid() > connector.threshold, target["found"] > 0
    counts = {"objects_true_positive": int((pred & real).sum()), "objects_false_positive": int((pred & ~real).sum()),
              "objects_missed": int((~pred & real).sum())}
    if offsets is not None:  # how far (cells, x 1000) the predicted centre lies from the true one, at the true cells
        miss = (offsets[real].float() - target["offset"][real]).norm(dim=-1)
        counts |= {"centre_error_milli": int(1000 * miss.sum()), "centre_error_total": int(real.sum())}
    for name, logits, y in zip(connector.object_vocab, objects, target["objects"]):
        counts[f"{name}_correct"] = int((logits.argmax(-1)[real] == y[real]).sum())
        counts[f"{name}_total"] = int(real.sum())
    if connector.motion_vocab and bool(real.any()):
        b, t, c = real.nonzero(as_tuple=True)
        for name, logits, y in zip(connector.motion_vocab, connector.motion_logits(feats, b, t, c),
                                   target["objects"][len(connector.object_vocab):]):
            counts[f"{name}_correct"] = int((logits.argmax(-1) == y[b, t, c]).sum())
            counts[f"{name}_total"] = int(real.sum())
    for name, logits, y in zip(connector.scene_vocab, scenes, target["scene"]):
        counts[f"{name}_correct"] = int((logits.argmax(-1) == y).sum())
        counts[f"{name}_total"] = y.numel()
    detected = connector.detect(feats, scores=connector.switch_cost > 0)  # read once: named counts and events
    keep, attrs = detected[2].cpu(), detected[3].cpu()
    ni = len(connector.object_vocab)
    named_counts = {"frames": 0, "frames_count_right": 0, "named_right": 0, "named": 0, "named_true": 0}
    for i, clip in enumerate(regions):
        for j, frame in enumerate(nearest_frames(clip, feats.timestamps[i].tolist())):
            truth = Counter(tuple(obj[a] for a in connector.object_vocab) for obj in frame.get("objects", []))
            named = Counter(tuple(connector.words[x] for x in a[:ni].tolist()) for a, kept in zip(attrs[i, j], keep[i, j]) if kept)
            named_counts["frames"] += 1
            named_counts["frames_count_right"] += int(sum(named.values()) == min(connector.slots, sum(truth.values())))
            named_counts["named_right"] += sum((named & truth).values())
            named_counts["named"] += sum(named.values())
            named_counts["named_true"] += min(connector.slots, sum(truth.values()))
    return counts | named_counts | event_counts(connector, feats, regions, detected)


def matched_events(said: Sequence[tuple], true: Sequence[tuple], within: int) -> int:
    """How many of the `true` (frame, event, ...) tuples a `said` one matches: the same event at most `within`
    frames away, each said one used once (the nearest first)."""
    free, hits = list(said), 0
    for k, event, *_ in true:
        near = [(abs(j - k), i) for i, (j, e, *_) in enumerate(free) if e == event and abs(j - k) <= within]
        if near:
            free.pop(min(near)[1])
            hits += 1
    return hits


def event_counts(connector: Any, feats: Any, regions: list[Any], detected: tuple | None = None) -> dict[str, int]:
    """The changes over time the heads' detections tell against those the annotations tell (both through the story
    layout's `timeline`, with the connector's event rules), as counts to sum over batches, with per kind of change
    ("kind/<kind>/true", ".../said", ".../near": matched within one frame). `feats`: after the reducers, with
    timestamps; `detected`: the heads' `detect(feats, ...)` when already computed."""
    seen = connector.detections(feats, detected)
    truth = connector.detections(feats, true_detected(connector, regions, feats.timestamps, feats.grid))
    rules, extent, tracks = connector.events, connector.event_extent, 2 * connector.slots
    counts = dict.fromkeys(("clips", "events_said", "events_true", "events_right", "events_near",
                            "clips_events_right", "clips_order_right"), 0)
    with linking(connector.link_motion):  # the tracks the connector's own text is written from
        stories = [[timeline(*clip, rules, extent, tracks)[3] for clip in pair] for pair in zip(seen, truth)]
    for said, true in stories:
        counts["clips"] += 1
        counts["events_said"] += len(said)
        counts["events_true"] += len(true)
        counts["events_right"] += matched_events(said, true, 0)
        counts["events_near"] += matched_events(said, true, 1)
        counts["clips_events_right"] += int(sorted(said) == sorted(true))
        counts["clips_order_right"] += int([e.text for e in sorted(said)] == [e.text for e in sorted(true)])
        for kind in {e.kind for e in said + true}:
            mine, real_k = [e for e in said if e.kind == kind], [e for e in true if e.kind == kind]
            for key, n in (("true", len(real_k)), ("said", len(mine)), ("near", matched_events(mine, real_k, 1))):
                counts[f"kind/{kind}/{key}"] = counts.get(f"kind/{kind}/{key}", 0) + n
    return counts


def events_by_kind(totals: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per kind of change (from `event_counts`' "kind/..." counts, removed from `totals`): how many the annotations
    tell (`true`), the heads tell (`said`), the true ones the heads miss (`missed`: not told within one frame) and
    those the heads invent (`invented`: not true within one frame); most frequent first."""
    kinds: dict[str, dict[str, int]] = {}
    for key in [k for k in totals if k.startswith("kind/")]:
        kind, what = key[len("kind/"):].rsplit("/", 1)
        kinds.setdefault(kind, {})[what] = totals.pop(key)
    table = {k: {"true": v.get("true", 0), "said": v.get("said", 0), "missed": v.get("true", 0) - v.get("near", 0),
                 "invented": v.get("said", 0) - v.get("near", 0)} for k, v in kinds.items()}
    return dict(sorted(table.items(), key=lambda kv: (-kv[1]["true"] - kv[1]["said"], kv[0])))


@torch.no_grad()
def evaluate_slots(model: Any, data: str | Path, out_dir: str | Path | None = None, *,
                   media_root: str | Path | None = None, limit: int | None = None, batch_size: int = 8,
                   model_name: str | None = None, workers: int = 2) -> EvalResult:
    """Score a `word_slots` connector's heads on the records of `data` that carry regions; records without usable
    regions and clips that fail to decode are skipped, counted and named (counts.skipped_reasons)."""
    connector = model.connector
    if not hasattr(connector, "slot_targets"):
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
        regions = [s.extra["regions"] for s, _ in batch]
        counts = slot_counts(connector, feats, regions)
        for key, value in counts.items():
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
    kinds = events_by_kind(totals)
    result = EvalResult(
        task_type="slots", model=model_name or type(model).__name__, dataset={"path": str(data), "name": Path(data).stem},
        metrics=slot_metrics(totals), per_task=kinds,
        counts={"asked": scored + len(bad), "scored": scored, "skipped": len(bad), "skipped_reasons": bad,
                "cells": totals, "elapsed_seconds": time.time() - t0},
        settings={"num_frames": frames, "sampling": sampling, "threshold": connector.threshold},
    )
    if out_dir is not None:
        result.save(Path(out_dir) / "results.json")
    return result
