"""Probes: is what the questions need present in a feature? (`vlm eval probe`)

A probe reads one feature vector per clip and predicts a ground-truth label of the synthetic world
(`meta.jsonl`): the action class, the background tone, the acting object's colour, shape and cell on a 3x3 grid,
its direction of motion, and how many objects move. Two probes per label, both fitted on the train clips and
scored on the held-out ones:

- linear: ridge regression onto one-hot labels (closed form in the dual, so any feature width is cheap), its
  penalty chosen by 4-fold cross-validation on the train clips only;
- mlp: one hidden layer (256, GELU, dropout) on the standardised features' top 256 principal components,
  AdamW with weight decay.

Feature sources (`--source`):
- `raw:S`: the decoded frames themselves, resized to S x S RGB (the information the video holds at that size);
- a tower spec, e.g. `{"name": "efficientnet_lite0", "image_size": 128, "layer": 10}`: the tower's tokens;
- a saved VideoLLM folder: the connector's output tokens, i.e. exactly the visual tokens the LLM sees.
Tower tokens are average-pooled to a `pool` x `pool` grid per temporal position and concatenated over time, so
the probe keeps when and roughly where; connector tokens are used as they are.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_tools.synth.world import BG_TONES, CLASSES, COLORS, SHAPES
from vlm.video import read_clip

log = logging.getLogger(__name__)

DIRECTIONS = ("left", "right", "up", "down")


def _actor(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The object the clip is about (object 0), or None in shuffle clips (identical boxes)."""
    objs = [o for o in meta["objects"] if o["role"] not in ("box", "ball")]
    return objs[0] if objs else None


def _first_visible(obj: dict[str, Any]) -> int:
    return next((i for i, v in enumerate(obj["track"]["visible"]) if v), 0)


def _cell(meta: dict[str, Any]) -> int | None:
    obj = _actor(meta)
    if obj is None:
        return None
    k = _first_visible(obj)
    x, y, size = obj["track"]["x"][k], obj["track"]["y"][k], meta["size"]
    return min(2, int(3 * y / size)) * 3 + min(2, int(3 * x / size))


def _moving_count(meta: dict[str, Any]) -> int:
    return sum(1 for o in meta["objects"] if o["role"] not in ("box", "ball")
               and (np.ptp(o["track"]["x"]) > 1.0 or np.ptp(o["track"]["y"]) > 1.0))


_TONES, _COLORS = list(BG_TONES), list(COLORS)

#: label name -> (number of classes, function of a meta record; None = the label does not apply to this clip)
LABELS: dict[str, tuple[int, Callable[[dict[str, Any]], int | None]]] = {
    "class": (len(CLASSES), lambda m: CLASSES.index(m["label"])),
    "background": (len(_TONES), lambda m: _TONES.index(m["background"]["tones"][0])),
    "color": (len(_COLORS), lambda m: None if (a := _actor(m)) is None else _COLORS.index(a["color"])),
    "shape": (len(SHAPES), lambda m: None if (a := _actor(m)) is None else SHAPES.index(a["shape"])),
    "cell": (9, _cell),
    "direction": (4, lambda m: DIRECTIONS.index(m["label"].split()[1]) if m["label"].startswith("moving ") else None),
    "moving_count": (4, lambda m: min(3, _moving_count(m))),
}


def clip_labels(meta: dict[str, Any]) -> dict[str, int | None]:
    """Every probe label of one clip."""
    return {name: fn(meta) for name, (_, fn) in LABELS.items()}


# ------------------------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------------------------

class FeatureSource:
    """Clip -> one feature vector; `name` is what results record."""

    name: str

    def __call__(self, clip: Any) -> torch.Tensor:
        raise NotImplementedError


class RawPixels(FeatureSource):
    def __init__(self, size: int):
        self.size, self.name = int(size), f"raw:{size}"

    def __call__(self, clip: Any) -> torch.Tensor:
        x = torch.as_tensor(clip.frames).permute(0, 3, 1, 2).float() / 255.0  # [T, 3, H, W]
        return F.interpolate(x, size=(self.size, self.size), mode="area").flatten()


class TowerTokens(FeatureSource):
    def __init__(self, tower: torch.nn.Module, spec: dict[str, Any], pool: int):
        self.tower, self.pool = tower.eval(), int(pool)
        self.name = json.dumps(spec, sort_keys=True) + f" pooled to {pool}x{pool}"

    @torch.no_grad()
    def __call__(self, clip: Any) -> torch.Tensor:
        pixels = self.tower.preprocessor.clip(clip)[0][None]  # [1, T, 3, H, W]
        feats = self.tower(pixels.to(next(self.tower.parameters()).dtype))
        t, h, w = feats.grid
        x = feats.tokens[0].float().reshape(t, h, w, -1).permute(0, 3, 1, 2)  # [T', D, h, w]
        return F.adaptive_avg_pool2d(x, self.pool).flatten()


class ConnectorTokens(FeatureSource):
    """The visual tokens a saved VideoLLM puts into its LLM (the connector's output)."""

    def __init__(self, model: Any, name: str):
        self.model, self.name = model.eval(), f"connector output of {name}"

    @torch.no_grad()
    def __call__(self, clip: Any) -> torch.Tensor:
        pixel_values, timestamps = self.model.processor.preprocess_clip(clip)
        out = self.model.encode_visual([pixel_values], [timestamps])
        return out.embeds[0].float().flatten()


def build_source(source: str, pool: int = 2) -> FeatureSource:
    """`raw:S`, a tower JSON spec, or a saved VideoLLM folder."""
    if source.startswith("raw:"):
        return RawPixels(int(source.split(":", 1)[1]))
    if source.lstrip().startswith("{"):
        from vlm.towers import build_tower

        spec = json.loads(source)
        kwargs = dict(spec)
        return TowerTokens(build_tower(kwargs.pop("name"), **kwargs), spec, pool)
    if Path(source).is_dir():
        from vlm.model import VideoLLM

        return ConnectorTokens(VideoLLM.from_pretrained(source), source)
    raise ValueError(f"probe source '{source}': expected raw:S, a tower JSON spec or a saved model folder")


# ------------------------------------------------------------------------------------------------------------------
# Probes
# ------------------------------------------------------------------------------------------------------------------

def _standardize(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def _ridge_predict(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, classes: int, lam: float) -> torch.Tensor:
    """Dual-form ridge onto one-hot targets: argmax of xte X^T (X X^T + lam n I)^-1 Y."""
    n = xtr.shape[0]
    y = F.one_hot(ytr, classes).double() - 1.0 / classes
    gram = xtr @ xtr.T / xtr.shape[1]
    alpha = torch.linalg.solve(gram + lam * torch.eye(n, dtype=gram.dtype), y)
    return ((xte @ xtr.T / xtr.shape[1]) @ alpha).argmax(1)


LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def linear_probe(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, classes: int, folds: int = 4) -> torch.Tensor:
    """Ridge probe; the penalty is chosen by k-fold cross-validation on the train clips only."""
    xtr, xte = (v.double() for v in _standardize(xtr, xte))
    order = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))
    best, best_acc = LAMBDAS[0], -1.0
    for lam in LAMBDAS:
        correct = 0
        for k in range(folds):
            val = order[k::folds]
            fit = torch.cat([order[j::folds] for j in range(folds) if j != k])
            correct += int((_ridge_predict(xtr[fit], ytr[fit], xtr[val], classes, lam) == ytr[val]).sum())
        if correct > best_acc:
            best, best_acc = lam, correct
    return _ridge_predict(xtr, ytr, xte, classes, best)


def mlp_probe(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, classes: int, hidden: int = 256,
              steps: int = 300, seed: int = 0) -> torch.Tensor:
    """One hidden layer on the standardised features' top principal components (at most 256), full-batch AdamW."""
    xtr, xte = _standardize(xtr, xte)
    q = min(256, xtr.shape[0] - 1, xtr.shape[1])
    _, _, v = torch.pca_lowrank(xtr, q=q, center=False, niter=2)  # v: [F, q]
    xtr, xte = _standardize(xtr @ v, xte @ v)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(xtr.shape[1], hidden), torch.nn.GELU(),
                              torch.nn.Dropout(0.2), torch.nn.Linear(hidden, classes))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(xtr), ytr).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        return net(xte).argmax(1)


@dataclass
class ProbeRow:
    label: str
    classes: int
    train: int
    test: int
    majority: float  # % of test clips in the most common train class
    linear: float | None
    mlp: float | None


def probe_labels(features: torch.Tensor, metas: Sequence[dict[str, Any]], splits: Sequence[str],
                 labels: Sequence[str] | None = None) -> list[ProbeRow]:
    """Fit and score both probes for every label on (train clips -> test clips)."""
    rows = []
    for name in labels or list(LABELS):
        classes, fn = LABELS[name]
        ys = [fn(m) for m in metas]
        tr = [i for i, (y, s) in enumerate(zip(ys, splits)) if y is not None and s == "train"]
        te = [i for i, (y, s) in enumerate(zip(ys, splits)) if y is not None and s == "test"]
        if len(tr) < 8 or not te:
            rows.append(ProbeRow(name, classes, len(tr), len(te), math.nan, None, None))
            continue
        ytr = torch.tensor([ys[i] for i in tr])
        yte = torch.tensor([ys[i] for i in te])
        xtr, xte = features[tr].float(), features[te].float()
        majority = 100.0 * float((yte == torch.bincount(ytr, minlength=classes).argmax()).float().mean())
        lin = 100.0 * float((linear_probe(xtr, ytr, xte, classes) == yte).float().mean())
        mlp = 100.0 * float((mlp_probe(xtr, ytr, xte, classes) == yte).float().mean())
        rows.append(ProbeRow(name, classes, len(tr), len(te), majority, lin, mlp))
    return rows


def read_meta(root: str | Path) -> list[dict[str, Any]]:
    path = Path(root) / "meta.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no meta.jsonl (probes need a synthetic-world folder from `vlm data synth`)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def extract(source: FeatureSource, root: str | Path, metas: Sequence[dict[str, Any]], num_frames: int = 8,
            sampling: str = "uniform", progress: bool = True) -> tuple[torch.Tensor, list[int], list[str]]:
    """Features [N, F] of the clips that decode, their indices into `metas`, and "path: reason" of the others."""
    feats, kept, bad = [], [], []
    for i, m in enumerate(tqdm(metas, desc=f"probe features ({source.name[:40]})", disable=not progress)):
        path = Path(root) / m["video"]
        try:
            clip = read_clip(path, num_frames, sampling)
        except (OSError, ValueError) as e:
            bad.append(f"{path}: {e}")
            continue
        feats.append(source(clip))
        kept.append(i)
    if bad:
        log.warning("probe: %d clips could not be decoded and were left out; first: %s", len(bad), bad[0])
    if not feats:
        raise RuntimeError(f"probe: no clip of {root} could be decoded")
    return torch.stack(feats), kept, bad


def run_probe(sources: Sequence[str], root: str | Path, out: str | Path | None = None, *, num_frames: int = 8,
              pool: int = 2, labels: Sequence[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Probe every source on one synthetic world; writes `out/probe.json` and `out/probe.md` when `out` is given."""
    metas = read_meta(root)
    results: dict[str, Any] = {"data": str(root), "num_frames": num_frames, "pool": pool, "sources": []}
    for spec in sources:
        source = build_source(spec, pool)
        x, kept, bad = extract(source, root, metas, num_frames, progress=progress)
        rows = probe_labels(x, [metas[i] for i in kept], [metas[i]["split"] for i in kept], labels)
        results["sources"].append({"source": source.name, "dim": int(x.shape[1]), "clips": len(kept),
                                   "undecodable": len(bad), "rows": [r.__dict__ for r in rows]})
        log.info("probe %s: %s", source.name, ", ".join(f"{r.label} {r.linear}/{r.mlp}" for r in rows))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "probe.md").write_text(probe_table(results) + "\n")
    return results


def probe_table(results: dict[str, Any]) -> str:
    """A markdown table: one row per source, held-out accuracy linear / MLP per label (majority in the header)."""
    first = results["sources"][0]["rows"]
    head = "| source | dim | " + " | ".join(f"{r['label']} ({r['classes']}-way, majority {r['majority']:.0f}%)"
                                            for r in first) + " |"
    lines = [head, "|" + "---|" * (len(first) + 2)]
    for s in results["sources"]:
        cells = [f"{_pct(r['linear'])} / {_pct(r['mlp'])}" for r in s["rows"]]
        lines.append(f"| {s['source']} | {s['dim']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"
