"""One results schema for every harness, and the append-only prediction log that makes runs resumable.

results.json (written by every harness, read by `evals.report`):

    {
      "schema": "vlm.eval/1",
      "task_type": "mcq" | "openqa" | "retrieval" | "classify" | "reliance" | "slots",
      "profile":   MCQ: the protocol profile record (prompt strings, prefill, parse rule); else null,
      "judge":     open-ended QA: the judge record ({"id": ..., ...}); else null,
      "model":     a model id (a folder, a hub id, a class name),
      "dataset":   {"path": ..., "name": ...},
      "metrics":   headline numbers (accuracies and recalls in percent),
      "per_task":  {task / class / direction: {metric: value}},
      "counts":    how many items were asked, scored, unparsable, skipped (with reasons), resumed,
      "settings":  everything else that shapes the numbers (frames, sampling, batch size, ...),
      "created":   ISO-8601 UTC time, "vlm_version": ...
    }

predictions.jsonl holds one JSON object per line, written and flushed as soon as a prediction exists. A
rerun reads it back and skips the uids it already holds; the newest line of a uid wins, and a truncated
last line (a run killed mid-write) is ignored with a warning.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from vlm import __version__

log = logging.getLogger(__name__)
SCHEMA = "vlm.eval/1"
TASK_TYPES = ("mcq", "openqa", "retrieval", "classify", "reliance", "slots")


@dataclass
class EvalResult:
    """The results of one evaluation run (see the module docstring for the schema)."""

    task_type: str
    model: str
    dataset: dict[str, Any]
    metrics: dict[str, Any]
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] | None = None
    judge: dict[str, Any] | None = None
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    vlm_version: str = __version__
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got '{self.task_type}'")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        order = ["schema", "task_type", "profile", "judge", "model", "dataset", "metrics", "per_task", "counts",
                 "settings", "created", "vlm_version"]
        return {k: d[k] for k in order}

    def save(self, path: str | os.PathLike) -> Path:
        """Write results JSON atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvalResult":
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        if d.get("schema") != SCHEMA:
            raise ValueError(f"{path}: not a {SCHEMA} results file (schema={d.get('schema')!r})")
        return cls(**d)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def read_records(path: str | os.PathLike, identity: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The newest record of each uid in a predictions JSONL ({} when there is no file); unreadable lines (a run
    stopped mid-write) are skipped with a warning, and a record whose `identity` fields differ is an error."""
    path = Path(path)
    records: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return records
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: unreadable line ignored (a run stopped mid-write?)", path, lineno)
            continue
        for key, value in (identity or {}).items():
            if rec.get(key) != value:
                raise ValueError(f"{path}:{lineno}: record has {key}={rec.get(key)!r} but this run has "
                                 f"{key}={value!r}; use another output folder")
        records[str(rec["uid"])] = rec
    return records


class PredictionLog:
    """Append-only JSONL of per-item records keyed by "uid"; each line is flushed to disk as it is written."""

    def __init__(self, path: str | os.PathLike, identity: dict[str, Any] | None = None):
        """`identity` (e.g. {"profile": "mvbench", "model": "..."}) must match every existing record's fields;
        mixing predictions of different models or protocols in one file is an error, not a silent merge."""
        self.path = Path(path)
        self.identity = dict(identity or {})
        self.records: dict[str, dict[str, Any]] = read_records(self.path, self.identity)
        if self.records:
            log.info("%s: resuming, %d records already present", self.path, len(self.records))
        self.resumed = len(self.records)
        self._fh = None

    def done(self, uid: str) -> bool:
        """True when the uid has a record without an error."""
        rec = self.records.get(uid)
        return rec is not None and not rec.get("error")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (identity fields added) and flush it to disk."""
        rec = {**self.identity, **record}
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_file() and self.path.stat().st_size:
                with open(self.path, "rb") as f:  # a killed run may have left a partial line: start a new one
                    f.seek(-1, os.SEEK_END)
                    needs_newline = f.read(1) != b"\n"
            else:
                needs_newline = False
            self._fh = open(self.path, "a", encoding="utf-8")
            if needs_newline:
                self._fh.write("\n")
        self._fh.write(json.dumps(rec, default=_json_default) + "\n")
        self._fh.flush()
        self.records[str(rec["uid"])] = rec

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "PredictionLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def select(self, uids: Iterable[str]) -> list[dict[str, Any]]:
        """The latest record of each of these uids that has one, in the given order."""
        return [self.records[u] for u in uids if u in self.records]
