"""Streamed mixtures: rows read from their files while training runs, never converted or validated ahead.

A source with `streaming: true` (Parquet: a file, a folder of shards or a glob) is read through a streaming
`datasets.IterableDataset`; memory holds a window of rows per source and the reader's buffers. Its row count comes from the Parquet
footers, so the epoch is planned without reading any data. A mixture with a streamed source is planned as a stream
(`StreamPlan` in place of `BatchPlan`); its other sources (JSON, saved datasets) are read the same way, in windows.
What that keeps and what it changes:

- weights: each epoch draws round(rows * weight) items from each source, as the in-memory plan does. They are the
  source's next rows, cyclically (epoch 0 reads rows [0, c), epoch 1 [c, 2c), ...): a weight below 1 walks through
  the whole source over the epochs instead of repeating one seeded subset;
- order: the sources are interleaved by a seeded permutation per epoch, and each source's rows are shuffled
  within windows of `window` consecutive rows. There is no global shuffle and no grouping by length;
- exact resume: item p of epoch e is a function of (seed, e, p) alone, so a run resumed at any batch trains on the
  samples the uninterrupted run would have. Resuming reopens each source at its row: rows before it inside the same
  shard are read and passed over (text only, no video is decoded);
- bad rows: a malformed row is met when it is reached; it is skipped, counted and listed in skipped.txt as
  `<file>:<row> (id ...): <reason>` like an undecodable video, and not in the stage's `malformed_records`.
"""

from __future__ import annotations

import atexit
import bisect
import itertools
import logging
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from vlm.data.conversation import DataFormatError, parse_record, read_records
from vlm.data.dataset import ConversationDataset, MixtureItem, SourceSpec
from vlm.data.hf import ArrowRows, parquet_files, parquet_row_counts, row_record, source_kind, stream_parquet

log = logging.getLogger(__name__)

WINDOW = 1024  # rows of one source shuffled together
_OPEN: weakref.WeakSet[SourceReader] = weakref.WeakSet()


@atexit.register
def _close_streams() -> None:
    """Close open Parquet streams before the interpreter tears modules down (a stream finalised after that
    prints a spurious error from inside `datasets`)."""
    for reader in list(_OPEN):
        reader.close()


class SourceReader:
    """Rows [start, start + count) of one source, cyclically, as (location, record or DataFormatError). A streamed
    Parquet source keeps its iterator while reads follow one another and reopens it at a row after a jump."""

    def __init__(self, src: SourceSpec):
        self.path, self.kind = src.path, source_kind(src.path)
        self.streaming = src.streaming
        if src.streaming and self.kind != "parquet":
            raise DataFormatError(f"{src.path}: streaming reads Parquet (a file, a folder of shards or a glob); a "
                                  f"{'JSON file' if self.kind == 'json' else 'saved dataset'} is read without it")
        self.records: list[tuple[str, Any]] | None = None
        self.rows: ArrowRows | None = None
        if self.streaming:
            self.files = parquet_files(src.path)
            counts = parquet_row_counts(self.files)
            self.starts = [0, *itertools.accumulate(counts)][:-1]
            self.n = sum(counts)
        elif self.kind == "json":
            self.records = list(read_records(src.path))
            self.n = len(self.records)
        else:
            self.rows = ArrowRows(src.path)
            self.n = len(self.rows)
        self._iter: Any = None
        self._next = -1  # the row the open iterator gives next

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_iter": None, "_next": -1}  # a DataLoader worker opens its own stream

    def location(self, row: int) -> str:
        shard = bisect.bisect_right(self.starts, row) - 1
        return f"{self.files[shard]}:{row - self.starts[shard]}"

    def _open(self, row: int) -> None:
        self.close()
        shard = bisect.bisect_right(self.starts, row) - 1
        self._iter = stream_parquet(self.files[shard:], skip=row - self.starts[shard], batch_size=WINDOW)
        self._next = row
        _OPEN.add(self)

    def close(self) -> None:
        if self._iter is not None and hasattr(self._iter, "close"):
            self._iter.close()
        self._iter, self._next = None, -1

    def _one(self, row: int) -> tuple[str, Any]:
        if self.records is not None:
            return self.records[row]
        if self.rows is not None:
            return self.rows.location(row), self.rows.record(row)
        if row != self._next:
            self._open(row)
        self._next += 1
        try:
            return self.location(row), row_record(next(self._iter))
        except StopIteration:  # a shard was rewritten since its footer was read
            raise DataFormatError(f"{self.location(row)}: the stream ended before this row") from None

    def read(self, start: int, count: int) -> list[tuple[str, Any]]:
        return [self._one((start + i) % self.n) for i in range(count)]


class StreamItems:
    """The items of a streamed mixture: index e * per_epoch + p is item p of epoch e, a MixtureItem (or the
    DataFormatError of a malformed row, raised)."""

    def __init__(self, sources: Sequence[SourceSpec], seed: int = 0, window: int = WINDOW):
        self.readers = [SourceReader(s) for s in sources]
        self.roots = [s.root for s in sources]
        self.counts = [int(round(r.n * s.weight)) if r.n else 0 for r, s in zip(self.readers, sources)]
        self.per_epoch = sum(self.counts)
        if not self.per_epoch:
            raise DataFormatError(f"streamed mixture {[s.path for s in sources]}: no rows")
        self.seed, self.window = seed, window
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None
        self._windows: dict[int, tuple[int, int, list[tuple[str, Any]]]] = {}
        for s, n, c in zip(sources, (r.n for r in self.readers), self.counts):
            log.info("%s: %d rows, weight %.2f -> %d per epoch (streamed plan)", s.path, n, s.weight, c)

    def __len__(self) -> int:
        return self.per_epoch

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_plan": None, "_windows": {}}  # a DataLoader worker fills its own

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """For each position of the epoch: its source, and which of that source's items of the epoch it is."""
        if self._plan is None or self._plan[0] != epoch:
            labels = np.repeat(np.arange(len(self.counts), dtype=np.int32), self.counts)
            labels = np.random.default_rng([self.seed, epoch, 0x57]).permutation(labels)
            ordinal = np.empty(len(labels), dtype=np.int64)
            for k, c in enumerate(self.counts):
                ordinal[labels == k] = np.arange(c)
            self._plan = (epoch, labels, ordinal)
        return self._plan[1], self._plan[2]

    def _window(self, k: int, epoch: int, w: int) -> list[tuple[str, Any]]:
        """Window w of source k's items in `epoch`: the next `window` rows of the source, in a seeded order."""
        cached = self._windows.get(k)
        if cached is None or cached[:2] != (epoch, w):
            count = min(self.window, self.counts[k] - w * self.window)
            start = (epoch * self.counts[k] + w * self.window) % self.readers[k].n
            rows = self.readers[k].read(start, count)
            order = np.random.default_rng([self.seed, epoch, k, w]).permutation(count)
            cached = (epoch, w, [rows[i] for i in order])
            self._windows[k] = cached
        return cached[2]

    def __getitem__(self, index: int) -> MixtureItem:
        epoch, p = divmod(int(index), self.per_epoch)
        labels, ordinal = self.epoch_plan(epoch)
        k, j = int(labels[p]), int(ordinal[p])
        location, record = self._window(k, epoch, j // self.window)[j % self.window]
        if isinstance(record, Exception):
            raise record
        return MixtureItem(parse_record(record, location), self.roots[k])


class StreamDataset(ConversationDataset):
    """`ConversationDataset` over a stream: a bad item is replaced by the stream's next one (never wrapping to the
    epoch's start, which another batch has)."""

    def __init__(self, items: StreamItems, load_visual: Callable[[Path, Any], dict[str, Any]],
                 encode: Callable[[dict[str, Any]], dict[str, Any]], visual_tokens: int = 0, max_retries: int = 16):
        super().__init__([], load_visual, encode, visual_tokens, max_retries)
        self.items = items  # type: ignore[assignment]

    def candidate(self, i: int, attempt: int) -> int:
        return i + attempt


class StreamPlan:
    """`BatchPlan`'s interface for a streamed mixture: batches in stream order, epoch e's indices offset by
    e * per_epoch; global batch j of an epoch is positions [j * B * world, (j + 1) * B * world), each process
    taking its slice of B. The incomplete last global batch is dropped unless it is the epoch's only one."""

    def __init__(self, per_epoch: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        if per_epoch < world_size:
            raise ValueError(f"{per_epoch} samples cannot give each of {world_size} processes one")
        self.per_epoch, self.batch_size, self.seed = per_epoch, batch_size, seed
        self.world_size, self.rank = world_size, rank
        self.global_batch = batch_size * world_size

    def __len__(self) -> int:
        return max(1, self.per_epoch // self.global_batch)

    def epoch(self, epoch: int) -> list[list[int]]:
        base = epoch * self.per_epoch
        if self.per_epoch < self.global_batch:  # one short global batch, shared evenly
            return [list(range(base + self.rank, base + self.per_epoch, self.world_size))]
        first = base + self.rank * self.batch_size
        return [list(range(first + j * self.global_batch, first + j * self.global_batch + self.batch_size))
                for j in range(len(self))]


def is_streamed(sources: Sequence[SourceSpec]) -> bool:
    """Whether a mixture must be planned as a stream (one of its sources streams)."""
    return any(s.streaming for s in sources)


def streamed_data(sources: Sequence[SourceSpec], load_visual: Callable[[Path, Any], dict[str, Any]],
                  encode: Callable[[dict[str, Any]], dict[str, Any]], batch_size: int, world_size: int = 1,
                  rank: int = 0, seed: int = 0, visual_tokens: int = 0) -> tuple[StreamDataset, StreamPlan]:
    """The dataset and batch plan of a streamed mixture, for `vlm.train.loop.setup` (in place of
    ConversationDataset + BatchPlan)."""
    items = StreamItems(sources, seed)
    dataset = StreamDataset(items, load_visual, encode, visual_tokens)
    return dataset, StreamPlan(items.per_epoch, batch_size, world_size, rank, seed)
