"""Dense per-frame annotations ("regions") that a data record can carry beside its conversation.

They train connectors that name what is where in a frame (`word_slots`, with the stage objective "slots"), the way
a detector is trained on boxes:

    "regions": [{"t": 0.0, "scene": {"tone": "gray", "pattern": "noisy"},
                 "objects": [{"center": [0.67, 0.53], "color": "red", "shape": "circle"}, ...]},
                {"t": 0.125, ...}, ...]

One entry per annotated frame: `t`, its time in seconds from the start of the video; `scene`, one word per
frame-level attribute; `objects`, the objects visible in that frame, each with its centre in [0, 1] (x from the
left edge, y from the top) and one word per object attribute. A frame sampled for training takes the annotation
whose `t` is nearest its timestamp. Which attributes exist, and their words, is the connector's vocabulary.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def region_problems(regions: Any, scene: Mapping[str, Sequence[str]] = {},
                    objects: Mapping[str, Sequence[str]] = {}) -> list[str]:
    """Every problem of one record's `regions` (empty list = usable), checked against a connector's vocabulary:
    `scene` and `objects` map each attribute to its words."""
    if not isinstance(regions, list) or not regions:
        return ["'regions' must be a non-empty list of annotated frames"]
    problems: list[str] = []

    def check(kind: str, where: str, got: Any, vocab: Mapping[str, Sequence[str]]) -> None:
        if not isinstance(got, dict):
            problems.append(f"{where}: '{kind}' must be an object of attribute words")
            return
        for attr, words in vocab.items():
            if attr not in got:
                problems.append(f"{where}: no '{attr}'")
            elif got[attr] not in words:
                problems.append(f"{where}: {attr} '{got[attr]}' is not one of the connector's words {list(words)}")

    for i, frame in enumerate(regions):
        where = f"regions[{i}]"
        if not isinstance(frame, dict) or not isinstance(frame.get("t"), (int, float)):
            problems.append(f"{where}: must be an object with a time 't' in seconds")
            continue
        check("scene", where, frame.get("scene", {}), scene)
        objs = frame.get("objects", [])
        if not isinstance(objs, list):
            problems.append(f"{where}: 'objects' must be a list")
            continue
        for j, obj in enumerate(objs):
            at = f"{where}.objects[{j}]"
            centre = obj.get("center") if isinstance(obj, dict) else None
            if (not isinstance(centre, list) or len(centre) != 2
                    or not all(isinstance(c, (int, float)) and 0 <= c <= 1 for c in centre)):
                problems.append(f"{at}: 'center' must be [x, y] in [0, 1]")
                continue
            check("object", at, obj, objects)
        if len(problems) >= 5:  # enough to see what is wrong
            break
    return problems


def nearest_frames(regions: Sequence[dict[str, Any]], timestamps: Sequence[float]) -> list[dict[str, Any]]:
    """The annotation nearest in time to each timestamp (seconds)."""
    times = np.array([float(f["t"]) for f in regions])
    return [regions[int(np.abs(times - float(t)).argmin())] for t in timestamps]


def cell_of(center: Sequence[float], height: int, width: int) -> int:
    """The row-major index of the cell of an h x w grid holding a centre [x, y] in [0, 1]."""
    row = min(height - 1, max(0, int(center[1] * height)))
    col = min(width - 1, max(0, int(center[0] * width)))
    return row * width + col
