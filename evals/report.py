"""Markdown + PNG reports from results files (any task type, one or several runs side by side).

    vlm eval report runs/a/results.json runs/b/results.json --out runs/report
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

from evals.results import EvalResult

log = logging.getLogger(__name__)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.2f}"
    return str(v)


def bar_chart(values: dict[str, float | None], path: str | os.PathLike, *, title: str, ylabel: str = "accuracy (%)",
              chance: dict[str, float] | None = None, ymax: float | None = 100.0,
              errors: dict[str, float | None] | None = None) -> Path:
    """A bar per key; `chance` draws a red dash at each bar's chance level (labelled once in the legend), `errors`
    a whisker of one standard error."""
    return compare_chart({"model": values}, path, title=title, ylabel=ylabel, chance=chance, ymax=ymax,
                         errors={"model": errors} if errors else None)


def compare_chart(series: dict[str, dict[str, float | None]], path: str | os.PathLike, *, title: str,
                  ylabel: str = "accuracy (%)", chance: dict[str, float] | None = None,
                  ymax: float | None = 100.0, errors: dict[str, dict[str, float | None]] | None = None) -> Path:
    """Grouped bars: per key (x, e.g. a task), one bar per series (e.g. a run, in order), so runs are compared key
    by key; one series is a plain bar chart. Missing values are drawn as empty bars marked "n/a"; `errors` (per
    series, per key) draws whiskers of one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(n for values in series.values() for n in values))
    one = len(series) == 1
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, (0.55 if one else 0.3 * len(series)) * len(names) + 2.0), 4.5))
    for i, (run, values) in enumerate(series.items()):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(names))]
        err = [(errors or {}).get(run, {}).get(n) or 0.0 for n in names]
        bars = ax.bar(xs, [values.get(n) or 0.0 for n in names], width=width, label=run, color="#4C72B0" if one else None,
                      yerr=err if any(err) else None, error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#333333"})
        for b, n, e in zip(bars, names, err):
            v = values.get(n)
            ax.annotate("n/a" if v is None else f"{v:.1f}" if one else f"{v:.0f}",
                        (b.get_x() + b.get_width() / 2, b.get_height() + e), ha="center", va="bottom", fontsize=7 if one else 6)
    dashed = [(k, chance[n]) for k, n in enumerate(names) if chance and chance.get(n) is not None]
    for j, (k, level) in enumerate(dashed):
        ax.hlines(level, k - 0.45, k + 0.45, colors="#C44E52", linestyles="--", linewidth=1.5,
                  label="chance" if j == 0 else None)
    if dashed or not one:
        ax.legend(loc="upper right", fontsize=8 if one else 7, ncol=1 if one else min(4, len(series) + 1))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if ymax is not None:
        ax.set_ylim(0, ymax * (1.08 if one else 1.25))  # several runs: room for the legend above the bars
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chart_for(result: EvalResult, path: str | os.PathLike) -> Path | None:
    """The per-task (mcq), per-class (classify) or per-direction (retrieval) chart of one result."""
    tag = (result.profile or {}).get("name") or (result.judge or {}).get("id") or ""
    title = f"{result.task_type}: {result.model} on {result.dataset.get('name', '')} {('[' + tag + ']') if tag else ''}"
    if result.task_type == "mcq":
        acc = {t: v["accuracy"] for t, v in result.per_task.items()}
        chance = {t: v["chance"] for t, v in result.per_task.items()}
        errors = {t: v.get("stderr") for t, v in result.per_task.items()}
        return bar_chart(acc, path, title=title, chance=chance, errors=errors)
    if result.task_type == "classify":
        acc = {c: v["accuracy"] for c, v in result.per_task.items()}
        chance = {c: 100.0 / max(1, len(result.per_task)) for c in result.per_task}
        return bar_chart(acc, path, title=title, chance=chance)
    if result.task_type == "retrieval":
        vals = {f"{d} R@{k}": result.metrics.get(f"{d}_R@{k}") for d in ("t2v", "v2t") for k in (1, 5, 10)}
        return bar_chart(vals, path, title=title, ylabel="recall (%)")
    if result.task_type == "openqa":
        return bar_chart({"accuracy": result.metrics.get("accuracy")}, path, title=title)
    if result.task_type == "reliance":
        pref = {k: v["own_preferred_percent"] for k, v in result.per_task.items()}
        return bar_chart(pref, path, title=title, ylabel="own video gives the lower loss (%)",
                         chance={k: 50.0 for k in pref})
    if result.task_type == "slots":
        return bar_chart(dict(result.metrics), path, title=title, ylabel="percent")
    return None


def markdown(results: Sequence[EvalResult], charts: Sequence[Path | None] = ()) -> str:
    """A markdown report: one section per result with its metrics, per-task table, counts and settings."""
    lines = ["# Evaluation report", ""]
    if len(results) > 1:
        keys = sorted({k for r in results for k, v in r.metrics.items() if isinstance(v, (int, float))})
        lines += ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for r in results:
            tag = (r.profile or {}).get("name") or (r.judge or {}).get("id") or r.task_type
            lines.append(f"| {r.model} [{tag}] | " + " | ".join(_fmt(r.metrics.get(k)) for k in keys) + " |")
        lines.append("")
    for n, r in enumerate(results):
        tag = (r.profile or {}).get("name") or (r.judge or {}).get("id") or ""
        lines += [f"## {r.task_type}: {r.model} on {r.dataset.get('name', r.dataset.get('path', ''))}"
                  + (f" [{tag}]" if tag else ""), "", f"created {r.created}, vlm {r.vlm_version}", ""]
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in r.metrics.items()] + [""]
        if r.per_task:
            cols = list(dict.fromkeys(k for v in r.per_task.values() for k in v))
            lines += ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            lines += [f"| {t} | " + " | ".join(_fmt(v.get(c)) for c in cols) + " |" for t, v in r.per_task.items()]
            lines.append("")
        if n < len(charts) and charts[n] is not None:
            lines += [f"![{r.task_type}]({Path(charts[n]).name})", ""]  # type: ignore[arg-type]
        lines += ["counts: " + ", ".join(f"{k}={_fmt(v)}" for k, v in r.counts.items()), ""]
        if r.profile:
            lines += [f"profile `{r.profile.get('name')}`: {r.profile.get('description', '')}", ""]
        if r.judge:
            lines += [f"judge `{r.judge.get('id')}`", ""]
        lines += ["settings: " + ", ".join(f"{k}={_fmt(v)}" for k, v in r.settings.items()), ""]
    return "\n".join(lines)


def paired_difference(first: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Two runs' multiple-choice answers to the same questions (prediction records by uid; error records left out),
    compared question by question: accuracies on the shared questions, the difference (other - first) over questions
    and mean over tasks, each with its paired standard error, and the questions right in one run only. A paired
    error is far smaller than either run's own when the runs mostly agree. None when fewer than 2 are shared."""
    def scored(rec: dict[str, Any] | None) -> bool:
        return rec is not None and not rec.get("error") and "correct" in rec

    shared = [u for u in first if scored(first[u]) and scored(other.get(u))]
    if len(shared) < 2:
        return None
    by_task: dict[str, list[float]] = {}
    for u in shared:
        gain = 100.0 * (bool(other[u]["correct"]) - bool(first[u]["correct"]))
        by_task.setdefault(str(first[u].get("task", "")), []).append(gain)

    def mean_and_error(d: list[float]) -> tuple[float, float]:
        m = sum(d) / len(d)
        return m, math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else 0.0

    diffs = [x for d in by_task.values() for x in d]
    per_task = [mean_and_error(d) for d in by_task.values()]
    diff, err = mean_and_error(diffs)
    return {"questions": len(shared), "tasks": len(by_task),
            "accuracy_first": 100.0 * sum(bool(first[u]["correct"]) for u in shared) / len(shared),
            "accuracy_other": 100.0 * sum(bool(other[u]["correct"]) for u in shared) / len(shared),
            "difference_over_questions": diff, "difference_over_questions_stderr": err,
            "difference_mean_over_tasks": sum(m for m, _ in per_task) / len(per_task),
            "difference_mean_over_tasks_stderr": math.sqrt(sum(e * e for _, e in per_task)) / len(per_task),
            "right_only_first": sum(x < 0 for x in diffs), "right_only_other": sum(x > 0 for x in diffs)}


def paired_markdown(labels: Sequence[str], answers: Sequence[dict[str, dict[str, Any]] | None]) -> list[str]:
    """A table of each run against the first, question by question (`paired_difference`); [] when none pairs."""
    rows = []
    for label, other in zip(labels[1:], answers[1:]):
        p = paired_difference(answers[0], other) if answers[0] and other else None
        if p is not None:
            rows.append(f"| {label} | {p['questions']} | {p['accuracy_first']:.1f} | {p['accuracy_other']:.1f} | "
                        f"{p['difference_over_questions']:+.1f} +- {p['difference_over_questions_stderr']:.1f} | "
                        f"{p['difference_mean_over_tasks']:+.1f} +- {p['difference_mean_over_tasks_stderr']:.1f} | "
                        f"{p['right_only_first']} | {p['right_only_other']} |")
    if not rows:
        return []
    return [f"## Each run against {labels[0]}, on the questions both answered", "",
            "| run | questions | first (%) | this run (%) | difference over questions | difference mean over tasks | "
            "right in the first only | right in this run only |", "|---" * 8 + "|", *rows, "",
            "Differences are this run's minus the first's, in points, +- one paired standard error over questions: a "
            "difference within about twice it is what another draw of questions could give. A training seed's "
            "spread is not in it.", ""]


def _label(result: EvalResult, index: int) -> str:
    """A short name for a run in a comparison: the model folder's last parts (or its recorded name)."""
    parts = [p for p in Path(str(result.model)).parts if p != "final"]
    return "/".join(parts[-2:]) or f"run {index + 1}"


def write_report(results: Sequence[EvalResult], out_dir: str | os.PathLike, name: str = "report",
                 answers: Sequence[dict[str, dict[str, Any]] | None] = ()) -> Path:
    """Write `name`.md and one chart per result (per_task.png for a single result) into `out_dir`. `answers`
    (each result's prediction records by uid, or None) adds the multiple-choice runs' paired comparison with the
    first."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    charts: list[Path | None] = []
    for i, r in enumerate(results):
        png = out / ("per_task.png" if len(results) == 1 else f"{name}_{i}_{r.task_type}.png")
        try:
            charts.append(chart_for(r, png))
        except Exception as e:  # noqa: BLE001  (a chart must never lose the numbers)
            log.warning("chart for %s failed: %s", r.task_type, e)
            charts.append(None)
    text = markdown(results, charts)
    mcq = [i for i, r in enumerate(results) if r.task_type == "mcq" and r.per_task]
    if len(mcq) > 1:  # several runs on a benchmark: one chart that compares them task by task
        series: dict[str, dict[str, float | None]] = {}
        errors: dict[str, dict[str, float | None]] = {}
        for k, i in enumerate(mcq):
            label = _label(results[i], k)
            label = label if label not in series else f"{label} ({k + 1})"
            series[label] = {t: v["accuracy"] for t, v in results[i].per_task.items()}
            errors[label] = {t: v.get("stderr") for t, v in results[i].per_task.items()}
        chance = {t: v["chance"] for i in mcq for t, v in results[i].per_task.items()}
        try:
            png = compare_chart(series, out / f"{name}_per_task.png", title="per-task accuracy (whiskers: one standard error)",
                                chance=chance, errors=errors)
            text = text.replace("\n", f"\n\n![per-task accuracy of each run]({png.name})\n", 1)
        except Exception as e:  # noqa: BLE001  (as above)
            log.warning("the comparison chart failed: %s", e)
        if answers:  # the table names the runs as the chart does
            text += "\n" + "\n".join(paired_markdown(list(series), [answers[i] if i < len(answers) else None for i in mcq]))
    path = out / f"{name}.md"
    path.write_text(text, encoding="utf-8")
    return path
