"""LLaVA-style conversation data: JSON list or JSONL of {"id", "video"|"image", "conversations": [...]}."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

PLACEHOLDERS = {"video": "<video>", "image": "<image>"}
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def describe_in_place(text: str, description: str, media_type: str = "video") -> str:
    """`text` with its media placeholder replaced by a text description of the media (the text-oracle input:
    the same prompt, with what the clip shows written out instead of shown)."""
    placeholder = PLACEHOLDERS[media_type]
    if placeholder not in text:
        raise DataFormatError(f"no {placeholder} placeholder to describe in {text[:60]!r}")
    return text.replace(placeholder, f"Video description: {description.strip()}", 1)


class DataFormatError(ValueError):
    """A data file or one of its samples is malformed; the message names the file, the sample and the reason."""


class MediaPathError(DataFormatError):
    """A media path is absolute outside the media root, or climbs out of it."""


class TemplateMismatchError(ValueError):
    """The chat template and the tokenizer disagree about a sample; the message names the sample."""


@dataclass
class Turn:
    role: str  # "system" | "user" | "assistant"
    text: str


@dataclass
class ConversationSample:
    id: str
    turns: list[Turn]
    media: str | None  # path as written in the file (relative to the media root)
    media_type: str | None  # "video" | "image" | None (text-only)
    location: str  # "file:line" (JSONL) or "file[index]" (JSON list), for error messages
    extra: dict[str, Any] = field(default_factory=dict)  # other keys of the record (e.g. start/end)

    @property
    def placeholder(self) -> str | None:
        return PLACEHOLDERS.get(self.media_type) if self.media_type else None


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Yield (location, record) for each record of a JSON list or JSONL file.

    A malformed JSONL line is yielded as (location, DataFormatError) so a validator can report every bad line;
    a malformed JSON list is one error for the whole file (with its line and column).
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            location = f"{path}:{lineno}"
            try:
                yield location, json.loads(line)
            except json.JSONDecodeError as e:
                yield location, DataFormatError(f"{location}: malformed JSON: {e.msg} (column {e.colno})")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    for index, record in enumerate(data):
        yield f"{path}[{index}]", record


def record_problems(record: Any) -> list[str]:
    """Every structural problem of one LLaVA record (empty list = well formed). Media files are not checked here."""
    if not isinstance(record, dict):
        return [f"sample is a {type(record).__name__}, not an object"]
    problems: list[str] = []
    media_keys = [k for k in PLACEHOLDERS if k in record]
    if len(media_keys) > 1:
        problems.append("sample has both 'video' and 'image'")
    for key in media_keys:
        if not isinstance(record[key], str) or not record[key].strip():
            problems.append(f"'{key}' must be a non-empty path string")
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        return problems + ["'conversations' must be a non-empty list"]
    expected = "human"
    first_human = None
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            problems.append(f"turn {i} must be an object with 'from' and 'value'")
            continue
        role, value = turn["from"], turn["value"]
        if i == 0 and role == "system":
            continue
        if role not in ("human", "gpt"):
            problems.append(f"turn {i} has unknown role '{role}' (expected 'human' or 'gpt')")
        elif role != expected:
            problems.append(f"turn {i} is '{role}' but '{expected}' was expected (turns must alternate human/gpt)")
        expected = "gpt" if role == "human" else "human"
        if not isinstance(value, str) or not value.strip():
            problems.append(f"turn {i} ('{role}') is empty")
        elif role == "human" and first_human is None:
            first_human = i
    if convs and isinstance(convs[-1], dict) and convs[-1].get("from") != "gpt":
        problems.append("the last turn must be 'gpt' (an answer to learn from)")
    all_text = [t.get("value", "") for t in convs if isinstance(t, dict) and isinstance(t.get("value"), str)]
    for kind, tag in PLACEHOLDERS.items():
        count = sum(text.count(tag) for text in all_text)
        if kind in media_keys:
            first_text = convs[first_human]["value"] if first_human is not None else ""
            if count == 0:
                problems.append(f"'{kind}' sample has no {tag} placeholder")
            elif count > 1:
                problems.append(f"{tag} placeholder appears {count} times (exactly one is allowed)")
            elif tag not in first_text:
                problems.append(f"{tag} placeholder is not in the first human turn")
        elif count:
            problems.append(f"{tag} placeholder in a sample without '{kind}'")
    return problems


def parse_record(record: Any, location: str) -> ConversationSample:
    """A validated ConversationSample, or DataFormatError listing every problem of the record."""
    problems = record_problems(record)
    if problems:
        sid = record.get("id", "?") if isinstance(record, dict) else "?"
        raise DataFormatError(f"{location} (id {sid}): " + "; ".join(problems))
    media_type = next((k for k in PLACEHOLDERS if k in record), None)
    turns = [Turn(ROLES[t["from"]], t["value"]) for t in record["conversations"]]
    extra = {k: v for k, v in record.items() if k not in ("id", "conversations", "video", "image")}
    return ConversationSample(
        id=str(record.get("id", location)),
        turns=turns,
        media=record[media_type] if media_type else None,
        media_type=media_type,
        location=location,
        extra=extra,
    )


def resolve_media(media_root: str | os.PathLike, media: str, location: str = "") -> Path:
    """The media file's absolute path; raises MediaPathError if it would escape the media root."""
    root = Path(media_root).resolve()
    candidate = (root / media).resolve()
    if candidate != root and root not in candidate.parents:
        where = f"{location}: " if location else ""
        raise MediaPathError(f"{where}media path '{media}' escapes the media root {root}")
    return candidate


def load_conversations(path: str | os.PathLike) -> list[ConversationSample]:
    """All samples of a LLaVA JSON/JSONL file; raises DataFormatError on the first malformed record.

    Use `data_tools.validate` (or `vlm data validate`) to see every problem of a file at once.
    """
    samples = []
    for location, record in read_records(path):
        if isinstance(record, Exception):
            raise record
        samples.append(parse_record(record, location))
    return samples
