"""The text oracle: every clip replaced by a description of its ground truth, in the same prompts.

It bounds what the language side can learn with a given budget when the vision side is perfect: train on the
oracle files instead of the video files (same instructions, same steps) and score the benchmark with the
descriptions in place of the clips (`vlm eval mcq --descriptions DIR/oracle/descriptions.json`). If the oracle
cannot learn the task, the problem is the answer format, the loss or the scoring, not vision.

A description holds what the benchmark needs: the scene at the start (background, objects with size, colour and
shape), every event with its time in seconds, which objects stay still, and the clip's duration. The "frames"
style holds instead what perfect per-frame perception sees in the sampled frames, with no events: it separates
reading facts from working out what happened between frames.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_tools.synth.captions import still_note, timed_caption
from data_tools.synth.generate import _write_json
from vlm.data.conversation import describe_in_place, read_records

#: the files of a synthetic folder that get an oracle twin (when present)
ORACLE_FILES = ("captions_train.json", "instruct_train.json", "instruct_test.json", "qa_train.json", "qa_test.json")


def describe(meta: dict[str, Any]) -> str:
    """The ground-truth description of one clip from its `meta.jsonl` record."""
    still = still_note(meta) if meta["label"] != "shuffling" else ""
    return f"{timed_caption(meta)}{still} The video lasts {meta['duration_s']:.1f} seconds."


def describe_frames(meta: dict[str, Any], num_frames: int = 8) -> str:
    """What perfect per-frame perception sees in the frames a model samples (`uniform` policy): per frame its
    time, the background and every visible object's size, colour, shape, centre in pixels, and scale and angle
    when not 1 and 0. No events: whatever happens between frames is left to the reader to work out."""
    from vlm.video.sampling import sample_indices

    lines = []
    for k in sample_indices(meta["num_frames"], meta["fps"], num_frames, "uniform").tolist():
        background = next((e["to_background"] for e in reversed(meta["events"])
                           if e["type"] == "background_change" and k >= e["end_frame"]), meta["background"]["name"])
        seen = []
        for obj in meta["objects"]:
            track = obj["track"]
            if not track["visible"][k] or track["opacity"][k] < 0.3:
                continue
            text = f"{obj['size']} {track['color'][k]} {obj['shape']} at ({track['x'][k]:.0f}, {track['y'][k]:.0f})"
            if abs(track["scale"][k] - 1) > 0.05:
                text += f" scale {track['scale'][k]:.1f}"
            if track["angle"][k]:
                text += f" angle {track['angle'][k]:.0f}"
            seen.append(text)
        lines.append(f"{k / meta['fps']:.1f}s: {background} background; {'; '.join(seen) or 'no objects'}.")
    return "Frames: " + " ".join(lines)


def _text_only(record: dict[str, Any], description: str, location: str) -> dict[str, Any]:
    """A LLaVA record with its video replaced by the description (text-only: no "video" key)."""
    conv = [dict(turn) for turn in record["conversations"]]
    first = next(i for i, t in enumerate(conv) if t["from"] == "human")
    try:
        conv[first]["value"] = describe_in_place(conv[first]["value"], description)
    except ValueError as e:
        raise ValueError(f"{location}: {e}") from e
    out = {k: v for k, v in record.items() if k not in ("video", "conversations")}
    return out | {"conversations": conv}


def write_oracle(root: str | Path, style: str = "events", num_frames: int = 8) -> dict[str, int]:
    """Write the text oracle: descriptions.json ({clip id: description}) and a text-only twin of every training /
    instruction file, under `root/oracle/` (style "events": `describe`) or `root/oracle_frames/` (style
    "frames": `describe_frames` of `num_frames` frames). Returns the number of records written per file."""
    if style not in ("events", "frames"):
        raise ValueError(f"oracle style must be 'events' or 'frames', got {style!r}")
    root = Path(root)
    metas = [json.loads(line) for line in (root / "meta.jsonl").read_text(encoding="utf-8").splitlines() if line]
    by_video = {m["video"]: describe(m) if style == "events" else describe_frames(m, num_frames) for m in metas}
    out = root / ("oracle" if style == "events" else "oracle_frames")
    descriptions = {m["id"]: by_video[m["video"]] for m in metas}
    return write_described(root, out, descriptions, by_video)


def write_described(root: str | Path, out: str | Path, descriptions: dict[str, str],
                    by_video: dict[str, str], partial: bool = False) -> dict[str, int | str]:
    """`out/descriptions.json` ({clip id or video stem: text}, for `vlm eval mcq --descriptions`) and a text-only
    twin of each of `root`'s `ORACLE_FILES` present, every record's video replaced by `by_video[its video path]`.
    Returns the number of records written per file. A record whose video has no description is an error, or with
    `partial` (descriptions of some clips only, e.g. the test clips) its file's twin is not written and the count
    says why."""
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "descriptions.json", descriptions)
    counts: dict[str, int | str] = {"descriptions.json": len(descriptions)}
    for name in ORACLE_FILES:
        if not (root / name).is_file():
            continue
        records, missing = [], []
        for location, record in read_records(root / name):
            if isinstance(record, Exception):
                raise record
            if record["video"] not in by_video:
                if not partial:
                    raise ValueError(f"{location}: no description of {record['video']}")
                missing.append(location)
                continue
            records.append(_text_only(record, by_video[record["video"]], location))
        if missing:
            counts[name] = f"not written: {len(missing)} of {len(records) + len(missing)} records' clips not described"
            continue
        _write_json(out / name, records)
        counts[name] = len(records)
    return counts
