"""Visual reliance: does a model look at the video? Answer loss with each sample's own video vs another's.

For held-out conversations (LLaVA format), every sample's assistant-token loss is computed twice: with its own
clip, and with the clip of the next sample in a fixed shuffle whose video differs (a derangement). A model that
ignores the frames scores both the same (gap 0, "own video preferred" 50%); a grounded model's loss is lower with
its own video. This separates "learned the language of the data" from "learned to see", which a falling
training loss or an accuracy near chance cannot.

    vlm eval reliance --model runs/quickstart/final --data demo_data/synth/instruct_test.json --out OUT

Results (the common schema, task_type "reliance"): metrics `loss_own`, `loss_swapped` (nats per answer token,
mean over samples), `gap` (swapped - own), `gap_stderr`, `gap_percent` (of loss_swapped) and
`own_preferred_percent` (samples whose own video gives the lower loss; ties count half); per_task: the same per
sample kind (the id's suffix after the last "_", digits dropped: c000123_mcq1 -> mcq).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from evals.results import EvalResult
from vlm.data.conversation import resolve_media
from vlm.data.dataset import SourceSpec, load_mixture
from vlm.llm.template import TemplateMismatchError
from vlm.video.clip import Clip
from vlm.video.decode import read_clip
from vlm.video.prefetch import prefetch_clips

log = logging.getLogger(__name__)


def _kind(sample_id: str) -> str:
    return sample_id.rsplit("_", 1)[-1].rstrip("0123456789") or "sample"


def _summary(own: list[float], swapped: list[float]) -> dict[str, Any]:
    n = len(own)
    gaps = [s - o for o, s in zip(own, swapped)]
    mean_gap = sum(gaps) / n
    var = sum((g - mean_gap) ** 2 for g in gaps) / max(1, n - 1)
    loss_swapped = sum(swapped) / n
    return {"samples": n, "loss_own": sum(own) / n, "loss_swapped": loss_swapped, "gap": mean_gap,
            "gap_stderr": math.sqrt(var / n), "gap_percent": 100.0 * mean_gap / loss_swapped if loss_swapped else 0.0,
            "own_preferred_percent": 100.0 * sum(1.0 if g > 0 else 0.5 if g == 0 else 0.0 for g in gaps) / n}


def _sample_clip(s: Any, root: Path, num_frames: int, sampling: str) -> Clip:
    path = resolve_media(root, s.media, s.location)
    return read_clip(path, num_frames, sampling, s.extra.get("start"), s.extra.get("end"))


@torch.no_grad()
def visual_reliance(model: Any, data: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                    media_root: str | os.PathLike | None = None, limit: int = 64, num_frames: int | None = None,
                    sampling: str = "uniform", seed: int = 0, model_name: str | None = None,
                    workers: int = 2) -> EvalResult:
    """Own-video vs swapped-video answer loss on up to `limit` video samples of `data` (a deterministic shuffle
    by `seed`). `model` needs a `processor` (`make_sample`, `build_batch`) and a forward returning `.loss` (VideoLLM has them).
    Malformed records, clips that fail to decode and samples whose chat template does not match the tokenizer
    are skipped, counted and named (counts.skipped_reasons). `workers` processes decode clips ahead (0: here)."""
    t0 = time.time()
    root = Path(media_root) if media_root else Path(data).parent
    items, bad = load_mixture([SourceSpec(str(data), str(root))])  # every record once; malformed ones listed
    samples = [it.sample for it in items if it.sample.media_type == "video"]
    random.Random(seed).shuffle(samples)
    frames = num_frames or getattr(getattr(model, "config", None), "num_frames", 16)
    kept, clips = [], []
    read = functools.partial(_sample_clip, root=root, num_frames=frames, sampling=sampling)
    for s, clip, e in prefetch_clips(samples, read, workers=workers, ahead=1):
        if len(kept) == limit:
            break
        if e is not None:
            log.warning("visual reliance: skipped %s: %s", s.location, e)
            bad.append(f"{s.location}: {e}")
        else:
            clips.append(clip)
            kept.append(s)
    if len({s.media for s in kept}) < 2:
        raise ValueError(f"{data}: visual reliance needs samples from at least two different videos, got {len(kept)} samples")
    # partner: the next sample (cyclically) whose video differs
    partners = []
    for i, s in enumerate(kept):
        j = next(k % len(kept) for k in range(i + 1, i + len(kept)) if kept[k % len(kept)].media != s.media)
        partners.append(j)

    def loss(i: int, clip_index: int) -> float:
        sample = model.processor.make_sample(kept[i].turns, clips[clip_index], sample_id=kept[i].id)
        return float(model(model.processor.build_batch([sample])).loss)

    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()  # no dropout: the two losses of a sample must differ only by the clip
    scored, own, swapped = [], [], []  # a template mismatch is a property of the text: it skips the sample
    try:
        for i in range(len(kept)):
            try:
                pair = loss(i, i), loss(i, partners[i])
            except TemplateMismatchError as e:
                log.warning("visual reliance: skipped %s: %s", kept[i].location, e)
                bad.append(f"{kept[i].location}: {e}")
                continue
            scored.append(kept[i])
            own.append(pair[0])
            swapped.append(pair[1])
    finally:
        if was_training:
            model.train()
    if not scored:
        raise ValueError(f"{data}: no sample could be scored ({len(bad)} skipped; first: {bad[0] if bad else '-'})")
    kinds: dict[str, list[int]] = {}
    for i, s in enumerate(scored):
        kinds.setdefault(_kind(s.id), []).append(i)
    per_kind = {k: _summary([own[i] for i in idx], [swapped[i] for i in idx]) for k, idx in sorted(kinds.items())}
    name = model_name or type(model).__name__
    result = EvalResult(
        task_type="reliance", model=name, dataset={"path": str(data), "name": Path(data).stem},
        metrics=_summary(own, swapped), per_task=per_kind,
        counts={"asked": len(scored) + len(bad), "scored": len(scored), "skipped": len(bad), "skipped_reasons": bad,
                "elapsed_seconds": time.time() - t0},
        settings={"limit": limit, "num_frames": frames, "sampling": sampling, "seed": seed,
                  "swap": "next sample with a different video in the seeded shuffle"},
    )
    if out_dir is not None:
        result.save(Path(out_dir) / "results.json")
    return result
