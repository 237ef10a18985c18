"""Learned verbalizers: a connector whose visual tokens are the LLM's own word embeddings, chosen from the frames.

    python scripts/word_slots.py --data demo_data/synth --out runs/word_slots          # dense labels, real tower
    python scripts/word_slots.py --data demo_data/synth --out runs/word_mil --mil       # caption words only

Stage A trains the connector's heads alone (no LLM, seconds to minutes); stage B is the recipe's stage with the
connector frozen; the run is scored (`cloze`) and checked for reliance, writing `eval_cloze/` and `reliance/`
under `--out` (read by scripts/grounding_chart.py).

- default (`word_slots`): on the quickstart's EfficientNet tap (8x8 cells at stride 16) plus each cell's pixel mean
  and standard deviation (`effnet_rgb`), heads say per cell whether an object's centre is there and its colour and
  shape, and per frame the background tone; trained on the training clips' ground truth (`meta.jsonl`), as a
  detector is trained on boxes. Tokens as `scripts/vision_oracle.py --literal slots` writes them from perfect
  perception: per frame the tone's word, then per detected object " <colour>", " <shape>", " <row>", " <column>".
- `--mil` (`word_mil`): no dense labels; per 2x2 cell of the vision oracle's features (or `--tower effnet_rgb`), a
  sigmoid per content token of the training texts; a clip's token counts as present when its best cell says so,
  trained against the words of its caption and answers (multiple-instance BCE); each visual token is the sum of the
  embeddings of the cell's tokens above 0.5 (`--soft`: weighted by probability).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import vision_oracle as vo  # noqa: E402  (registers synth_truth)
from vlm.connectors.base import Connector, VisualTokens, register_connector  # noqa: E402
from vlm.connectors.reduce import masked_avg_pool2d  # noqa: E402
from vlm.towers.base import VisionTower, VisualFeatures, build_tower, register_tower  # noqa: E402

GRID = vo.GRID


@register_tower("effnet_rgb")
class EffnetRGB(VisionTower):
    """EfficientNet-Lite0 at stride 16 (8x8x112 at 128 px) + each cell's pixel mean and std (6 channels)."""

    def __init__(self, image_size: int = 128, layer: int = 11):
        super().__init__()
        self.inner = build_tower("efficientnet_lite0", image_size=image_size, layer=layer)
        self.preprocessor = self.inner.preprocessor
        self.hidden_size = self.inner.hidden_size + 6

    def grid_for(self, num_frames, height=None, width=None):
        return self.inner.grid_for(num_frames, height, width)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.inner.encode(pixel_values)  # [B, T, 64, 112]
        b, t, c, h, w = pixel_values.shape
        x = pixel_values.reshape(b * t, c, h, w).float()
        mean = nn.functional.avg_pool2d(x, h // GRID)
        std = (nn.functional.avg_pool2d(x * x, h // GRID) - mean ** 2).clamp(min=0).sqrt()
        extra = torch.cat([mean, std], 1).flatten(2).transpose(1, 2).reshape(b, t, GRID * GRID, 6)
        return torch.cat([tokens, extra.to(tokens.dtype)], -1)


# ------------------------------------------------------------------------------------------- dense labels: slots
class SlotHead(nn.Module):
    """Per cell: object-centre logit, colour and shape logits (from the cell and its difference to the frame mean);
    per frame: background-tone logits."""

    def __init__(self, in_dim: int, hidden: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.cell = nn.Sequential(nn.Linear(2 * in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                  nn.Linear(hidden, 1 + len(vo.COLOR_NAMES) + len(vo.SHAPE_NAMES)))
        self.tone = nn.Sequential(nn.Linear(2 * in_dim, hidden), nn.GELU(), nn.Linear(hidden, len(vo.TONES)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm(x.float())  # [B, T, 64, C]
        frame = x.mean(2, keepdim=True)
        return self.cell(torch.cat([x, x - frame], -1)), self.tone(torch.cat([frame[:, :, 0], x.std(2)], -1))


@register_connector("word_slots")
class WordSlots(Connector):
    def __init__(self, in_dim: int, out_dim: int, reducers=(), weights: str | None = None):
        super().__init__(in_dim, out_dim, reducers)
        words = vo.word_table(vo.COLOR_NAMES + vo.SHAPE_NAMES + vo.TONES + vo.ROWS + vo.COLS)
        sizes = [len(vo.COLOR_NAMES), len(vo.SHAPE_NAMES), len(vo.TONES), 3, 3]
        for name, part in zip(("colors", "shapes", "tones", "rows", "cols"), words.split(sizes)):
            self.register_buffer(name, part.clone())
        self.head = SlotHead(in_dim)
        if weights:
            self.head.load_state_dict(torch.load(weights, map_location="cpu"))

    def project_grid(self, grid):
        return grid[0], 1 + 4 * vo.SLOTS

    def project(self, feats: VisualFeatures, instruction=None) -> VisualTokens:
        cell, tone = self.head(feats.tokens)
        nc = len(vo.COLOR_NAMES)
        found, color, shape = cell[..., 0].sigmoid(), cell[..., 1:1 + nc].argmax(-1), cell[..., 1 + nc:].argmax(-1)
        objects = []
        for i in range(cell.shape[0]):
            objects.append([])
            for j in range(cell.shape[1]):
                best = [c for c in found[i, j].argsort(descending=True)[:vo.SLOTS].tolist() if found[i, j, c] > 0.5]
                objects[-1].append([[self.colors[color[i, j, c]], self.shapes[shape[i, j, c]],
                                     *vo.cell_words(c, self.rows, self.cols)] for c in sorted(best)])
        out = vo.emit_slots(self.tones[tone.argmax(-1)], objects, self.colors.shape[-1])
        out.timestamps = feats.timestamps
        return out


def slot_labels(meta: dict, indices: np.ndarray) -> list[np.ndarray]:
    """Per sampled frame: object centre per cell, its colour and shape (-100 elsewhere), the background tone."""
    size = meta["size"] / GRID
    t = len(indices)
    found = np.zeros((t, GRID * GRID), np.float32)
    color, shape = np.full((t, GRID * GRID), -100, np.int64), np.full((t, GRID * GRID), -100, np.int64)
    tone = np.full(t, vo.TONES.index(meta["background"]["tones"][0]), np.int64)
    for j, k in enumerate(indices):
        for o in meta["objects"]:
            tr = o["track"]
            if tr["visible"][k] and tr["opacity"][k] >= 0.5:
                c = min(GRID - 1, max(0, int(tr["y"][k] // size))) * GRID + min(GRID - 1, max(0, int(tr["x"][k] // size)))
                found[j, c], color[j, c], shape[j, c] = 1, vo.COLOR_NAMES.index(tr["color"][k]), vo.SHAPE_NAMES.index(o["shape"])
    return [found, color, shape, tone]


def train_slots(feats: dict, labels: dict, steps: int) -> tuple[nn.Module, dict]:
    head = SlotHead(feats["train"].shape[-1])
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
    nc, ns = len(vo.COLOR_NAMES), len(vo.SHAPE_NAMES)

    def loss_of(x, ys):
        cell, tone = head(x)
        found, color, shape, tn = ys
        loss = (nn.functional.binary_cross_entropy_with_logits(cell[..., 0], found, pos_weight=torch.tensor(10.0))
                + nn.functional.cross_entropy(cell[..., 1:1 + nc].reshape(-1, nc), color.reshape(-1))
                + nn.functional.cross_entropy(cell[..., 1 + nc:].reshape(-1, ns), shape.reshape(-1))
                + nn.functional.cross_entropy(tone.reshape(-1, len(vo.TONES)), tn.reshape(-1)))
        return loss, cell, tone

    xtr, ytr = feats["train"], labels["train"]
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (32,))
        loss, _, _ = loss_of(xtr[idx], [y[idx] for y in ytr])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, cell, tone = loss_of(feats["test"], labels["test"])
        found, color, shape, tn = labels["test"]
        pred, real = cell[..., 0] > 0, found > 0
        tp = int((pred & real).sum())
        held = {"object_precision": tp / max(1, int(pred.sum())), "object_recall": tp / max(1, int(real.sum())),
                "color_acc": float((cell[..., 1:1 + nc].argmax(-1)[real] == color[real]).float().mean()),
                "shape_acc": float((cell[..., 1 + nc:].argmax(-1)[real] == shape[real]).float().mean()),
                "tone_acc": float((tone.argmax(-1) == tn).float().mean())}
    return head, {k: round(v, 3) for k, v in held.items()}


# ------------------------------------------------------------------------------------- caption words: MIL
class MILHead(nn.Module):
    """Per 2x2 cell: logits over the vocabulary from the cell, its change to the next and from the previous frame,
    and the frame's position."""

    def __init__(self, in_dim: int, vocab: int, frames: int = 8, hidden: int = 256):
        super().__init__()
        self.frames = frames
        self.norm = nn.LayerNorm(in_dim, elementwise_affine=False)
        self.net = nn.Sequential(nn.Linear(3 * in_dim + frames, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, vocab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, N, C] -> [B, T, N, V]
        x = self.norm(x.float())
        prev, nxt = torch.cat([x[:, :1], x[:, :-1]], 1), torch.cat([x[:, 1:], x[:, -1:]], 1)
        b, t, n, _ = x.shape
        pos = torch.eye(self.frames, device=x.device)[torch.linspace(0, self.frames - 1, t).round().long()]
        return self.net(torch.cat([x, nxt - x, x - prev, pos[None, :, None].expand(b, t, n, self.frames)], -1))


@register_connector("word_mil")
class WordMIL(Connector):
    def __init__(self, in_dim: int, out_dim: int, reducers=(), vocab: list[int] = (), weights: str | None = None,
                 soft: bool = False):
        super().__init__(in_dim, out_dim, reducers)
        from vlm.llm.load import load_llm

        table = load_llm("smollm2")[0].get_input_embeddings().weight.detach()
        self.register_buffer("table", table[torch.tensor(list(vocab))].clone())
        self.head = MILHead(in_dim, len(vocab))
        self.soft = soft
        if weights:
            self.head.load_state_dict(torch.load(weights, map_location="cpu"))

    def project_grid(self, grid):
        return grid[0], -(-grid[1] // 2) * -(-grid[2] // 2)

    def logits(self, feats: VisualFeatures) -> torch.Tensor:
        return self.head(masked_avg_pool2d(feats.tokens.float(), feats.grid, None, 2)[0])

    def project(self, feats: VisualFeatures, instruction=None) -> VisualTokens:
        p = self.logits(feats).sigmoid()
        p = p if self.soft else (p > 0.5).float()
        b, t, n, _ = p.shape
        embeds = torch.einsum("btnv,vd->btnd", p, self.table.float()).reshape(b, t * n, -1)
        return VisualTokens(embeds=embeds.to(self.table.dtype), groups=t, timestamps=feats.timestamps)


def train_mil(conn: WordMIL, feats: dict, present: dict, grid: tuple[int, int, int], steps: int) -> dict:
    opt = torch.optim.AdamW(conn.head.parameters(), lr=1e-3, weight_decay=0.01)

    def clip_probs(x):
        return conn.logits(VisualFeatures(tokens=x, grid=grid)).flatten(1, 2).amax(1).sigmoid()

    for _ in range(steps):
        idx = torch.randint(0, len(feats["train"]), (32,))
        loss = nn.functional.binary_cross_entropy(clip_probs(feats["train"][idx]).clamp(1e-6, 1 - 1e-6),
                                                  present["train"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred, real = clip_probs(feats["test"]) > 0.5, present["test"] > 0
    tp = int((pred & real).sum())
    return {"precision": round(tp / max(1, int(pred.sum())), 3), "recall": round(tp / max(1, int(real.sum())), 3)}


# ------------------------------------------------------------------------------------------------------- run
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="demo_data/synth")
    p.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"))
    p.add_argument("--out", default="runs/word_slots")
    p.add_argument("--mil", action="store_true", help="caption words only (multiple-instance tagging)")
    p.add_argument("--soft", action="store_true", help="with --mil: words weighted by probability, not thresholded")
    p.add_argument("--tower", choices=["effnet_rgb", "truth"], default=None,
                   help="default: effnet_rgb (slots), truth (--mil: the vision oracle's features)")
    p.add_argument("--steps", type=int, default=None, help="stage-A steps (default 1500 slots, 600 --mil)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    args = p.parse_args()
    from vlm.model import VideoLLM
    from vlm.train.engine import run_recipe
    from vlm.train.recipe import load_recipe
    from vlm.video import read_clip

    torch.manual_seed(0)
    data, out = Path(args.data).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = args.tower or ("truth" if args.mil else "effnet_rgb")
    tower = {"name": "synth_truth", "data": str(data)} if kind == "truth" else {"name": "effnet_rgb"}
    base = [f"vars.data={data}", f"model.tower={json.dumps(tower)}", 'model.connector={"name": "mlp", "pool": 2}']
    model = VideoLLM.from_config(load_recipe(args.recipe, base).model_config()).eval()
    metas = [json.loads(line) for line in (data / "meta.jsonl").read_text().splitlines()]
    feats: dict[str, list] = {"train": [], "test": []}
    labels: dict[str, list] = {"train": [], "test": []}
    texts: dict[str, list] = {"train": [], "test": []}
    answers: dict[str, list[str]] = {}
    for name in ("qa_train.json", "qa_test.json"):
        for r in json.loads((data / name).read_text()):
            answers.setdefault(r["video"], []).extend(c["value"] for c in r["conversations"] if c["from"] == "gpt")
    for m in metas:
        clip = read_clip(data / m["video"], model.config.num_frames, "uniform")
        with torch.no_grad():
            feats[m["split"]].append(model.tower.encode(model.processor.preprocess_clip(clip)[0][None])[0].float())
        labels[m["split"]].append(slot_labels(m, clip.indices))
        texts[m["split"]].append(" ".join([m["caption"], *answers.get(m["video"], [])]))
    x = {s: torch.stack(v) for s, v in feats.items()}
    if args.mil:
        tok = model.processor.tokenizer
        ids = {s: [set(tok(t, add_special_tokens=False)["input_ids"]) for t in v] for s, v in texts.items()}
        df = Counter(i for s in ids["train"] for i in s)
        vocab = sorted(i for i, c in df.items() if 3 <= c <= 0.5 * len(ids["train"]) and tok.decode([i]).strip().isalpha())
        present = {s: torch.tensor([[v in w for v in vocab] for w in ids[s]], dtype=torch.float32) for s in ids}
        conn = WordMIL(x["train"].shape[-1], 1, vocab=vocab)
        held = train_mil(conn, x, present, model.tower.grid_for(model.config.num_frames), args.steps or 600)
        torch.save(conn.head.state_dict(), out / "head.pt")
        connector = {"name": "word_mil", "vocab": vocab, "soft": args.soft, "weights": str(out / "head.pt")}
    else:
        y = {s: [torch.from_numpy(np.stack([row[i] for row in v])) for i in range(4)] for s, v in labels.items()}
        head, held = train_slots(x, y, args.steps or 1500)
        torch.save(head.state_dict(), out / "head.pt")
        connector = {"name": "word_slots", "weights": str(out / "head.pt")}
    print("stage A, held-out clips:", held, flush=True)
    (out / "stage_a.json").write_text(json.dumps(held, indent=1))
    del model
    sets = base[:2] + [f"output_dir={out}/run", f"model.connector={json.dumps(connector)}",
                       "stages.0.parts.connector.mode=frozen", "stages.0.parts.connector.lr=null"] + args.set
    vo.score_run(run_recipe(load_recipe(args.recipe, sets)), data, out, connector["name"])
    return 0

if __name__ == "__main__":
    sys.exit(main())
