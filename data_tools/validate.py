"""Validate a LLaVA-style conversation file: structure, placeholders, media paths and decodability."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from vlm.data.conversation import PLACEHOLDERS, DataFormatError, read_records, record_problems, resolve_media
from vlm.data.hf import ArrowRows, media_base, source_kind

log = logging.getLogger(__name__)


@dataclass
class Problem:
    location: str  # "file:line" or "file[index]"
    sample_id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.location} (id {self.sample_id}): {self.reason}"


@dataclass
class ValidationReport:
    path: str
    total: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def bad_samples(self) -> int:
        return len({p.location for p in self.problems})

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return f"{self.path}: {self.total} samples, {self.bad_samples} bad, {len(self.problems)} problems"


def _media_problem(path: Path, kind: str, decode: bool) -> str | None:
    """Why this media file is unusable, or None. Videos are probed and sampled; images are opened."""
    if not path.exists():
        return f"{kind} file not found: {path}"
    if not decode:
        return None
    from vlm.video import VideoDecodeError, read_clip

    try:
        read_clip(path, num_frames=4, policy="uniform")
    except VideoDecodeError as e:
        return f"undecodable {kind}: {e.reason}"
    return None


def validate_file(path: str | os.PathLike, media_root: str | os.PathLike | None = None, *,
                  decode: bool = True, progress: bool = True) -> ValidationReport:
    """Every problem of every sample of a JSON/JSONL file, a saved HF dataset folder or Parquet; media are resolved
    against `media_root` (default: the folder holding the file or dataset folder).

    Each media file is checked once however many samples share it.
    """
    report = ValidationReport(str(path))
    root = Path(media_root) if media_root is not None else media_base(path).parent
    media_status: dict[Path, str | None] = {}
    try:  # a JSON list / JSONL file, or a saved HF dataset / Parquet (read a batch of Arrow rows at a time)
        records = list(read_records(path) if source_kind(path) == "json" else ArrowRows(path).records())
    except DataFormatError as e:
        report.problems.append(Problem(str(path), "-", str(e).split(": ", 1)[-1]))
        return report
    for location, record in tqdm(records, desc=f"validate {Path(path).name}", disable=not progress, unit="sample"):
        report.total += 1
        if isinstance(record, Exception):
            report.problems.append(Problem(location, "?", str(record).split(": ", 1)[-1]))
            continue
        sid = str(record.get("id", "?")) if isinstance(record, dict) else "?"
        reasons = record_problems(record)
        if isinstance(record, dict):
            for kind in PLACEHOLDERS:
                media = record.get(kind)
                if not isinstance(media, str) or not media.strip():
                    continue
                try:
                    file = resolve_media(root, media)
                except DataFormatError as e:
                    reasons.append(str(e))
                    continue
                if file not in media_status:
                    media_status[file] = _media_problem(file, kind, decode)
                if media_status[file]:
                    reasons.append(media_status[file])
        report.problems.extend(Problem(location, sid, r) for r in reasons)
    log.info(report.summary())
    return report
