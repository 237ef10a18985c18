"""Accuracy of a saved model on the long-video benchmark, three ways at one LLM sequence length, and a timeline.

    python scripts/eval_long.py --model runs/long_video/1-long/final --data demo_data/long --out runs/eval_long
    python scripts/eval_long.py --model runs/quickstart/final --clips 30 --out runs/eval_long   # a fresh world

Configurations (256 visual tokens each with the quickstart's 16 tokens per frame):
- uniform: 16 frames sampled uniformly, whatever the length;
- budget: 64 frames under a 256-token pooling budget (`token_budget: {max_tokens: 256, policy: pool}`);
- memory: every frame at 1 fps through the bounded memory (`vlm eval mcq --memory 16`: chunks of 8 frames,
  consolidated into 16 groups).
A word-slot model with the tracks layout (`recipes/long_slots.yaml`) is asked three ways in its fixed text slot:
16 uniform frames; 256 frames; every frame at 1 fps read chunk by chunk into its detection memory
(`vlm.memory.TrackMemory`).

Writes OUT/<config>/ (the `vlm eval mcq` outputs), OUT/long_eval.json (per task and per clip length) and
OUT/long_timeline.png: for the first clips, each needle event on the clip's time axis, and the interval each
configuration chose for "When is X visible?" (green when right).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {  # label -> (frames, token budget, memory)
    "uniform 16 frames": (16, None, None),
    "64 frames, 256-token budget": (64, {"max_tokens": 256, "policy": "pool"}, None),
    "memory, 16 groups": (16, None, {"max_groups": 16, "fps": 1.0, "chunk_frames": 8}),
}
TRACKS_CONFIGS = {  # a word-slot model with the tracks layout: a fixed text slot, so frames cost no LLM tokens
    "uniform 16 frames": (16, None, None),
    "256 frames, tracks text": (256, None, None),
    "every frame, tracks memory": (16, None, {"max_groups": 1, "fps": 1.0, "chunk_frames": 16}),
}
EVENT_COLORS = {"flash": "tab:orange", "color_change": "tab:purple", "move": "tab:blue"}


def evaluate(model_dir: str, data: Path, out: Path, only: list[str] | None = None) -> list[dict]:
    from evals.mcq import evaluate_mcq
    from vlm.model import VideoLLM, saved_config

    bench = data / "mvbench"
    durations = {}
    for entry in json.loads((bench / "tasks.json").read_text()):
        for i, q in enumerate(json.loads((bench / "json" / entry["json"]).read_text())):
            durations[(entry["task"], i)] = q["duration_s"]
    rows = []
    tracks = saved_config(model_dir)[0].connector.get("layout") == "tracks"
    for label, (frames, budget, memory) in (TRACKS_CONFIGS if tracks else CONFIGS).items():
        if only and not any(word in label for word in only):
            continue
        model = VideoLLM.from_pretrained(model_dir)
        model.apply_settings({"token_budget": budget or {}})
        folder = out / label.replace(" ", "_").replace(",", "")
        result = evaluate_mcq(model, bench, folder, profile="cloze", num_frames=frames, workers=0, progress=False,
                              memory=memory)
        by_length: dict[float, list[bool]] = defaultdict(list)
        for line in (folder / "predictions.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "correct" in rec:
                by_length[durations[(rec["task"], rec["index"])]].append(bool(rec["correct"]))
        tokens = model.num_visual_tokens(frames) if tracks or not memory else memory["max_groups"] * model.visual_grid(1)[1]
        row = {"config": label, "folder": folder.name, "visual_tokens": tokens,
               "mean_over_tasks": round(result.metrics["accuracy_mean_over_tasks"], 1),
               "chance": round(result.metrics["chance_mean_over_tasks"], 1),
               "per_task": {t: round(r["accuracy"], 1) for t, r in result.per_task.items()},
               "by_length_s": {int(d): round(100 * sum(v) / len(v), 1) for d, v in sorted(by_length.items())}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def timeline(data: Path, out: Path, rows: list[dict], clips: int = 8) -> Path:
    """Needle events per clip on its own time axis, and each configuration's chosen "Needle Time" interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metas = {Path(m["video"]).name: m for m in map(json.loads, (data / "meta.jsonl").read_text().splitlines())
             if m.get("split", "test") == "test"}
    questions = json.loads((data / "mvbench" / "json" / "needle_time.json").read_text())[:clips]
    picks = {}
    for row in rows:
        for line in (out / row["folder"] / "predictions.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("task") == "Needle Time" and rec.get("pred"):
                picks[(row["config"], rec["index"])] = (rec["candidates"]["ABCDE".index(rec["pred"])], rec["correct"])
    fig, axes = plt.subplots(len(questions), 1, figsize=(10, 1.05 * len(questions) + 0.8), squeeze=False)
    for k, (ax, q) in enumerate(zip(axes[:, 0], questions)):
        m = metas[q["video"]]
        for e in m["events"]:
            s0, s1 = e["start_frame"] / m["fps"], (e["end_frame"] + 1) / m["fps"]
            ax.axvspan(s0, s1, ymin=0.72, ymax=0.98, color=EVENT_COLORS[e["type"]], label=e["type"])
        for j, row in enumerate(rows):
            if (row["config"], k) not in picks:
                continue
            interval, right = picks[(row["config"], k)]
            a, b = (float(x) for x in interval.replace("from ", "").replace(" s", "").split(" to "))
            y = 0.52 - 0.2 * j
            ax.plot([a, b], [y, y], lw=5, color="tab:green" if right else "tab:red", solid_capstyle="butt")
            ax.text(m["duration_s"] * 1.01, y, row["config"], va="center", fontsize=7)
        ax.set_xlim(0, m["duration_s"])
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        ax.set_title(f"{q['video']} ({m['duration_s']:.0f} s): {q['question']}", fontsize=8, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    handles = {h.get_label(): h for ax in axes[:, 0] for h in ax.patches}
    fig.legend(list(handles.values()), list(handles), loc="upper right", fontsize=7, ncol=3)
    axes[-1, 0].set_xlabel("seconds (each clip on its own axis); bars below: the interval each configuration chose "
                           "(green = right)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.86, 0.97))
    path = out / "long_timeline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=None, help="a long world (`vlm data synth --long`); default: a fresh one")
    p.add_argument("--clips", type=int, default=30, help="without --data: benchmark clips of the fresh world (seed 11)")
    p.add_argument("--out", default="runs/eval_long")
    p.add_argument("--configs", nargs="+", default=None, metavar="WORD",
                   help="only the configurations whose label holds one of these words (e.g. uniform memory)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp)
        if not args.data:
            from data_tools.synth.long_world import generate_long

            generate_long(tmp, args.clips, seed=11, progress=False)
        rows = evaluate(args.model, data, out, args.configs)
        (out / "long_eval.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(timeline(data, out, rows))
    print("\n| configuration | visual tokens | mean over tasks | " + " | ".join(rows[0]["per_task"]) + " | "
          + " | ".join(f"{d} s" for d in rows[0]["by_length_s"]) + " |")
    for r in rows:
        print(f"| {r['config']} | {r['visual_tokens']} | {r['mean_over_tasks']}% | "
              + " | ".join(str(v) for v in r["per_task"].values()) + " | "
              + " | ".join(str(v) for v in r["by_length_s"].values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
