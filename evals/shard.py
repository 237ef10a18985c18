"""Evaluation across processes: `torchrun --nproc_per_node N -m vlm.cli eval mcq ...` (or `accelerate launch`).

Each process (rank) takes every N-th clip, asks the model about that clip's questions and appends its records
to its own `predictions.rank{r}.jsonl`; at the end rank 0 merges them into `predictions.jsonl` (one record per
question, in the benchmark's order) and writes the results, which every rank returns. A run that stopped,
by any number of processes, leaves rank files behind; the next run, by any number of processes, first folds
them into `predictions.jsonl` and then asks only what is missing.

A single process (no WORLD_SIZE in the environment) writes `predictions.jsonl` directly, as before.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

import torch.distributed as dist

from evals.results import PredictionLog

log = logging.getLogger(__name__)
T = TypeVar("T")
RANK_GLOB = "predictions.rank*.jsonl"
# results.json counts that depend on timing or on how the work was split among processes and runs
RUN_COUNTS = ("elapsed_seconds", "questions_per_second", "processes", "asked", "clips_decoded", "resumed")


def split_free(counts: dict[str, Any]) -> dict[str, Any]:
    """`counts` without RUN_COUNTS: what one-process and many-process runs of an evaluation must agree on."""
    return {k: v for k, v in counts.items() if k not in RUN_COUNTS}


@dataclass(frozen=True)
class Shard:
    """This process's part of an evaluation: rank `rank` of `world`."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, jobs: Sequence[T]) -> list[T]:
        """Every `world`-th job starting at `rank` (clips of neighbouring questions spread over the ranks)."""
        return list(jobs[self.rank :: self.world])

    def log_path(self, out: Path) -> Path:
        return out / "predictions.jsonl" if self.world == 1 else out / f"predictions.rank{self.rank}.jsonl"

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order (just [obj] in one process)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def current_shard() -> Shard:
    """The shard of this process, from torchrun's / accelerate's RANK and WORLD_SIZE; starts a gloo process group
    when none is running (the messages are small Python objects, whatever device the model is on)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard()
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
        atexit.register(_close_group)  # a group left to the interpreter's shutdown can abort the process
    return Shard(dist.get_rank(), dist.get_world_size())


def _close_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def open_log(out: Path, shard: Shard, identity: dict[str, Any]) -> PredictionLog:
    """This rank's prediction log, knowing every question answered so far by any rank of this or an earlier run.

    Rank 0 first folds rank files a stopped run left behind into predictions.jsonl; the others wait for it.
    """
    if shard.main:
        merge_logs(out, identity)
    shard.barrier()
    if shard.world == 1:
        return PredictionLog(out / "predictions.jsonl", identity)
    earlier = PredictionLog(out / "predictions.jsonl", identity)
    plog = PredictionLog(shard.log_path(out), identity)
    plog.records = {**earlier.records, **plog.records}
    plog.resumed = len(plog.records)
    return plog


def merge_logs(out: Path, identity: dict[str, Any], order: Sequence[str] = ()) -> int:
    """Fold predictions.rank*.jsonl into predictions.jsonl (their records are newer; one record per uid, uids of
    `order` first and in that order), atomically, then delete the rank files. Returns how many were merged."""
    parts = sorted(out.glob(RANK_GLOB))
    if not parts:
        return 0
    records = dict(PredictionLog(out / "predictions.jsonl", identity).records)
    for part in parts:
        records.update(PredictionLog(part, identity).records)
    position = {u: i for i, u in enumerate(order)}
    ranked = sorted(records.values(), key=lambda r: position.get(str(r["uid"]), len(position)))
    tmp = out / f"predictions.jsonl.tmp{os.getpid()}"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in ranked), encoding="utf-8")
    os.replace(tmp, out / "predictions.jsonl")
    for part in parts:
        part.unlink()
    log.info("%s: merged %d rank files (%d records)", out / "predictions.jsonl", len(parts), len(ranked))
    return len(parts)
