"""Frozen-tower features for probes (retrieval dual encoders, linear classification probes), cached on disk.

A clip goes through the tower's own preprocessor (`VideoPreprocessor.clip`) and the tower; its tokens
[T', N, D] are mean-pooled over space to [T', D] (the probes pool over time themselves). The tower is run in eval
mode under no_grad here, because a probe never trains it; that is a choice of this call, not of the tower.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vlm.towers.base import VisionTower
from vlm.train.feature_cache import tower_fingerprint, video_ident
from vlm.video import Clip, read_clip
from vlm.video.prefetch import prefetch_clips

log = logging.getLogger(__name__)


def _video_ident(video: str | os.PathLike) -> list[Any]:
    """`video_ident`, with None for the size and time of a missing file (it is skipped and named later)."""
    try:
        return video_ident(video)
    except OSError:
        return [str(video), None, None]


@torch.no_grad()
def clip_features(tower: VisionTower, clips: Sequence[Clip]) -> torch.Tensor:
    """Space-pooled tower tokens of clips with the same frame count: [B, T', D] float32 on CPU."""
    was_training = tower.training
    tower.eval()
    try:
        param = next(tower.parameters())
        pixels = torch.stack([tower.preprocessor.clip(c)[0] for c in clips])  # [B, T, 3, H, W]
        feats = tower(pixels.to(param.device, param.dtype))  # tokens [B, T', N, D]
        return feats.tokens.float().mean(dim=2).cpu()  # [B, T', D]
    finally:
        tower.train(was_training)


def extract_features(
    tower: VisionTower,
    videos: Sequence[str | os.PathLike],
    *,
    num_frames: int = 8,
    sampling: str = "uniform",
    batch_size: int = 8,
    cache: str | os.PathLike | None = None,
    tower_id: str = "",
    progress: bool = True,
    workers: int = 2,
) -> tuple[torch.Tensor, list[int], dict[int, str]]:
    """(features [N_ok, T', D], indices of the videos they belong to, {index: error} for undecodable videos).

    With `cache`, features are stored in a safetensors file next to a JSON key and reused when the key matches;
    a changed key recomputes them. The key names every video (path, size, modification time), the tower (id, a
    checksum of its weights and its preprocessing, as the training feature cache does), frames and sampling, so
    other weights behind the same tower id or an edited video file are never served stale features. `workers`
    processes decode videos ahead of the tower (0: in this process).
    """
    key = {"videos": [_video_ident(v) for v in videos], "tower": tower_id,
           "weights": tower_fingerprint({}, tower.preprocessor.to_dict(), tower),
           "num_frames": num_frames, "sampling": sampling}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    if cache is not None:
        path = Path(cache)
        meta = path.with_suffix(".json")
        if path.is_file() and meta.is_file():
            m = json.loads(meta.read_text())
            if m.get("digest") == digest:
                log.info("features: reusing %s", path)
                t = load_file(str(path))
                return t["features"], t["index"].tolist(), {int(k): v for k, v in m["errors"].items()}
    feats: list[torch.Tensor] = []
    index: list[int] = []
    errors: dict[int, str] = {}
    pending: list[tuple[int, Clip]] = []

    def flush() -> None:
        if pending:
            feats.append(clip_features(tower, [c for _, c in pending]))
            index.extend(i for i, _ in pending)
            pending.clear()

    clips = prefetch_clips(list(videos), functools.partial(read_clip, num_frames=num_frames, policy=sampling),
                           workers=workers)
    for i, (v, clip, e) in enumerate(tqdm(clips, total=len(videos), desc="tower features", unit="video",
                                          disable=not progress)):
        if e is not None:
            errors[i] = str(e)
            log.warning("features: skipping %s: %s", v, e)
        else:
            pending.append((i, clip))
        if len(pending) >= batch_size:
            flush()
    flush()
    if not feats:
        raise RuntimeError(f"no video could be decoded (first error: {next(iter(errors.values()), '?')})")
    out = torch.cat(feats)
    if cache is not None:
        path = Path(cache)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"features": out.contiguous(), "index": torch.tensor(index)}, str(path))
        path.with_suffix(".json").write_text(json.dumps({"digest": digest, **key, "errors": errors}))
    return out, index, errors


def describe_tower(tower: VisionTower, spec: Any = None) -> str:
    """A tower id for caches and results: the build spec if known, else the class and hidden size."""
    if spec is not None:
        return json.dumps(spec, sort_keys=True)
    return f"{type(tower).__name__}(hidden={tower.hidden_size})"
