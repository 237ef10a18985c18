"""Encoding long videos: the bounded memory (vlm.memory) vs encoding every frame at once, at 1, 3 and 10 minutes.

    python scripts/bench_long.py [--minutes 1 3 10] [--out docs/bench_long.json] [--model runs/long_slots/final]

(Accuracy on the long benchmark: scripts/eval_long.py.)

Videos: the long synthetic world (`vlm data synth --long`) at 1 fps, 128 px. Model: the quickstart's tower and
connector (EfficientNet-Lite0 tapped at stride 16, MLP per 2x2 cell: 16 tokens per frame) in front of the packaged
SmolLM2 (not run: encoding only), or a saved model (`--model`: a tracks-layout word-slot model keeps every frame's
detections, `vlm.memory.TrackMemory`, and its tokens are its tracks text's). Each (method, length) runs in a fresh process, so its peak resident memory
(ru_maxrss) is its own; the ratio column is all-frames / memory. Methods:

- memory: `encode_stream` (chunks of 8 frames, at most 16 groups = 256 tokens kept);
- all frames: every frame at 1 fps decoded, then tower + connector on the whole clip at once (9,600 tokens for
  10 minutes), what a model without a memory or budget does with a long video;
- 16 frames: uniform sampling of 16 frames (the fixed-budget baseline; 256 tokens).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = {"tower": {"name": "efficientnet_lite0", "image_size": 128, "layer": 11},
         "connector": {"name": "mlp", "pool": 2}, "llm": {"loader": "smollm2"}, "num_frames": 16}


def child(method: str, video: str, model_dir: str = "") -> dict:
    import torch

    from vlm.memory import encode_stream
    from vlm.model import VideoLLM
    from vlm.video import read_clip
    from vlm.video.decode import probe_video

    torch.set_num_threads(2)
    model = (VideoLLM.from_pretrained(model_dir) if model_dir else VideoLLM.from_config(MODEL)).eval()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if method == "memory":
        memory, _, stats = encode_stream(model, video, fps=1.0, chunk_frames=8, max_groups=16)
        tokens = memory.tokens.shape[0]
    else:
        frames = int(probe_video(video).duration) if method == "all" else 16
        clip = read_clip(video, frames, "uniform")
        pixels, stamps = model.processor.preprocess_clip(clip)
        with torch.no_grad():
            out = model.encode_visual([pixels], [stamps])
        tokens = out.embeds.shape[1] if out.mask is None else int(out.mask.sum())  # pruned ones never reach the LLM
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": round(seconds, 2), "peak_mb": round(peak, 1), "model_mb": round(base, 1),
            "encode_mb": round(peak - base, 1), "tokens": int(tokens)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, nargs="+", default=[1, 3, 10])
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--model", default="", help="a saved model folder instead of the MLP quickstart configuration")
    p.add_argument("--child", nargs=3, metavar=("METHOD", "VIDEO", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    from data_tools.synth.long_world import generate_long

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        generate_long(tmp, len(args.minutes), seed=7, durations=tuple(m * 60 for m in args.minutes), progress=False)
        videos = sorted((Path(tmp) / "mvbench" / "video").glob("*.mp4"))
        for minutes, video in zip(args.minutes, videos):
            row = {"minutes": minutes}
            for method in ("memory", "all", "16"):
                out = subprocess.run([sys.executable, __file__, "--child", method, str(video), args.model], capture_output=True,
                                     text=True, check=True)
                row[method] = json.loads(out.stdout.strip().splitlines()[-1])
            row["peak_ratio_all_vs_memory"] = round(row["all"]["encode_mb"] / max(row["memory"]["encode_mb"], 1.0), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| minutes | memory: s / encode MB / tokens | all frames: s / encode MB / tokens | 16 frames: s / encode MB |")
    print("|---|---|---|---|")
    for r in rows:
        m, a, u = r["memory"], r["all"], r["16"]
        print(f"| {r['minutes']:g} | {m['seconds']} / {m['encode_mb']} / {m['tokens']} | {a['seconds']} / "
              f"{a['encode_mb']} / {a['tokens']} | {u['seconds']} / {u['encode_mb']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
