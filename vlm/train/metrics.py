"""Training metrics: a JSONL log per stage and a PNG of the loss curves of every stage."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSONL; on resume, lines after the resumed step are dropped so the log matches the run."""

    def __init__(self, path: str | os.PathLike, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        with open(self.path, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                pass
    return out


def plot_loss_curves(stage_logs: list[tuple[str, Path]], out_png: str | os.PathLike) -> Path:
    """One panel per stage: the training loss per optimizer step (and its moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage_logs = [(n, p) for n, p in stage_logs if read_jsonl(p)]
    fig, axes = plt.subplots(1, max(1, len(stage_logs)), figsize=(5 * max(1, len(stage_logs)), 3.6), squeeze=False)
    for ax, (name, path) in zip(axes[0], stage_logs):
        rows = [r for r in read_jsonl(path) if "loss" in r]
        steps = [r["step"] for r in rows]
        losses = [r["loss"] for r in rows]
        ax.plot(steps, losses, color="#9ab", lw=1, label="loss")
        k = max(1, len(losses) // 20)
        if len(losses) > k > 1:
            avg = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
            ax.plot(steps, avg, color="#c33", lw=2, label=f"moving avg ({k})")
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
