"""Labelled clips for action classification, read the same way by training (`vlm.train.classify`) and evaluation
(`evals.classify`): a JSONL (or JSON list) of {"video", "label"[, "label_id", "id"]}, video paths relative to a root
(default: the file's folder), class names (index = label id) given, in `classes.json` next to the data, or else
the sorted labels. `load_labelled` decodes every clip once into memory, never augmenting (a horizontal flip would
swap "moving left" and "moving right").
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

from vlm.data.conversation import DataFormatError, read_records
from vlm.video import read_clip
from vlm.video.errors import VideoDecodeError
from vlm.video.transforms import VideoPreprocessor

log = logging.getLogger(__name__)


@dataclass
class ClassItem:
    uid: str  # the record's "id", else its index in the file
    video: Path
    label: str
    label_id: int


def load_classification(path: str | os.PathLike, root: str | os.PathLike | None = None,
                        classes: str | os.PathLike | Sequence[str] | None = None) -> tuple[list[ClassItem], list[str]]:
    """(items, class names). Any malformed record is an error naming the file, the line (JSONL) or index (JSON)
    and the reason."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    records = list(read_records(path))
    for _, record in records:
        if isinstance(record, Exception):
            raise record
    if isinstance(classes, (str, os.PathLike)):
        names = list(json.loads(Path(classes).read_text(encoding="utf-8")))
    elif classes is not None:
        names = list(classes)
    elif (path.parent / "classes.json").is_file():
        names = list(json.loads((path.parent / "classes.json").read_text(encoding="utf-8")))
    else:
        names = sorted({str(r.get("label")) for _, r in records if isinstance(r, dict) and "label" in r})
    index = {n: i for i, n in enumerate(names)}
    items = []
    for i, (location, r) in enumerate(records):
        if not isinstance(r, dict) or "video" not in r or ("label" not in r and "label_id" not in r):
            raise DataFormatError(f"{location}: needs 'video' and 'label' (or 'label_id')")
        label_id = r.get("label_id")
        if label_id is not None and (type(label_id) is not int or not 0 <= label_id < len(names)):
            raise DataFormatError(f"{location}: label_id {label_id!r} is not a class index (0 to {len(names) - 1})")
        label = str(r["label"]) if "label" in r else names[label_id]
        if label not in index:
            raise DataFormatError(f"{location}: label '{label}' is not one of the {len(names)} classes")
        if label_id is not None and label_id != index[label]:
            raise DataFormatError(f"{location}: label_id {label_id} disagrees with label '{label}' ({index[label]})")
        items.append(ClassItem(str(r.get("id", i)), base / r["video"], label, index[label]))
    return items, names


class LabelledClips(NamedTuple):
    pixels: torch.Tensor  # [N, T, 3, S, S] float32, preprocessed
    labels: torch.Tensor  # [N] int64
    classes: list[str]
    videos: list[str]
    skipped: list[str]  # "path: reason" for clips that could not be decoded


def load_labelled(path: str | os.PathLike, num_frames: int, preprocessor: VideoPreprocessor, sampling: str = "uniform",
                  root: str | os.PathLike | None = None, classes: str | os.PathLike | Sequence[str] | None = None,
                  progress: bool = True) -> LabelledClips:
    """Every clip of a classification file (see `load_classification`) decoded and preprocessed; undecodable
    clips are skipped, counted and named."""
    items, names = load_classification(path, root, classes)
    pixels, labels, videos, skipped = [], [], [], []
    for item in tqdm(items, desc=f"decode {Path(path).name}", unit="clip", disable=not progress):
        try:
            clip = read_clip(item.video, num_frames, sampling)
        except (VideoDecodeError, OSError) as e:
            skipped.append(f"{item.video}: {e}")
            continue
        pixels.append(preprocessor.clip(clip)[0])
        labels.append(item.label_id)
        videos.append(str(item.video))
    if skipped:
        log.warning("load_labelled: %d of %d clips of %s could not be decoded (skipped)", len(skipped), len(items), path)
    if not pixels:
        raise DataFormatError(f"{path}: no decodable clips")
    return LabelledClips(torch.stack(pixels), torch.tensor(labels), names, videos, skipped)
