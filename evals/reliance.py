"""Visual reliance: does a model look at the video? Answer loss with each sample's own video vs others'.

For held-out conversations (LLaVA format), every sample's assistant-token loss is computed with its own clip and
with the clips of the next `partners` samples in a fixed shuffle whose videos differ. A model that ignores the
frames scores them all the same (gap 0, "own video preferred" 50%); a grounded model's loss is lower with its own
video. This separates "learned the language of the data" from "learned to see", which a falling training loss or
an accuracy near chance cannot. One partner per sample is a noisy draw: a partner clip that happens to show the
same objects doing the same thing fits the answers as well as the own clip. On the quickstart model, four
single-partner draws gave 95%, 97%, 83% and 95% (docs/GROUNDING.md); `partners=4` averages them.

    vlm eval reliance --model runs/quickstart/final --data demo_data/synth/qa_test.json --out OUT [--partners 4]

Results (the common schema, task_type "reliance"): metrics `loss_own`, `loss_swapped` (nats per answer token,
mean over samples of the mean over partners), `gap` (swapped - own), `gap_stderr` (over samples), `gap_percent`
(of loss_swapped) and `own_preferred_percent` (over (sample, partner) pairs: the own video gives the lower loss;
ties count half); per_task: the same per sample kind (the id's suffix after the last "_", digits dropped:
c000123_mcq1 -> mcq). `OUT/predictions.jsonl` holds one line per sample as it is scored (its own loss, each
partner's id and loss), so a stopped run resumes with the samples it has not scored.
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

from evals.interface import frames_of, sampling_of
from evals.results import EvalResult, PredictionLog
from vlm.data.conversation import resolve_media
from vlm.data.dataset import SourceSpec, load_mixture
from vlm.llm.template import TemplateMismatchError
from vlm.video.clip import Clip
from vlm.video.decode import read_clip
from vlm.video.prefetch import prefetch_clips

log = logging.getLogger(__name__)


def _kind(sample_id: str) -> str:
    return sample_id.rsplit("_", 1)[-1].rstrip("0123456789") or "sample"


def _summary(own: list[float], swapped: list[list[float]]) -> dict[str, Any]:
    """Own losses and, per sample, the losses with each partner's clip."""
    n = len(own)
    gaps = [sum(sw) / len(sw) - o for o, sw in zip(own, swapped)]
    mean_gap = sum(gaps) / n
    var = sum((g - mean_gap) ** 2 for g in gaps) / max(1, n - 1)
    loss_swapped = sum(sum(sw) / len(sw) for sw in swapped) / n
    pairs = [1.0 if s > o else 0.5 if s == o else 0.0 for o, sw in zip(own, swapped) for s in sw]
    return {"samples": n, "loss_own": sum(own) / n, "loss_swapped": loss_swapped, "gap": mean_gap,
            "gap_stderr": math.sqrt(var / n), "gap_percent": 100.0 * mean_gap / loss_swapped if loss_swapped else 0.0,
            "own_preferred_percent": 100.0 * sum(pairs) / len(pairs)}


def _losses(model: Any, samples: list[dict[str, Any]], share_prefix: bool) -> list[Any]:
    """Each sample's answer loss (samples of one clip), or the TemplateMismatchError that skips it."""
    try:
        if share_prefix:
            return list(model.answer_losses(model.processor.build_batch(samples)))
        return [float(model(model.processor.build_batch([s])).loss) for s in samples]
    except TemplateMismatchError as e:
        if len(samples) == 1:
            return [e]
        return [r for s in samples for r in _losses(model, [s], share_prefix)]


def _sample_clip(s: Any, root: Path, num_frames: int, sampling: str) -> Clip:
    path = resolve_media(root, s.media, s.location)
    return read_clip(path, num_frames, sampling, s.extra.get("start"), s.extra.get("end"))


@torch.no_grad()
def visual_reliance(model: Any, data: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                    media_root: str | os.PathLike | None = None, limit: int = 64, num_frames: int | None = None,
                    sampling: str | None = None, seed: int = 0, model_name: str | None = None,
                    workers: int = 2, partners: int = 1, share_prefix: bool = True) -> EvalResult:
    """Own-video vs other videos' answer loss on up to `limit` video samples of `data` (a deterministic shuffle
    by `seed`), each against the clips of the next `partners` samples with another video. `model` needs a
    `processor` (`make_sample`, `build_batch`) and `answer_losses(batch)` (VideoLLM has them): a clip's samples
    are scored together, the start they share (system prompt and video) computed once. `share_prefix=False`
    scores each (sample, clip) pair in a forward of its own (`model(batch).loss`; the reference).
    Malformed records, clips that fail to decode and samples whose chat template does not match the tokenizer
    are skipped, counted and named (counts.skipped_reasons). `workers` processes decode clips ahead (0: here)."""
    t0 = time.time()
    if partners < 1:
        raise ValueError(f"partners must be at least 1, got {partners}")
    root = Path(media_root) if media_root else Path(data).parent
    items, bad = load_mixture([SourceSpec(str(data), str(root))])  # every record once; malformed ones listed
    samples = [it.sample for it in items if it.sample.media_type == "video"]
    random.Random(seed).shuffle(samples)
    frames = frames_of(model, num_frames)
    sampling = sampling_of(model, sampling, "uniform")  # the model's own policy, as its frames are
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
    others = [[k % len(kept) for k in range(i + 1, i + len(kept)) if kept[k % len(kept)].media != s.media]
              for i, s in enumerate(kept)]  # cyclically after each sample, the samples with another video
    if len({s.media for s in kept}) < 2 or min(len(o) for o in others) < partners:
        raise ValueError(f"{data}: visual reliance with {partners} partner(s) needs samples from at least "
                         f"{partners + 1} different videos, got {len({s.media for s in kept})} in {len(kept)} samples")
    name = model_name or type(model).__name__
    plog = None if out_dir is None else PredictionLog(
        Path(out_dir) / "predictions.jsonl", {"model": name, "num_frames": frames, "sampling": sampling})
    done: dict[int, dict[str, Any]] = {}  # sample -> its record
    plan: dict[int, list[int]] = {}  # sample -> the clips it is scored with: its own, then its partners'
    for i, s in enumerate(kept):
        rec = None if plog is None else plog.records.get(s.id)
        if rec is not None and rec.get("partner_ids") == [kept[j].id for j in others[i][:partners]]:
            done[i] = rec  # scored before against the same partners
        else:
            plan[i] = [i] + others[i][:partners]
    users: dict[int, list[int]] = {}  # clip -> the samples scored with it
    for i, cs in plan.items():
        for c in cs:
            users.setdefault(c, []).append(i)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()  # no dropout: the losses of a sample must differ only by the clip
    got: dict[tuple[int, int], float] = {}
    failed: dict[int, str] = {}  # a template mismatch is a property of the text: it skips the sample
    try:
        for c in sorted(users):  # one clip's samples together: with share_prefix its start runs once
            rows = [i for i in users[c] if i not in failed]
            if not rows:
                continue
            samples = [model.processor.make_sample(kept[i].turns, clips[c], sample_id=kept[i].id) for i in rows]
            for i, r in zip(rows, _losses(model, samples, share_prefix)):
                if isinstance(r, TemplateMismatchError):
                    log.warning("visual reliance: skipped %s: %s", kept[i].location, r)
                    failed[i] = f"{kept[i].location}: {r}"
                    continue
                got[(i, c)] = r
                if all((i, j) in got for j in plan[i]):  # the sample's last clip: log it now
                    done[i] = {"uid": kept[i].id, "own": got[(i, i)], "swapped": [got[(i, j)] for j in plan[i][1:]],
                               "partner_ids": [kept[j].id for j in plan[i][1:]]}
                    if plog is not None:
                        plog.write(done[i])
    finally:
        if plog is not None:
            plog.close()
        if was_training:
            model.train()
    bad += [failed[i] for i in sorted(failed)]
    scored = [s for i, s in enumerate(kept) if i in done]
    own = [done[i]["own"] for i in sorted(done)]
    swapped = [done[i]["swapped"] for i in sorted(done)]
    if not scored:
        raise ValueError(f"{data}: no sample could be scored ({len(bad)} skipped; first: {bad[0] if bad else '-'})")
    kinds: dict[str, list[int]] = {}
    for i, s in enumerate(scored):
        kinds.setdefault(_kind(s.id), []).append(i)
    per_kind = {k: _summary([own[i] for i in idx], [swapped[i] for i in idx]) for k, idx in sorted(kinds.items())}
    result = EvalResult(
        task_type="reliance", model=name, dataset={"path": str(data), "name": Path(data).stem},
        metrics=_summary(own, swapped), per_task=per_kind,
        counts={"asked": len(scored) + len(bad), "scored": len(scored), "skipped": len(bad), "skipped_reasons": bad,
                "resumed": 0 if plog is None else plog.resumed, "elapsed_seconds": time.time() - t0},
        settings={"limit": limit, "num_frames": frames, "sampling": sampling, "seed": seed, "partners": partners,
                  "swap": "the next samples with another video in the seeded shuffle"},
    )
    if out_dir is not None:
        result.save(Path(out_dir) / "results.json")
    return result
