"""Format converters into the LLaVA conversation format that training reads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlm.data.mvbench import LETTERS, load_mvbench


def mvbench_to_llava(root: str | os.PathLike, out: str | os.PathLike, tasks: list[str] | None = None) -> int:
    """An MVBench-layout benchmark -> multiple-choice instruction data (media paths relative to `root`).

    Questions follow the benchmark's own format ("Question: ...\\nOptions:\\n(A) ..."), answers are "(B) text".
    Bounded items keep their start/end, which the training loader honours. Returns the number of samples.
    """
    root = Path(root).resolve()
    records: list[dict[str, Any]] = []
    for task, items in load_mvbench(root, tasks).items():
        for item in items:
            options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(item.candidates))
            media_key = "image" if item.data_type == "image" else "video"
            rec: dict[str, Any] = {
                "id": item.uid, media_key: str(Path(item.video).resolve().relative_to(root)),
                "conversations": [
                    {"from": "human", "value": f"<{media_key}>\nQuestion: {item.question}\nOptions:\n{options}"},
                    {"from": "gpt", "value": f"({item.answer_letter}) {item.answer}"},
                ],
            }
            if item.start is not None:
                rec["start"], rec["end"] = item.start, item.end
            records.append(rec)
    Path(out).write_text(json.dumps(records, indent=1), encoding="utf-8")
    return len(records)


def videoqa_to_llava(qa_file: str | os.PathLike, out: str | os.PathLike, video_template: str = "{video}.mp4") -> int:
    """MSVD-QA / MSRVTT-QA / ActivityNet-QA style JSON ([{video|video_id|video_name, question, answer}]) ->
    open-ended instruction data; `video_template` maps the id to a path under the media root."""
    data = json.loads(Path(qa_file).read_text(encoding="utf-8"))
    records = []
    for i, row in enumerate(data):
        vid = row.get("video") or row.get("video_id") or row.get("video_name")
        if vid is None or "question" not in row or "answer" not in row:
            raise ValueError(f"{qa_file}[{i}]: needs video/video_id/video_name, question and answer")
        question = row["question"].strip()
        records.append({"id": str(row.get("question_id", i)), "video": video_template.format(video=vid),
                        "conversations": [{"from": "human", "value": f"<video>\n{question}"},
                                          {"from": "gpt", "value": str(row["answer"]).strip()}]})
    Path(out).write_text(json.dumps(records, indent=1), encoding="utf-8")
    return len(records)
