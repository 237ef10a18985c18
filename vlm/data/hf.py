"""Records kept in Hugging Face `datasets` storage: a folder written by `Dataset.save_to_disk`, or Parquet (one
file, a folder of shards, a glob of shards).

The rows are LLaVA conversation records (`vlm.data.conversation`) or MVBench items (`vlm.data.mvbench`) with the
same keys as their JSON twins; every row goes through the same validation as a JSON record. Rows are read from a
memory-mapped Arrow table one at a time when they are needed: a mixture of a million rows keeps a few numbers per
row in memory, not a million dicts. Parquet is converted once into the `datasets` cache (memory-mapped afterwards;
a later run finds the conversion there) unless it is streamed (`vlm.data.stream`).

A row's location is `<path>:<row>` (row counted from 0; for Parquet the shard file and the row within it), so a bad
row is named like a bad line of a JSONL file. Arrow has no absent keys: a null value counts as an absent key.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import itertools
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from vlm.data.conversation import ConversationSample, DataFormatError, parse_record

GLOB_CHARS = "*?["


def source_kind(path: str | os.PathLike) -> str:
    """'json' (a JSON list or JSONL file), 'saved' (a `save_to_disk` folder) or 'parquet' (a .parquet file, a
    folder of them, or a glob)."""
    p = Path(path)
    if p.is_dir():
        if (p / "state.json").is_file():
            return "saved"
        if (p / "dataset_dict.json").is_file():
            splits = json.loads((p / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
            raise DataFormatError(f"{p}: a saved DatasetDict (splits {splits}), not one dataset: name a split's "
                                  f"folder, e.g. {p / splits[0] if splits else p / 'train'}")
        return "parquet"
    if p.suffix == ".parquet" or (not p.exists() and any(c in str(path) for c in GLOB_CHARS)):
        return "parquet"
    return "json"


def media_base(path: str | os.PathLike) -> Path:
    """What a source path names as a place: itself, or for a glob the folder it searches (the part before its
    first wildcard). A source's default media root is the folder holding this, so `data/*.parquet` and `data/`
    resolve media alike."""
    parts = Path(path).parts
    wild = next((i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS)), None)
    if wild is None or Path(path).exists():
        return Path(path)
    return Path(*parts[:wild]) if wild else Path(".")


def parquet_files(path: str | os.PathLike) -> list[Path]:
    """The shards of a Parquet source in reading order: the file, a folder's .parquet files (recursively) or a
    glob's matches, sorted by name."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(p.rglob("*.parquet"))
    else:
        files = sorted(Path(f) for f in glob.glob(str(path), recursive=True) if f.endswith(".parquet"))
    if not files:
        raise DataFormatError(f"{path}: no Parquet files there (expected a .parquet file, a folder of them or a glob)")
    return files


def source_problem(path: str | os.PathLike) -> str | None:
    """Why a mixture path cannot be read (None when it can), checked without reading any rows: what recipe
    validation reports before a run starts."""
    try:
        kind = source_kind(path)
        if kind == "parquet":
            parquet_files(path)
        elif kind == "json" and not Path(path).is_file():
            return f"{path} not found"
    except DataFormatError as e:
        return str(e)
    return None


def row_record(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the JSON record it stands for: Arrow gives every row every column, null where a record had none."""
    return {k: v for k, v in row.items() if v is not None}


def parquet_row_counts(files: Sequence[Path]) -> list[int]:
    """Rows of each Parquet file, from its footer (no data read)."""
    import pyarrow.parquet as pq

    return [pq.read_metadata(f).num_rows for f in files]


def open_dataset(path: str | os.PathLike) -> Any:
    """A `datasets.Dataset` over a saved folder (`load_from_disk`) or Parquet (`load_dataset("parquet")`), both
    memory-mapped."""
    import datasets

    kind = source_kind(path)
    try:
        if kind == "saved":
            return datasets.load_from_disk(str(path))
        if kind == "parquet":
            files = [str(f) for f in parquet_files(path)]
            return datasets.load_dataset("parquet", data_files=files, split="train")
    except (OSError, ValueError) as e:
        if isinstance(e, DataFormatError):
            raise
        raise DataFormatError(f"{path}: cannot be read as a {kind} dataset: {e}") from e
    raise DataFormatError(f"{path}: not a saved dataset or Parquet (a JSON file is read with read_records)")


def stream_parquet(files: Sequence[Path], skip: int = 0, batch_size: int = 1024) -> Iterator[dict[str, Any]]:
    """Rows of Parquet shards read as they are iterated (a streaming `datasets.IterableDataset`, `batch_size` rows
    decoded at a time), the first `skip` rows passed over. Read in batches with `.iter()`, not `iter(ds)`: inside
    a DataLoader worker the latter hands each worker only some of the shards, and every worker needs them all."""
    import datasets

    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=True,
                               batch_size=batch_size)
    for batch in (ds.skip(skip) if skip else ds).iter(batch_size=batch_size):
        keys = list(batch)
        for values in zip(*batch.values()):
            yield dict(zip(keys, values))


class ArrowRows:
    """Random access to the rows of a saved dataset or Parquet, opened on first use. It pickles with its table,
    which `datasets` pickles as the path of the memory-mapped file: DataLoader workers map it, never copy it."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.kind = source_kind(path)
        if self.kind == "json":
            raise DataFormatError(f"{path}: a JSON file, not a saved dataset or Parquet")
        self._ds: Any = None
        self._shards: list[str] = []
        self._starts: list[int] = []
        if self.kind == "parquet":
            files = parquet_files(path)
            counts = parquet_row_counts(files)
            self._shards = [str(f) for f in files]
            self._starts = [0, *itertools.accumulate(counts)][:-1]

    @property
    def ds(self) -> Any:
        if self._ds is None:
            self._ds = open_dataset(self.path)
        return self._ds

    def __len__(self) -> int:
        return len(self.ds)

    def location(self, row: int) -> str:
        if self.kind == "parquet":
            shard = bisect.bisect_right(self._starts, row) - 1
            return f"{self._shards[shard]}:{row - self._starts[shard]}"
        return f"{self.path}:{row}"

    def record(self, row: int) -> dict[str, Any]:
        return row_record(self.ds[row])

    def sample(self, row: int) -> ConversationSample:
        """The conversation of one row (DataFormatError if the row is malformed)."""
        return parse_record(self.record(row), self.location(row))

    def records(self, batch_size: int = 4096) -> Iterator[tuple[str, dict[str, Any]]]:
        """(location, record) of every row in order, read a batch of Arrow rows at a time."""
        row = 0
        for table in self.ds.with_format("arrow").iter(batch_size=batch_size):
            for r in table.to_pylist():
                yield self.location(row), row_record(r)
                row += 1


@contextmanager
def _quiet_progress() -> Iterator[None]:
    import datasets

    was_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            datasets.enable_progress_bars()


def save_records(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write records (LLaVA conversations, MVBench items) as a saved dataset at `path` (`load_from_disk` reads it;
    so does a mixture). Columns are the union of every record's keys (a record without one gets null, which reads
    back as absent), so each row reads back as its record; the fingerprint is a hash of the records, so the same
    records give the same bytes."""
    import datasets
    import pyarrow as pa

    keys: dict[str, None] = {}
    for r in records:
        keys.update(dict.fromkeys(r))
    columns = {k: pa.array([r.get(k) for r in records]) for k in keys} or {"id": pa.array([], pa.string())}
    table = pa.table(columns)  # an empty dataset still needs a column to be read back
    fingerprint = hashlib.sha1(json.dumps(list(records), sort_keys=True).encode()).hexdigest()[:16]
    ds = datasets.Dataset(datasets.table.InMemoryTable(table), fingerprint=fingerprint)
    with _quiet_progress():
        ds.save_to_disk(str(path), num_shards=None if records else 1)
    return Path(path)
