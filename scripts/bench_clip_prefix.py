"""Option scoring with a clip's video computed once for all its questions, vs every prompt computed whole; updates
the bench_clip_prefix section of docs/BENCHMARKS.md.

    .venv/bin/python scripts/bench_clip_prefix.py [--model runs/quickstart/final] [--bench demo_data/synth/mvbench]
                                                  [--clips 12] [--batches 4,8,16] [--full] [--no-docs]

`evaluate_mcq` hands the model every question about one clip side by side, and `VideoLLM.score_options` runs the
start those prompts share (system prompt and video) once, then the rest of each prompt, then the options. The peer
is the same scorer with every prompt its own group (the scorer before this change: one forward over all prompts
whole, left-padded, then the options), in the same process on the same requests. Measured on the questions of the
first `--clips` clips of the benchmark in clip order (the order `evaluate_mcq` asks them in), clips decoded
beforehand: seconds, the ratio, and the largest score difference against one question at a time. `--full` also
times `evaluate_mcq` on the whole benchmark both ways (the evaluation step of `make demo`) and compares the answers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from bench_docs import update_section  # noqa: E402
from bench_eval_speed import add_demo_model_args, load_demo_model, score_in_batches  # noqa: E402

from evals.mcq import _Runner, decode_item_clip, evaluate_mcq, group_by_clip  # noqa: E402
from evals.profiles import get_profile  # noqa: E402
from vlm.data.mvbench import load_mvbench  # noqa: E402
from vlm.model import VideoLLM  # noqa: E402
from vlm.scoring import ScoringMixin  # noqa: E402

SECTION = "## Evaluation: a clip's video computed once for all its questions"


def each_prompt_alone(embeds: torch.Tensor, attention: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """The peer's plan: every prompt its own group, nothing shared."""
    lengths = [int(n) for n in attention.sum(1)]
    return lengths, list(range(len(lengths))), lengths


def prompt_starts(model: VideoLLM, share: bool) -> Any:
    """A context in which `model` computes the start its prompts share once (share) or every prompt whole."""
    return mock.patch.object(model, "_prefix_plan", ScoringMixin._prefix_plan if share else each_prompt_alone)


def timed(model: VideoLLM, requests: list, batch: int, share: bool) -> tuple[float, list[list[float]]]:
    """(seconds, scores) of `score_in_batches`, shared starts or not."""
    with prompt_starts(model, share):
        return score_in_batches(model, requests, batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_demo_model_args(p)
    p.add_argument("--profile", default="cloze")
    p.add_argument("--clips", type=int, default=12, help="clips whose questions are scored")
    p.add_argument("--batches", default="4,8,16")
    p.add_argument("--rounds", type=int, default=3, help="turns of every setting (the median is reported)")
    p.add_argument("--full", action="store_true", help="also evaluate_mcq on the whole benchmark both ways")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()
    model_dir, bench = Path(args.model), Path(args.bench)
    model = load_demo_model(model_dir, bench)
    profile = get_profile(args.profile)
    data = load_mvbench(bench)
    groups = list(group_by_clip([i for task in data.values() for i in task]).values())[: args.clips]
    frames = model.config.num_frames
    runner = _Runner(model, profile, None)
    requests = [runner.request(i, clip) for g in groups for clip in [decode_item_clip(g[0], frames, "segment_middle")]
                for i in g]
    model.score_options(requests[:2])  # warm-up

    settings = [(1, False)] + [(b, share) for b in map(int, args.batches.split(",")) for share in (False, True)]
    runs: dict[tuple[int, bool], list[tuple[float, list[list[float]]]]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for b, share in settings:
            runs[(b, share)].append(timed(model, requests, b, share))
    base_s, base_scores = statistics.median(t for t, _ in runs[(1, False)]), runs[(1, False)][0][1]
    rows = []
    for b, share in settings:
        sec = statistics.median(t for t, _ in runs[(b, share)])
        peer = statistics.median(t for t, _ in runs[(b, False)])
        diff = max(abs(x - y) for s, r in zip(runs[(b, share)][0][1], base_scores) for x, y in zip(s, r))
        rows.append(f"| {b} | {'shared' if share else 'whole'} | {sec:.1f} | {len(requests) / sec:.2f} | "
                    f"**{peer / sec:.2f}x** | {base_s / sec:.2f}x | {diff:.1e} |")

    full = []
    if args.full:
        work = Path(tempfile.mkdtemp(prefix="bench_clip_prefix_"))
        walls, preds = {}, {}
        for share in (False, True):
            out = work / f"share{int(share)}"
            shutil.rmtree(out, ignore_errors=True)
            with prompt_starts(model, share):
                t = time.perf_counter()
                res = evaluate_mcq(model, bench, out, profile=profile, num_frames=frames, progress=False)
                walls[share] = time.perf_counter() - t
            preds[share] = {json.loads(x)["uid"]: json.loads(x).get("pred")
                            for x in (out / "predictions.jsonl").read_text().splitlines()}
            acc = res.metrics["accuracy_mean_over_tasks"]
        same = sum(preds[True][u] == preds[False].get(u) for u in preds[True])
        full = ["", f"`evaluate_mcq` on the whole benchmark ({len(preds[True])} questions, its default batch of 4, "
                f"decoding included): every prompt whole {walls[False]:.1f} s, the clip's start shared "
                f"{walls[True]:.1f} s, **{walls[False] / walls[True]:.2f}x**; {same} of {len(preds[True])} answers "
                f"the same, mean over tasks {acc:.1f}%."]

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    per_clip = len(requests) / len(groups)
    body = "\n".join([
        f"Measured {time.strftime('%Y-%m-%d')} by `scripts/bench_clip_prefix.py` on {platform.machine()} "
        f"({os.cpu_count()} cores), {torch.get_num_threads()} torch threads, load average {load:.1f} at the end. "
        f"Model: `{model_dir}` ({frames} frames); the {len(requests)} questions about the first {len(groups)} clips "
        f"of `{bench}` ({per_clip:.1f} per clip), in clip order, profile `{args.profile}`; clips decoded beforehand; "
        f"median of {args.rounds} turns.",
        "",
        "| batch | prompt start | seconds | questions/s | vs every prompt whole, same batch | vs batch 1 "
        "| largest score difference vs batch 1 (nats) |",
        "|---|---|---|---|---|---|---|", *rows, *full,
    ])
    print(body)
    if not args.no_docs:
        update_section("bench_clip_prefix", SECTION, body)


if __name__ == "__main__":
    main()
