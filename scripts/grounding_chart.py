"""Chart of grounding experiments: held-out accuracy (cloze) and own-clip preference per run.

    python scripts/grounding_chart.py --run "text oracle=runs/oracle_text" --run "quickstart=runs/quickstart" \\
        --out docs/grounding_variants.png
    python scripts/grounding_chart.py --keep docs/grounding_variants.json --run "V-f x5 clips=runs/scale5" \\
        --out docs/grounding_variants.png      # add runs to the rows of an earlier chart

Each run folder needs `eval_cloze/results.json` (from `vlm eval mcq --profile cloze`) and, for a video model,
`reliance/results.json` (from `vlm eval reliance`). Writes the PNG and a JSON of the numbers beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_run(folder: Path) -> dict:
    res = json.loads((folder / "eval_cloze" / "results.json").read_text())
    row = {"accuracy": res["metrics"]["accuracy_mean_over_tasks"], "chance": res["metrics"]["chance_mean_over_tasks"]}
    rel = folder / "reliance" / "results.json"
    if rel.is_file():
        m = json.loads(rel.read_text())["metrics"]
        row.update(own_preferred=m["own_preferred_percent"], gap=m["gap"], gap_stderr=m["gap_stderr"])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=FOLDER")
    p.add_argument("--keep", help="a JSON this script wrote before: its rows come first (their run folders may be gone)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = json.loads(Path(args.keep).read_text()) if args.keep else {}
    rows.update({label: read_run(Path(folder)) for label, folder in (r.split("=", 1) for r in args.run)})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(labels) + 1.8), sharey=True)
    y = range(len(labels))
    axes[0].barh(y, [rows[k]["accuracy"] for k in labels], color="#4878a8")
    axes[0].axvline(rows[labels[0]]["chance"], color="gray", ls="--", label="chance")
    axes[0].axvline(60, color="green", ls=":", label="goal (60%)")
    axes[0].set_xlabel("held-out accuracy, mean over tasks (%)")
    axes[0].legend(loc="lower right")
    axes[1].barh(y, [rows[k].get("own_preferred", 0.0) for k in labels], color="#d08a3c")
    axes[1].axvline(50, color="gray", ls="--", label="blind (50%)")
    axes[1].axvline(90, color="green", ls=":", label="goal (90%)")
    axes[1].set_xlabel("own clip preferred (% of held-out clips; none for the text oracle)")
    axes[1].legend(loc="lower right")
    axes[0].set_yticks(list(y), labels)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.set_xlim(0, 100)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Does the model use the video? (demo world; 30 training steps unless the label says otherwise)")
    fig.tight_layout()
    out = Path(args.out)
    fig.savefig(out, dpi=110)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
