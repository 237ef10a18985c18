"""The training and QA files of a synthetic folder also as Hugging Face saved datasets (`vlm data synth --format hf`).

Each `<name>.json` gets a twin folder `<name>.hf/` beside it (`datasets.load_from_disk` reads it, and so does a
recipe's mixture: the media root is the same folder). The rows are read back from the JSON file just written, so
they are its records, key for key; the JSON files stay, because every other tool (validate, evals, the oracle)
reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlm.data.hf import save_records

#: the files of a synthetic folder written as saved datasets too
HF_FILES = ("captions_train.json", "instruct_train.json", "instruct_test.json", "qa_train.json", "qa_test.json")
FORMATS = ("json", "hf")


def hf_twin(path: Path) -> Path:
    """Where the saved-dataset twin of a JSON file goes."""
    return path.with_suffix(".hf")


def write_hf(out: str | Path) -> dict[str, int]:
    """Write the saved-dataset twin of every file of HF_FILES present under `out`; returns {folder: rows}."""
    written = {}
    for name in HF_FILES:
        path = Path(out) / name
        if path.is_file():
            records = json.loads(path.read_text(encoding="utf-8"))
            save_records(records, hf_twin(path))
            written[hf_twin(path).name] = len(records)
    return written
