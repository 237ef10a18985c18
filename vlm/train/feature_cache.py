"""Frozen-tower feature cache: each clip is encoded once and stored in safetensors shards.

Entries are keyed by the video (absolute path, size, mtime), its sampling (frames, policy, start, end) and
live in a namespace named by the tower (config + a hash of its weights) and its preprocessing: changing
any of these reads from a different namespace, so stale features are never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

log = logging.getLogger(__name__)


def tower_fingerprint(tower_config: dict[str, Any], preprocessor: dict[str, Any], tower: nn.Module) -> str:
    """Names the tower's weights and preprocessing: config, preprocessing and a hash of every tensor's bytes
    (sums would miss a transposed or permuted weight)."""
    h = hashlib.sha1(json.dumps([tower_config, preprocessor], sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in sorted(tower.state_dict().items()):
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def video_ident(path: str | os.PathLike) -> list[Any]:
    """A video as a cache key sees it: resolved path, size and modification time (raises OSError when missing).
    A frame folder adds each file's name, size and modification time: a frame rewritten in place leaves the
    folder's own size and modification time as they were."""
    st = os.stat(path)
    ident: list[Any] = [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
    if os.path.isdir(path):
        ident.append(sorted([e.name, e.stat().st_size, e.stat().st_mtime_ns] for e in os.scandir(path) if e.is_file()))
    return ident


def clip_key(path: str | os.PathLike, frames: int, policy: str, start: float | None, end: float | None,
             distinct: bool = False) -> str:
    ident = [*video_ident(path), frames, policy, start, end] + (["distinct"] if distinct else [])
    return hashlib.sha1(json.dumps(ident).encode()).hexdigest()


class FeatureCache:
    """A folder of shards `shard-r<rank>-<n>.safetensors` with `index-r<rank>.json` maps key -> shard."""

    def __init__(self, root: str | os.PathLike, fingerprint: str, rank: int = 0, shard_size: int = 256):
        self.dir = Path(root) / fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.shard_size = shard_size
        self._pending: dict[str, torch.Tensor] = {}
        self._handles: dict[str, Any] = {}
        self.index: dict[str, str] = {}
        self.reload()
        self.hits = 0
        self.misses = 0

    def reload(self) -> None:
        """Re-read every process's index (after other processes wrote)."""
        self.index = {}
        for f in sorted(self.dir.glob("index-r*.json")):
            self.index.update(json.loads(f.read_text()))

    def __contains__(self, key: str) -> bool:
        return key in self.index or key in self._pending_keys()

    def _pending_keys(self) -> set[str]:
        return {k.rsplit("/", 1)[0] for k in self._pending}

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """{"tokens": [T', N, D], "timestamps": [T], "grid": [3]} or None."""
        shard = self.index.get(key)
        if shard is None:
            self.misses += 1
            return None
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        self.hits += 1
        return {name: handle.get_tensor(f"{key}/{name}") for name in ("tokens", "timestamps", "grid")}

    def put(self, key: str, tokens: torch.Tensor, timestamps: torch.Tensor, grid: tuple[int, int, int]) -> None:
        # own copies: a CPU tensor put under two keys (or a view of a batch) must not share storage at flush
        self._pending[f"{key}/tokens"] = tokens.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        self._pending[f"{key}/timestamps"] = torch.as_tensor(timestamps, dtype=torch.float32).clone()
        self._pending[f"{key}/grid"] = torch.tensor(grid, dtype=torch.int64)
        if len(self._pending) >= 3 * self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write pending entries as a new shard, then the index (both atomically)."""
        if not self._pending:
            return
        existing = len(list(self.dir.glob(f"shard-r{self.rank}-*.safetensors")))
        name = f"shard-r{self.rank}-{existing:05d}.safetensors"
        tmp = self.dir / f".{name}.tmp"
        save_file(self._pending, str(tmp))
        os.replace(tmp, self.dir / name)
        own = self.dir / f"index-r{self.rank}.json"
        mine = json.loads(own.read_text()) if own.exists() else {}
        for k in self._pending_keys():
            mine[k] = name
        tmp_index = own.with_suffix(".json.tmp")
        tmp_index.write_text(json.dumps(mine))
        os.replace(tmp_index, own)
        self.index.update({k: name for k in self._pending_keys()})
        self._pending = {}

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.dir.glob("*.safetensors"))
