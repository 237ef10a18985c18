"""The evaluation feature cache: reused only for the same tower weights, preprocessing and video files."""

from __future__ import annotations

import os

import numpy as np
import torch

from evals.features import extract_features
from tests.conftest import TINY_TOWERS
from tests.eval_helpers import single_thread  # noqa: F401  (fixture)
from vlm.towers import build_tower
from vlm.video import write_video


def _tower(seed: int):
    torch.manual_seed(seed)
    spec = dict(TINY_TOWERS["clip"])
    return build_tower(spec.pop("name"), **spec)


def _videos(root, n=3):
    for i in range(n):
        frames = np.random.default_rng(i).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
        write_video(root / f"v{i}.mp4", frames, fps=4)
    return [root / f"v{i}.mp4" for i in range(n)]


def test_same_id_other_weights_or_edited_video_is_recomputed(tmp_path, single_thread):
    videos = _videos(tmp_path)
    cache = tmp_path / "feats.safetensors"
    a, b = _tower(0), _tower(1)  # same class, width and id string; other weights
    fa, idx, _ = extract_features(a, videos, num_frames=4, cache=cache, tower_id="CLIPTower(hidden=32)", progress=False)
    fb, _, _ = extract_features(b, videos, num_frames=4, cache=cache, tower_id="CLIPTower(hidden=32)", progress=False)
    fresh_b, _, _ = extract_features(b, videos, num_frames=4, tower_id="x", progress=False)
    assert idx == [0, 1, 2]
    assert not torch.equal(fa, fb) and torch.allclose(fb, fresh_b)

    again, _, _ = extract_features(b, videos, num_frames=4, cache=cache, tower_id="CLIPTower(hidden=32)", progress=False)
    assert torch.equal(again, fb)  # a hit returns what was stored, not zeros

    frames = np.random.default_rng(99).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    write_video(videos[1], frames, fps=4)  # the same path, other pixels
    st = os.stat(videos[1])
    os.utime(videos[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    edited, _, _ = extract_features(b, videos, num_frames=4, cache=cache, tower_id="CLIPTower(hidden=32)", progress=False)
    assert torch.allclose(edited[0], fb[0]) and not torch.allclose(edited[1], fb[1])
