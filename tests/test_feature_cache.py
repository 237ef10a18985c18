"""The frozen-tower feature cache on its own: keys, namespaces, shards and indexes (fast, no training)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from vlm.train.feature_cache import FeatureCache, clip_key, tower_fingerprint

CONFIG = {"name": "clip", "config": {"hidden_size": 32}}
PRE = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "mode": "resize_crop"}


def tiny_tower() -> nn.Module:
    torch.manual_seed(0)
    tower = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with torch.no_grad():
        for p in tower.parameters():
            p.copy_(torch.randn(p.shape))  # distinct values everywhere (a swap must change something)
    return tower


def entry(seed: int, frames: int = 2) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(frames, 3, 8, generator=g), torch.arange(frames, dtype=torch.float32) * 0.5 + seed, (frames, 1, 3)


def assert_entry(got: dict[str, torch.Tensor] | None, seed: int, frames: int = 2) -> None:
    tokens, timestamps, grid = entry(seed, frames)
    assert got is not None
    assert torch.equal(got["tokens"], tokens)
    assert torch.equal(got["timestamps"], timestamps)
    assert got["grid"].tolist() == list(grid)


# ---------------------------------------------------------------- namespace: tower + preprocessing
def test_fingerprint_names_config_preprocessing_and_every_weight():
    tower = tiny_tower()
    base = tower_fingerprint(CONFIG, PRE, tower)
    assert base == tower_fingerprint(dict(CONFIG), dict(PRE), tiny_tower())  # same everything: same namespace
    assert len(base) == 16 and int(base, 16) >= 0
    other_config = {"name": "clip", "config": {"hidden_size": 32, "layer": -1}}
    assert tower_fingerprint(other_config, PRE, tower) != base
    assert tower_fingerprint(CONFIG, dict(PRE, mean=[0.4, 0.5, 0.5]), tower) != base  # preprocessing alone
    assert tower_fingerprint(CONFIG, dict(PRE, mode="squash"), tower) != base
    changed = []
    for name, p in tower.state_dict().items():
        edits = {
            "one element nudged": lambda t: t.view(-1)[0].add_(1e-6),
            "two elements swapped": lambda t: t.view(-1)[:2].copy_(t.view(-1)[:2].flip(0).clone()),
            "sign flipped": lambda t: t.view(-1)[-1].neg_(),
        }
        for what, edit in edits.items():
            t = tiny_tower()
            with torch.no_grad():
                edit(t.state_dict()[name])
            changed.append((name, what, tower_fingerprint(CONFIG, PRE, t) != base))
    assert all(c for *_, c in changed), [c for c in changed if not c[2]]
    square = tiny_tower()
    with torch.no_grad():
        square[0].weight.copy_(square[0].weight.t().clone())  # a transposed weight (same sum, same |sum|)
    assert tower_fingerprint(CONFIG, PRE, square) != base
    bf16 = tiny_tower().to(torch.bfloat16)  # other dtypes hash too
    assert tower_fingerprint(CONFIG, PRE, bf16) != base
    split = [nn.ParameterDict({"a": nn.Parameter(torch.tensor(v[:k])), "b": nn.Parameter(torch.tensor(v[k:]))})
             for v, k in (([1.0, 2.0, 3.0], 2), ([1.0, 2.0, 3.0], 1))]  # the same bytes in a row, cut elsewhere
    assert tower_fingerprint(CONFIG, PRE, split[0]) != tower_fingerprint(CONFIG, PRE, split[1])


# ---------------------------------------------------------------- keys: file identity + sampling
def test_clip_key_changes_with_the_file_and_the_sampling(tmp_path, monkeypatch):
    video = tmp_path / "a.mp4"
    video.write_bytes(b"x" * 100)
    os.utime(video, ns=(1_000_000_000_000, 1_000_000_000_000))
    key = clip_key(video, 4, "uniform", None, None)
    assert key == clip_key(str(video), 4, "uniform", None, None)
    monkeypatch.chdir(tmp_path)
    assert key == clip_key("a.mp4", 4, "uniform", None, None)  # the resolved path names the file
    assert len({key, clip_key(video, 2, "uniform", None, None), clip_key(video, 4, "segment_middle", None, None),
                clip_key(video, 4, "uniform", 1.0, None), clip_key(video, 4, "uniform", None, 2.0),
                clip_key(video, 4, "uniform", 0.0, None)}) == 6
    copy = tmp_path / "b.mp4"  # same bytes and mtime, other file
    copy.write_bytes(b"x" * 100)
    os.utime(copy, ns=(1_000_000_000_000, 1_000_000_000_000))
    assert clip_key(copy, 4, "uniform", None, None) != key
    video.write_bytes(b"y" * 100)  # edited in place, same size: the mtime tells
    os.utime(video, ns=(1_000_000_000_000, 1_000_000_000_001))
    assert clip_key(video, 4, "uniform", None, None) != key
    video.write_bytes(b"y" * 101)  # same mtime (restored by a copy tool), other size
    os.utime(video, ns=(1_000_000_000_000, 1_000_000_000_000))
    assert clip_key(video, 4, "uniform", None, None) != key
    video.write_bytes(b"x" * 100)  # the original bytes and mtime again: the original key
    os.utime(video, ns=(1_000_000_000_000, 1_000_000_000_000))
    assert clip_key(video, 4, "uniform", None, None) == key
    with pytest.raises(FileNotFoundError):
        clip_key(tmp_path / "missing.mp4", 4, "uniform", None, None)


# ---------------------------------------------------------------- shards and indexes
def test_put_flush_get_round_trip_is_exact_across_flushes_reopen_and_rollover(tmp_path):
    cache = FeatureCache(tmp_path, "fp", shard_size=2)
    assert cache.dir == tmp_path / "fp" and cache.dir.is_dir()
    assert "k0" not in cache and cache.get("k0") is None and cache.misses == 1
    cache.put("k0", *entry(0))
    assert "k0" in cache  # pending entries count as present (no double encoding before a flush)
    cache.flush()
    cache.flush()  # nothing pending: no empty shard
    assert sorted(p.name for p in cache.dir.glob("*.safetensors")) == ["shard-r0-00000.safetensors"]
    assert_entry(cache.get("k0"), 0)
    for s in range(1, 8):  # 6 pending tensors (2 entries) make a shard by themselves
        cache.put(f"k{s}", *entry(s, frames=1 + s % 3))
    assert len(list(cache.dir.glob("shard-r0-*.safetensors"))) == 4  # 1 + 3 automatic rollovers (k1-2, k3-4, k5-6)
    cache.flush()  # k7
    assert len(list(cache.dir.glob("shard-r0-*.safetensors"))) == 5
    assert not list(cache.dir.glob("*.tmp")) and not list(cache.dir.glob(".*"))
    for s in range(8):
        assert_entry(cache.get(f"k{s}"), s, frames=1 + s % 3 if s else 2)
    assert cache.hits == 9 and cache.misses == 1
    cache.put("late/clip", *entry(9))  # a "/" in a key is fine: tensors are named "<key>/<field>"
    cache.flush()
    reopened = FeatureCache(tmp_path, "fp", shard_size=2)  # a later run: every flushed entry, from every shard
    assert sorted(reopened.index) == sorted([f"k{s}" for s in range(8)] + ["late/clip"])
    for s in range(8):
        assert_entry(reopened.get(f"k{s}"), s, frames=1 + s % 3 if s else 2)
    assert_entry(reopened.get("late/clip"), 9)
    reopened.put("more", *entry(10))
    reopened.flush()  # a new shard name: the existing shards (and their open handles) stay intact
    assert_entry(reopened.get("more"), 10)
    assert_entry(reopened.get("k0"), 0)
    assert_entry(cache.get("k0"), 0)
    assert FeatureCache(tmp_path, "other").index == {}  # another namespace sees nothing
    assert reopened.size_bytes() == sum(p.stat().st_size for p in cache.dir.glob("*.safetensors")) > 0


def test_each_rank_writes_its_own_shards_and_reload_sees_all(tmp_path):
    r0, r1 = FeatureCache(tmp_path, "fp", rank=0), FeatureCache(tmp_path, "fp", rank=1)
    r0.put("a", *entry(1))
    r1.put("b", *entry(2))
    r0.flush()
    r1.flush()
    assert sorted(p.name for p in r0.dir.iterdir()) == ["index-r0.json", "index-r1.json",
                                                        "shard-r0-00000.safetensors", "shard-r1-00000.safetensors"]
    assert "b" not in r0 and r0.get("b") is None  # not until reload (after every process flushed)
    r0.reload()
    r1.reload()
    for c in (r0, r1):
        assert_entry(c.get("a"), 1)
        assert_entry(c.get("b"), 2)
    r1.put("c", *entry(3))
    r1.flush()
    r0.reload()
    assert_entry(r0.get("c"), 3)
    assert_entry(r0.get("b"), 2)


def test_tokens_keep_their_dtype_and_leave_the_batch_storage(tmp_path):
    cache = FeatureCache(tmp_path, "fp")
    batch = torch.randn(3, 2, 4, 8).to(torch.bfloat16)  # the precompute puts views of one batched output
    for i, tokens in enumerate(batch):
        cache.put(f"k{i}", tokens, [0.0, 0.5], (2, 2, 2))
    cache.flush()
    for i in range(3):
        got = cache.get(f"k{i}")
        assert got["tokens"].dtype == torch.bfloat16 and torch.equal(got["tokens"], batch[i])
        assert got["timestamps"].dtype == torch.float32 and got["timestamps"].tolist() == [0.0, 0.5]
        assert got["grid"].dtype == torch.int64


def test_clip_key_sees_a_frame_rewritten_inside_a_frame_folder(tmp_path):
    """A frame folder's own size and mtime stay as they were when one frame is rewritten in place."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i:05d}.jpg").write_bytes(b"x" * 10)
    before = os.stat(folder)
    key = clip_key(folder, 4, "uniform", None, None)
    (folder / "00001.jpg").write_bytes(b"y" * 11)
    os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(folder).st_mtime_ns == before.st_mtime_ns
    assert clip_key(folder, 4, "uniform", None, None) != key
