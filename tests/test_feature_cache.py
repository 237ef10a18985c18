"""The frozen-tower feature cache on its own: keys, namespaces, shards and indexes (fast, no training)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from vlm.train import feature_cache
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


def test_fingerprint_takes_config_values_json_cannot_write():
    tower = tiny_tower()
    config = {"name": "clip", "dtype": torch.bfloat16, "weights": Path("/models/clip")}  # as recipes hold them
    base = tower_fingerprint(config, PRE, tower)
    assert len(base) == 16 and base == tower_fingerprint(dict(config), PRE, tiny_tower())
    assert tower_fingerprint(dict(config, dtype=torch.float16), PRE, tower) != base
    assert tower_fingerprint(dict(config, weights=Path("/models/other")), PRE, tower) != base


def test_default_shard_holds_256_clips(tmp_path):
    cache = FeatureCache(tmp_path, "fp")
    for i in range(255):
        cache.put(f"k{i}", torch.zeros(1, 1, 2), [0.0], (1, 1, 1))
    assert not list(cache.dir.glob("*.safetensors")) and "k254" in cache
    cache.put("k255", torch.zeros(1, 1, 2), [0.0], (1, 1, 1))  # the 256th: written without a flush
    assert [p.name for p in cache.dir.glob("*.safetensors")] == ["shard-r0-00000.safetensors"]
    assert len(FeatureCache(tmp_path, "fp").index) == 256


def test_hits_and_misses_count_every_lookup(tmp_path):
    cache = FeatureCache(tmp_path, "fp")
    cache.put("a", *entry(1))
    cache.flush()
    for key in ("x", "a", "y", "z", "a"):
        cache.get(key)
    assert (cache.hits, cache.misses) == (2, 3)


def test_each_shard_is_opened_once(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path, "fp")
    for s in range(2):
        cache.put(f"k{s}", *entry(s))
        cache.flush()  # one shard each
    opened = []
    real_open = feature_cache.safe_open
    monkeypatch.setattr(feature_cache, "safe_open", lambda path, **k: opened.append(Path(path).name) or real_open(path, **k))
    for s in (0, 1, 0, 1, 0):
        assert_entry(cache.get(f"k{s}"), s)
    assert opened == ["shard-r0-00000.safetensors", "shard-r0-00001.safetensors"]


def test_a_crash_while_writing_the_index_leaves_the_cache_readable(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path, "fp")
    cache.put("a", *entry(1))
    cache.flush()
    cache.put("b", *entry(2))
    real_replace = os.replace

    def dies_on_the_index(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(feature_cache.os, "replace", dies_on_the_index)
    with pytest.raises(OSError, match="killed"):
        cache.flush()
    monkeypatch.setattr(feature_cache.os, "replace", real_replace)
    assert sorted(p.name for p in cache.dir.iterdir()) == ["index-r0.json", "index-r0.json.tmp",
                                                           "shard-r0-00000.safetensors", "shard-r0-00001.safetensors"]
    later = FeatureCache(tmp_path, "fp")  # the old index, whole; the half-done one is not read
    assert list(later.index) == ["a"] and "b" not in later
    assert_entry(later.get("a"), 1)
    cache.flush()  # the retry writes its own shard and the index
    assert_entry(FeatureCache(tmp_path, "fp").get("b"), 2)
    assert not (cache.dir / "index-r0.json.tmp").exists()


def test_put_stores_float32_timestamps_and_int64_grids_whatever_it_is_given(tmp_path):
    cache = FeatureCache(tmp_path, "fp")
    cache.put("a", torch.ones(1, 2, 3), np.array([0.25, 0.75]), (np.int32(2), np.int32(1), np.int32(3)))
    cache.put("b", torch.ones(1, 2, 3), torch.tensor([1, 2]), (2.0, 1.0, 3.0))
    cache.put("c", torch.ones(1, 2, 3), torch.tensor([0.5], dtype=torch.float64), (1, 2, 2))
    cache.flush()
    got = {k: cache.get(k) for k in "abc"}
    assert [g["timestamps"].dtype for g in got.values()] == [torch.float32] * 3
    assert [g["grid"].dtype for g in got.values()] == [torch.int64] * 3
    assert got["a"]["timestamps"].tolist() == [0.25, 0.75] and got["b"]["timestamps"].tolist() == [1.0, 2.0]
    assert got["c"]["timestamps"].tolist() == [0.5]
    assert [g["grid"].tolist() for g in got.values()] == [[2, 1, 3], [2, 1, 3], [1, 2, 2]]


class RecordMoves(TorchFunctionMode):
    """Every Tensor.to target (a GPU tower's output must be moved off the device before it waits for a flush)."""

    def __init__(self):
        super().__init__()
        self.targets: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            self.targets.append([*args[1:], *kwargs.values()])
        return func(*args, **kwargs)


def test_put_moves_the_tokens_to_the_cpu_right_away(tmp_path):
    cache = FeatureCache(tmp_path, "fp")
    tokens = torch.randn(2, 3, 4)
    with RecordMoves() as moves:
        cache.put("a", tokens, [0.0, 0.5], (2, 1, 3))
    assert [str(t) for t in moves.targets[0]] == ["cpu"]


def test_the_same_tensor_under_two_keys_flushes(tmp_path):
    cache = FeatureCache(tmp_path, "fp")
    tokens, stamps = torch.randn(2, 3, 4), torch.tensor([0.0, 0.5])
    cache.put("a", tokens, stamps, (2, 1, 3))
    cache.put("b", tokens, stamps, (2, 1, 3))
    cache.flush()
    for key in ("a", "b"):
        got = cache.get(key)
        assert torch.equal(got["tokens"], tokens) and torch.equal(got["timestamps"], stamps)


def test_non_contiguous_tokens_are_stored(tmp_path):
    cache = FeatureCache(tmp_path, "fp")
    tokens = torch.randn(4, 3, 2).transpose(0, 2)  # dense but not contiguous
    assert not tokens.is_contiguous()
    cache.put("a", tokens, torch.zeros(2), (2, 1, 3))
    cache.flush()
    assert torch.equal(cache.get("a")["tokens"], tokens)
