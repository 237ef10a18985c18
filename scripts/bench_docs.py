"""The one place benchmark scripts write their results: a marked section of docs/BENCHMARKS.md."""

from __future__ import annotations

import os
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"


def update_section(name: str, title: str, body: str, path: Path = DOCS) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` (appending the section under `title`
    when it is missing), leaving the rest of the file alone. The file is re-read just before an atomic write, so
    benchmarks that finish one after another never drop each other's sections."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{title}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
