"""Inference speed of a trained model on the CPU: LoRA merged into the weights at load vs adapters kept, and the
EfficientNet tower a few frames per call vs a whole batch at once; updates the bench_inference section of
docs/BENCHMARKS.md.

    .venv/bin/python scripts/bench_inference.py [--model runs/quickstart/final] [--bench demo_data/synth/mvbench]
                                                [--samples 12] [--rounds 3] [--no-docs]

1. **LoRA merged.** `VideoLLM.from_pretrained(..., merge_lora=True)` (what evaluation, chat, serving and the demo
   load) against the same folder loaded with its adapters kept (peft: the base matmul plus the adapter's two per
   adapted layer). Both score the answer loss of the first `--samples` held-out records of `qa_test.json` beside
   the benchmark (the visual-reliance step of `make demo`: one forward per record); seconds, the ratio and the
   largest loss difference.
2. **Frames per tower call.** The model's tower (EfficientNet-Lite0 in the quickstart) on a batch of 8 clips of
   the model's frame count, as `precompute_features` hands it over: a few frames per call (the tower's CPU
   default) vs every frame in one call; milliseconds per frame, the ratio and the largest feature difference.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from bench_docs import update_section  # noqa: E402
from bench_eval_speed import add_demo_model_args, load_demo_model  # noqa: E402

from vlm.data.conversation import resolve_media  # noqa: E402
from vlm.data.dataset import SourceSpec, load_mixture  # noqa: E402
from vlm.model import VideoLLM  # noqa: E402
from vlm.towers import efficientnet  # noqa: E402
from vlm.video.decode import read_clip  # noqa: E402

SECTION = "## Inference: LoRA merged at load, and frames per tower call"


def losses(model: VideoLLM, batches: list) -> tuple[float, list[float]]:
    """(seconds, answer loss of each batch) without gradients."""
    t = time.perf_counter()
    with torch.no_grad():
        out = [float(model(b).loss) for b in batches]
    return time.perf_counter() - t, out


def tower_ms_per_frame(model: VideoLLM, pixels: torch.Tensor, frames_per_call: int) -> tuple[float, torch.Tensor]:
    """(ms per frame, tokens) of the tower on pixels [B, T, 3, H, W] at `frames_per_call`."""
    saved = efficientnet.CPU_FRAMES_PER_CALL
    efficientnet.CPU_FRAMES_PER_CALL = frames_per_call
    try:
        t = time.perf_counter()
        with torch.no_grad():
            tokens = model.tower.encode(pixels)
        return 1000 * (time.perf_counter() - t) / (pixels.shape[0] * pixels.shape[1]), tokens
    finally:
        efficientnet.CPU_FRAMES_PER_CALL = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_demo_model_args(p)
    p.add_argument("--samples", type=int, default=12, help="held-out records whose answer loss is computed")
    p.add_argument("--rounds", type=int, default=3, help="turns of every setting (the median is reported)")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()
    model_dir, bench = Path(args.model), Path(args.bench)
    adapted = load_demo_model(model_dir, bench)
    merged = VideoLLM.from_pretrained(model_dir, device="cpu", merge_lora=True)
    data = bench.parent / "qa_test.json"
    items, _ = load_mixture([SourceSpec(str(data), str(data.parent))])
    samples = [it.sample for it in items if it.sample.media_type == "video"][: args.samples]
    frames = adapted.config.num_frames
    clips = [read_clip(resolve_media(data.parent, s.media, s.location), frames, "uniform", None, None) for s in samples]
    batches = [adapted.processor.build_batch([adapted.processor.make_sample(s.turns, c, sample_id=s.id)])
               for s, c in zip(samples, clips)]
    with torch.no_grad():  # positions the LLM reads, after the connector pruned its empty slots
        tokens = sum(int(adapted.embed(b)[1].sum()) for b in batches)
    losses(adapted, batches[:1]), losses(merged, batches[:1])  # warm-up
    runs: dict[str, list[tuple[float, list[float]]]] = {"adapters": [], "merged": []}
    for _ in range(args.rounds):
        runs["adapters"].append(losses(adapted, batches))
        runs["merged"].append(losses(merged, batches))
    sec = {k: statistics.median(t for t, _ in v) for k, v in runs.items()}
    diff = max(abs(a - b) for a, b in zip(runs["adapters"][0][1], runs["merged"][0][1]))

    pixels = torch.stack([adapted.processor.preprocess_clip(c)[0] for c in (clips * 8)[:8]])  # [8, T, 3, H, W]
    ms: dict[int, list[float]] = {n: [] for n in (efficientnet.CPU_FRAMES_PER_CALL, pixels.shape[0] * frames)}
    feats = {}
    tower_ms_per_frame(adapted, pixels[:1], efficientnet.CPU_FRAMES_PER_CALL)  # warm-up
    for _ in range(args.rounds):
        for n in ms:
            t, feats[n] = tower_ms_per_frame(adapted, pixels, n)
            ms[n].append(t)
    few, whole = (statistics.median(ms[n]) for n in ms)
    fdiff = float((feats[efficientnet.CPU_FRAMES_PER_CALL] - feats[pixels.shape[0] * frames]).abs().max())

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lora = adapted.config.lora.get("llm", {})
    body = "\n".join([
        f"Measured {time.strftime('%Y-%m-%d')} by `scripts/bench_inference.py` on {platform.machine()} "
        f"({os.cpu_count()} cores), {torch.get_num_threads()} torch threads, load average {load:.1f} at the end. "
        f"Model: `{model_dir}` ({frames} frames; LoRA r={lora.get('r')} on {len(lora.get('targets', []))} kinds of "
        f"layer); median of {args.rounds} turns.",
        "",
        "| what | peer | this | seconds (peer / this) | ratio | largest difference |",
        "|---|---|---|---|---|---|",
        f"| answer loss of {len(batches)} held-out records ({tokens} tokens), one forward each | adapters kept | "
        f"LoRA merged at load | {sec['adapters']:.2f} / {sec['merged']:.2f} | **{sec['adapters'] / sec['merged']:.2f}x** "
        f"| {diff:.1e} nats |",
        f"| tower on 8 clips of {frames} frames, ms per frame | {pixels.shape[0] * frames} frames per call | "
        f"{efficientnet.CPU_FRAMES_PER_CALL} per call | {whole:.2f} / {few:.2f} | **{whole / few:.2f}x** | {fdiff:.1e} |",
    ])
    print(body)
    if not args.no_docs:
        update_section("bench_inference", SECTION, body)


if __name__ == "__main__":
    main()
