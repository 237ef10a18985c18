"""What training reads: a weighted mixture of LLaVA-style sources, decoded and tokenized sample by sample.

A source is a JSON list or JSONL file, a folder written by `datasets`' `save_to_disk`, or Parquet (a file, a folder
of shards, a glob): the same records, the same validation (`vlm.data.hf`). Arrow-backed rows are parsed when a
sample is read, not when the mixture is built. A source with `streaming: true` is read while training runs
(`vlm.data.stream`), with a plan of its own.

A bad sample (undecodable video, missing file, malformed record, template mismatch) never stops a run: it is
replaced by the next good sample in the mixture and reported in the batch's `skipped` list, so the training
loop can count it and say which file/sample and why at the end.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from vlm.data.conversation import ConversationSample, DataFormatError, parse_record, read_records, resolve_media
from vlm.data.conversation import TemplateMismatchError
from vlm.data.hf import ArrowRows, media_base, source_kind
from vlm.video.errors import VideoDecodeError

log = logging.getLogger(__name__)

#: errors that make one sample unusable (anything else is a bug and propagates)
SAMPLE_ERRORS = (VideoDecodeError, DataFormatError, TemplateMismatchError, FileNotFoundError)


@dataclass
class SourceSpec:
    """One source of a mixture (a recipe's `data.mixture` entry)."""

    path: str  # LLaVA-style JSON / JSONL, a save_to_disk folder, or Parquet (file, folder of shards, glob)
    media_root: str | None = None  # default: the folder holding `path` (for a glob: holding the folder it searches)
    weight: float = 1.0  # sampling weight: the share of an epoch drawn from this source is len * weight
    streaming: bool = False  # read while training runs, never prepared ahead (vlm.data.stream; Parquet)

    @property
    def root(self) -> Path:
        return Path(self.media_root) if self.media_root else media_base(self.path).parent


def text_tokens(sample: ConversationSample) -> int:
    """A sample's approximate text length in tokens (4 characters per token): what batches are grouped by."""
    return sum(len(t.text) for t in sample.turns) // 4


@dataclass
class MixtureItem:
    sample: ConversationSample
    media_root: Path

    @property
    def text_tokens(self) -> int:
        return text_tokens(self.sample)

    @property
    def has_media(self) -> bool:
        return bool(self.sample.media)


class RowItem:
    """A mixture item that is a row of an Arrow-backed source: it keeps the row number and the two numbers batch
    planning needs, and parses the row when the sample is read (the row was validated when the mixture was built)."""

    __slots__ = ("rows", "row", "media_root", "text_tokens", "has_media")

    def __init__(self, rows: ArrowRows, row: int, media_root: Path, text_tokens: int, has_media: bool):
        self.rows, self.row, self.media_root = rows, row, media_root
        self.text_tokens, self.has_media = text_tokens, has_media

    @property
    def sample(self) -> ConversationSample:
        return self.rows.sample(self.row)

    def __repr__(self) -> str:
        return f"RowItem({self.rows.location(self.row)})"


def _json_items(src: SourceSpec, bad: list[str]) -> list[MixtureItem]:
    items = []
    for location, record in read_records(src.path):
        if isinstance(record, Exception):
            bad.append(str(record))
            continue
        try:
            items.append(MixtureItem(parse_record(record, location), src.root))
        except DataFormatError as e:
            bad.append(str(e))
    return items


def _arrow_items(src: SourceSpec, bad: list[str]) -> list[RowItem]:
    """Every well-formed row, validated in one pass over the memory-mapped table; only row numbers are kept."""
    rows = ArrowRows(src.path)
    items = []
    for row, (location, record) in enumerate(rows.records()):
        try:
            sample = parse_record(record, location)
        except DataFormatError as e:
            bad.append(str(e))
            continue
        items.append(RowItem(rows, row, src.root, text_tokens(sample), bool(sample.media)))
    return items


def draw(n: int, weight: float, rng: np.random.Generator) -> list[int]:
    """Which of n samples a source gives the mixture: weight 1 all once; 0.5 a seeded half; 2.5 twice + a seeded
    half."""
    whole, frac = divmod(weight, 1.0)
    chosen = list(range(n)) * int(whole)
    return chosen + sorted(rng.permutation(n)[: int(round(frac * n))].tolist())


def load_mixture(sources: Sequence[SourceSpec], seed: int = 0) -> tuple[list[MixtureItem | RowItem], list[str]]:
    """Items drawn from each source (weight 1: all once; 0.5: a seeded half; 2.5: twice + a seeded half),
    plus the list of malformed records ("location: reason") that were left out."""
    items: list[MixtureItem | RowItem] = []
    bad: list[str] = []
    for k, src in enumerate(sources):
        if src.streaming:
            raise ValueError(f"{src.path}: a streamed source (streaming: true) is read by a streamed plan "
                             "(vlm.data.stream.streamed_data), not loaded whole")
        pool = _json_items(src, bad) if source_kind(src.path) == "json" else _arrow_items(src, bad)
        chosen = draw(len(pool), src.weight, np.random.default_rng([seed, k]))
        items += [pool[i] for i in chosen]
        log.info("%s: %d samples, weight %.2f -> %d", src.path, len(pool), src.weight, len(chosen))
    if bad:
        log.warning("%d malformed records left out of the mixture; first: %s", len(bad), bad[0])
    return items, bad


def subsample(items: Sequence[Any], n: int, seed: int = 0) -> list[Any]:
    """A seeded n of the items, in mixture order: each source keeps its share in expectation (the first n alone
    would drop the later sources)."""
    if n >= len(items):
        return list(items)
    keep = np.random.default_rng([seed, 1]).permutation(len(items))[:n]
    return [items[i] for i in sorted(keep.tolist())]


class ConversationDataset(torch.utils.data.Dataset):
    """Items of a mixture -> encoded samples (see `VideoLLMProcessor.encode_sample`), via `load_visual` for media.

    load_visual(path, sample) returns the visual part of a sample: {"pixel_values", "timestamps"} or
    {"features", "grid", "num_frames", "timestamps"} (from the feature cache).
    """

    def __init__(self, items: Sequence[MixtureItem | RowItem],
                 load_visual: Callable[[Path, ConversationSample], dict[str, Any]], encode: Callable[[dict[str, Any]], dict[str, Any]], visual_tokens: int | Sequence[int] = 0, max_retries: int = 16):
        self.items = list(items)
        self.load_visual = load_visual
        self.encode = encode
        self.visual_tokens = visual_tokens
        self.max_retries = max_retries

    def __len__(self) -> int:
        return len(self.items)

    def length(self, i: int) -> int:
        """Approximate token length (4 characters per token + visual tokens, one count for all items or one per
        item), signed: negative for text-only."""
        item = self.items[i]
        visual = self.visual_tokens if isinstance(self.visual_tokens, int) else self.visual_tokens[i]
        return item.text_tokens + visual if item.has_media else -item.text_tokens

    def _one(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        s = item.sample
        sample: dict[str, Any] = {"id": f"{s.location} (id {s.id})", "turns": s.turns, "media_type": s.media_type}
        if s.media:
            path = resolve_media(item.media_root, s.media, s.location)
            sample.update(self.load_visual(path, s))
            if "regions" in s.extra:
                sample["regions"] = s.extra["regions"]
        return self.encode(sample)

    def __getitem__(self, i: int) -> dict[str, Any]:
        skipped: list[str] = []
        for attempt in range(self.max_retries):
            j = self.candidate(i, attempt)
            try:
                out = self._one(j)
                out["skipped"] = skipped
                return out
            except SAMPLE_ERRORS as e:
                reason = self._reason(j, e)
                log.warning("skipping bad sample %s", reason)
                skipped.append(reason)
        raise RuntimeError(f"{self.max_retries} consecutive bad samples from index {i}; last: {skipped[-1]}")

    def candidate(self, i: int, attempt: int) -> int:
        """The item tried for index i after `attempt` bad ones: the next in the mixture, wrapping around."""
        return (i + attempt) % len(self.items)

    def _reason(self, j: int, e: Exception) -> str:
        try:
            s = self.items[j].sample
        except SAMPLE_ERRORS:  # the item itself is malformed (a streamed row): its error names it
            return str(e)
        return str(e) if s.location in str(e) else f"{s.location} (id {s.id}): {e}"


SHUFFLES = ("numpy", "torch", "torch_stream")


class BatchPlan:
    """Deterministic batches of indices for one process: shuffled per (seed, epoch), optionally grouped by
    modality and length, split across processes, resumable at any batch. Grouping sorts each window of `window`
    global batches by length and cuts it into global batches, whose order is then shuffled: window 1 is LLaVA's
    `group_by_modality_length` (one global batch is sorted, to give each process similar lengths; one process gains
    nothing from it), a larger window puts samples of similar length in the same batch, so less of it is padding
    (HF Trainer's length-grouped sampler sorts windows of 50 batches).
    The incomplete last global batch is dropped unless it is the epoch's only one (then each process gets an even
    share). `lengths`: each sample's signed length (`ConversationDataset.length`), or the sample count.
    `shuffle` keeps each trainer's order, so its runs reproduce: "numpy" (VLM stages: seeded by [seed, epoch]; the
    only one that groups), "torch" (VideoMAE: torch.randperm seeded by seed * 100003 + epoch), "torch_stream"
    (classification: one torch generator seeded once, epoch e its e+1-th permutation).
    """

    def __init__(self, lengths: Sequence[int] | int, batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, group_by_length: bool = True, shuffle: str = "numpy", window: int = 1):
        self.lengths = np.zeros(lengths, dtype=np.int64) if isinstance(lengths, int) else np.asarray(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.group_by_length = group_by_length
        self.shuffle = shuffle
        self.window = window
        self.global_batch = batch_size * world_size
        if shuffle not in SHUFFLES or (group_by_length and shuffle != "numpy"):
            raise ValueError(f"shuffle must be one of {SHUFFLES} (grouping by length needs 'numpy'), got {shuffle!r}")
        if len(self.lengths) < world_size:
            raise ValueError(f"{len(self.lengths)} samples cannot give each of {world_size} processes one")
        if window < 1:
            raise ValueError(f"window must be >= 1 global batch, got {window}")

    def __len__(self) -> int:
        """Batches per epoch for each process."""
        return max(1, len(self.lengths) // self.global_batch)

    def _megabatches(self, idx: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        """idx shuffled, cut into windows, each sorted longest first and cut into global batches (the last short)."""
        idx = idx[rng.permutation(len(idx))]
        size = self.global_batch * self.window
        megas = []
        for k in range(0, len(idx), size):
            w = sorted(idx[k:k + size].tolist(), key=lambda i: -abs(int(self.lengths[i])))
            megas += [w[j:j + self.global_batch] for j in range(0, len(w), self.global_batch)]
        return megas

    def _order(self, epoch: int) -> list[int]:
        n = len(self.lengths)
        if self.shuffle == "numpy":
            return np.random.default_rng([self.seed, epoch]).permutation(n).tolist()
        if self.shuffle == "torch":
            return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch):
            torch.randperm(n, generator=generator)
        return torch.randperm(n, generator=generator).tolist()

    def epoch(self, epoch: int) -> list[list[int]]:
        if not self.group_by_length:
            order = self._order(epoch)
            globals_ = [order[k:k + self.global_batch] for k in range(0, len(order), self.global_batch)]
        else:
            rng = np.random.default_rng([self.seed, epoch])
            mm = np.flatnonzero(self.lengths >= 0)
            text = np.flatnonzero(self.lengths < 0)
            megas = self._megabatches(mm, rng) + self._megabatches(text, rng)
            full = [m for m in megas if len(m) == self.global_batch]
            rest = [i for m in megas if len(m) < self.global_batch for i in m]  # leftovers mix modalities
            full += [rest[k:k + self.global_batch] for k in range(0, len(rest), self.global_batch)]
            globals_ = [full[i] for i in rng.permutation(len(full))]
        if len(self.lengths) < self.global_batch:  # one short global batch, shared evenly
            return [globals_[0][self.rank::self.world_size]]
        globals_ = [g for g in globals_ if len(g) == self.global_batch][: len(self)]
        return [g[self.rank * self.batch_size:(self.rank + 1) * self.batch_size] for g in globals_]


def steps_for(num_batches: int, grad_accum: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of a stage."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(num_batches * epochs / grad_accum))
