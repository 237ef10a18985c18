"""What scoring a benchmark's options costs: one row per clip's questions (a prefix tree) vs a copied KV cache.

    python scripts/bench_scoring.py [--model runs/quickstart/final] [--bench demo_data/synth/mvbench]
                                    [--profile cloze] [--limit N] [--repeats 1] [--no-docs]

`vlm eval mcq` with a loglik profile (`cloze`, `loglik`) scores every option of every question. A clip's questions
share their start (system prompt and video). The peer is how it was scored before, and how an LLM without custom
attention masks (flash attention) still is: the shared start runs once into a KV cache, the cache is copied for
every question to run its rest, then for every option to run the option. `vlm` now puts the start, every
question's rest and every option in one row with a mask that lets each part see only its ancestors (a prefix tree),
so nothing is copied or computed twice. Both run `evaluate_mcq` end to end in this process on the model as
`make demo` loads it (LoRA merged), alternating, and their predictions are compared.
"""

from __future__ import annotations

import argparse
import json
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

from evals.mcq import evaluate_mcq  # noqa: E402
from vlm.model import VideoLLM  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="runs/quickstart/final")
    p.add_argument("--bench", default="demo_data/synth/mvbench")
    p.add_argument("--profile", default="cloze")
    p.add_argument("--limit", type=int, default=None, help="questions per task (default: all)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    model = VideoLLM.from_pretrained(args.model, merge_lora=True)
    tree = model._score_tree
    times: dict[str, list[float]] = {"cache": [], "tree": []}
    preds: dict[str, dict[str, dict]] = {}
    metrics = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for way in ("cache", "tree"):
                model._score_tree = model._score_with_cache if way == "cache" else tree
                out = Path(tmp) / f"{way}{r}"
                t0 = time.perf_counter()
                result = evaluate_mcq(model, args.bench, out, profile=args.profile, limit=args.limit,
                                      progress=False)
                times[way].append(time.perf_counter() - t0)
                metrics[way] = result.metrics
                preds[way] = {row["uid"]: row for row in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())
                              if "uid" in row}
                print(f"repeat {r + 1}: {way} {times[way][-1]:.1f} s", flush=True)
    peer, ours = statistics.median(times["cache"]), statistics.median(times["tree"])
    a, b = preds["cache"], preds["tree"]
    same = sum(a[u].get("pred") == b[u].get("pred") for u in a)
    worst = max(abs(x - y) for u in a for x, y in zip(a[u].get("scores") or [], b[u].get("scores") or []))
    body = "\n".join([
        f"`python scripts/bench_scoring.py --model {args.model} --bench {args.bench} --profile {args.profile}"
        + (f" --limit {args.limit}" if args.limit else "") + f" --repeats {args.repeats}`", "",
        f"{len(a)} questions, profile `{args.profile}`, `evaluate_mcq` end to end (batch 8, clips decoded by 2 "
        f"workers); medians of {args.repeats} run(s) each way, alternating, in one process; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}.", "",
        "| option scoring | seconds | vs KV cache |", "|---|---|---|",
        f"| shared start in a KV cache, copied per question and per option (as before; LLMs without custom masks) "
        f"| {peer:.1f} | 1.00x |",
        f"| **one row per clip's questions, a prefix-tree mask** | **{ours:.1f}** | **{peer / ours:.2f}x** |", "",
        f"Mean over tasks {metrics['cache']['accuracy_mean_over_tasks']:.2f}% / "
        f"{metrics['tree']['accuracy_mean_over_tasks']:.2f}%; the same answer to {same} of {len(a)} questions; "
        f"largest option score difference {worst:.1e} nats."])
    print(body)
    if not args.no_docs:
        update_section("bench-scoring", "## Option scoring: a prefix tree per clip (bench_scoring)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
