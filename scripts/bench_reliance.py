"""What visual reliance costs: each (sample, clip) pair in a forward of its own vs a clip's samples together.

    python scripts/bench_reliance.py [--model runs/quickstart/final] [--data demo_data/synth/qa_test.json]
                                     [--limit 60] [--partners 2] [--repeats 2] [--no-docs]

`vlm eval reliance` (and `make demo`) scores every held-out sample with its own clip and `partners` others. The peer
is the way it was scored before (`share_prefix=False`): one full forward per pair, the tower and the connector
run for every pair and the system prompt and video recomputed every time. `vlm` now scores a clip's samples
together (`VideoLLM.answer_losses`): the clip is encoded once, the start the samples share before their first
answer runs once into a KV cache, and their rests extend it in one forward. Both run in this process on the model
as `make demo` loads it (LoRA merged), alternating, and their numbers are compared.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_docs import update_section  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.reliance import visual_reliance  # noqa: E402
from vlm.model import VideoLLM  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="runs/quickstart/final")
    p.add_argument("--data", default="demo_data/synth/qa_test.json")
    p.add_argument("--limit", type=int, default=60)
    p.add_argument("--partners", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    model = VideoLLM.from_pretrained(args.model, merge_lora=True)
    times: dict[bool, list[float]] = {False: [], True: []}
    metrics = {}
    for r in range(args.repeats):
        for shared in (False, True):
            t0 = time.perf_counter()
            metrics[shared] = visual_reliance(model, args.data, limit=args.limit, partners=args.partners,
                                              share_prefix=shared, workers=0).metrics
            times[shared].append(time.perf_counter() - t0)
            print(f"repeat {r + 1}: {'shared' if shared else 'per pair'} {times[shared][-1]:.1f} s", flush=True)
    peer, ours = statistics.median(times[False]), statistics.median(times[True])
    a, b = metrics[False], metrics[True]
    worst = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in ("loss_own", "loss_swapped"))
    pairs = a["samples"] * (1 + args.partners)
    body = "\n".join([
        f"`python scripts/bench_reliance.py --model {args.model} --data {args.data} --limit {args.limit} "
        f"--partners {args.partners} --repeats {args.repeats}`", "",
        f"{a['samples']} held-out samples, each with its own clip and {args.partners} others ({pairs} pairs); medians "
        f"of {args.repeats} runs each way, alternating, in one process, clips decoded in it; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.", "",
        "| visual reliance | seconds | vs one forward per pair |", "|---|---|---|",
        f"| one forward per (sample, clip) pair (`share_prefix=False`, as before) | {peer:.1f} | 1.00x |",
        f"| **a clip's samples together, their shared start once (`answer_losses`)** | **{ours:.1f}** | "
        f"**{peer / ours:.2f}x** |", "",
        f"Own clip preferred in {a['own_preferred_percent']:.1f}% / {b['own_preferred_percent']:.1f}% of pairs, gap "
        f"{a['gap']:+.4f} / {b['gap']:+.4f} nats per answer token; largest relative difference of the mean losses "
        f"{worst:.1e}."])
    print(body)
    if not args.no_docs:
        update_section("bench-reliance", "## Visual reliance: a clip's samples scored together (bench_reliance)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
