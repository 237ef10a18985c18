"""What decoding a word-slot model's words over time costs: its text with `switch_cost` against each frame's words.

    python scripts/bench_decode.py --model runs/synth_long/final --data demo_data/synth_long/regions_test.json

The tower runs once per clip (not timed); then, in the same process and on the same features, the connector's text
(`detections` + `text`, the story or tracks layout's path) is written with `switch_cost` 0 (each frame's likeliest
word, then the majority of three frames) and with `--cost` (Viterbi over each track and the scene), alternating,
`--repeats` times each. Reports milliseconds per clip for both, their ratio, and how many clips' texts differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.data.conversation import read_records  # noqa: E402
from vlm.model import VideoLLM  # noqa: E402
from vlm.video import read_clip  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a saved VideoLLM with a word_slots connector")
    p.add_argument("--data", required=True, help="a file of records with videos (e.g. regions_test.json)")
    p.add_argument("--clips", type=int, default=100)
    p.add_argument("--cost", type=float, default=2.0, help="switch_cost to compare with 0")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    model = VideoLLM.from_pretrained(args.model, device="cpu")
    conn = model.connector
    if not hasattr(conn, "switch_cost"):
        raise SystemExit(f"{args.model}: its connector ({type(conn).__name__}) is not word_slots")
    root = Path(args.data).parent
    records = [r for _, r in read_records(args.data) if not isinstance(r, Exception) and r.get("video")][:args.clips]
    feats = []
    with torch.no_grad():
        for i in range(0, len(records), 16):
            clips = [read_clip(root / r["video"], model.config.num_frames, model.config.sampling) for r in records[i:i + 16]]
            pixels, stamps = zip(*(model.processor.preprocess_clip(c) for c in clips))
            feats.append(conn.reduced(model.tower_features(torch.stack(pixels), torch.stack(stamps))))
    times: dict[float, list[float]] = {0.0: [], args.cost: []}
    texts: dict[float, list[str]] = {}
    for _ in range(args.repeats):
        for cost in times:
            conn.configure(switch_cost=cost)
            t = time.perf_counter()
            with torch.no_grad():
                texts[cost] = [conn.text(seen, f.grid) for f in feats for seen in conn.detections(f)]
            times[cost].append(time.perf_counter() - t)
    ms = {cost: 1000 * min(v) / len(records) for cost, v in times.items()}
    print(json.dumps({"clips": len(records), "layout": conn.layout, "ms_per_clip_frame_words": round(ms[0.0], 2),
                      f"ms_per_clip_switch_cost_{args.cost:g}": round(ms[args.cost], 2),
                      "ratio": round(ms[args.cost] / ms[0.0], 2),
                      "texts_that_differ": sum(a != b for a, b in zip(texts[0.0], texts[args.cost]))}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
