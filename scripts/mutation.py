"""Mutation score of the modules where a silent error would corrupt results (on demand, never in CI).

    .venv/bin/pip install mutmut            # a dev tool, not a dependency of the package
    python scripts/mutation.py --run        # mutate, run the covering tests per mutant (~50 min on 2 cores)
    python scripts/mutation.py              # only report the last run's results
    python scripts/mutation.py --survivors  # also list each surviving mutant (then `mutmut show NAME`)

What is mutated and which tests run is `[tool.mutmut]` in pyproject.toml (the modules listed there; of the
test files listed there, the non-slow tests that cover each mutated function). The score is killed / (killed + survived) per module, where
"survived" includes mutants no test reaches and timeouts count as killed; mutants judged equivalent (they
cannot change any result) are listed with the reason in scripts/mutation_equivalent.txt and left out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = Path(sys.executable).with_name("mutmut")
KILLED = {"killed", "timeout", "segfault"}
SURVIVED = {"survived", "no tests"}


def equivalent() -> dict[str, str]:
    """Mutant name -> why it cannot change a result (lines `name  # reason` of mutation_equivalent.txt)."""
    path = ROOT / "scripts" / "mutation_equivalent.txt"
    out = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, _, why = line.partition("#")
        if name.strip():
            out[name.strip()] = why.strip()
    return out


def results(root: Path = ROOT) -> dict[str, str]:
    """Mutant name -> status, from `mutmut results --all true` run in `root`."""
    text = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=root, capture_output=True, text=True,
                          check=True).stdout
    out = {}
    for line in text.splitlines():
        name, sep, status = line.strip().partition(": ")
        if sep and "__mutmut_" in name:
            out[name] = status.strip()
    return out


def module_of(name: str) -> str:
    """`evals.reliance.x_gap__mutmut_3` or `vlm.scoring.xǁClassǁmethod__mutmut_1` -> the module's dotted name."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.startswith("x_") or part.startswith("xǁ"):
            return ".".join(parts[:i])
    return ".".join(parts[:-1])


def table(status: dict[str, str], skip: dict[str, str]) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for name, s in status.items():
        row = rows[module_of(name)]
        if name in skip:
            row["equivalent"] += 1
        elif s in KILLED:
            row["killed"] += 1
        elif s in SURVIVED:
            row["survived"] += 1
        else:
            row["other"] += 1  # not checked / skipped / suspicious: the run did not finish
    for row in rows.values():
        done = row["killed"] + row["survived"]
        row["score"] = round(100 * row["killed"] / done, 1) if done else float("nan")
    return {k: dict(v) for k, v in sorted(rows.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="store_true", help="run mutmut first (results are cached by mutmut per function)")
    p.add_argument("--survivors", action="store_true", help="list the surviving mutants")
    p.add_argument("--json", help="also write the table as JSON here")
    p.add_argument("--root", type=Path, default=ROOT, help="the tree mutmut ran in (default: this repository)")
    p.add_argument("mutants", nargs="*", help="with --run: mutant name globs, e.g. 'evals.reliance*'")
    a = p.parse_args()
    if a.run:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run([str(MUTMUT), "run", *a.mutants], cwd=a.root, env=env, check=True)
    status, skip = results(a.root), equivalent()
    rows = table(status, skip)
    print("| module | killed | survived | equivalent | score |\n|---|---:|---:|---:|---:|")
    for mod, r in rows.items():
        print(f"| `{mod}` | {r.get('killed', 0):.0f} | {r.get('survived', 0):.0f} | {r.get('equivalent', 0):.0f} | "
              f"{r['score']}% |" + (f" ({r['other']:.0f} not run)" if r.get("other") else ""))
    if a.survivors:
        for name, s in sorted(status.items()):
            if s in SURVIVED and name not in skip:
                print(f"{s:9s} {name}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
