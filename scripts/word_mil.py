"""A verbalizer learned from captions alone: word tokens chosen from the frames without dense labels.

    python scripts/word_mil.py --data demo_data/synth --out runs/word_mil [--soft] [--tower effnet]

No per-frame annotations: per 2x2 cell of the vision oracle's features (`--tower effnet`: the quickstart's tower,
EfficientNet with cell statistics), a sigmoid per content token of the training texts; a clip's token counts as
present when its best cell says so, trained against the words of its caption and answers (multiple-instance BCE,
no LLM); each visual token is the sum of the embeddings of the cell's tokens above 0.5 (`--soft`: weighted by
probability). Then the recipe's stage with this connector frozen, scored (`cloze`) and checked for reliance into
`eval_cloze/` and `reliance/` under `--out` (read by scripts/grounding_chart.py). The word slots trained from dense
labels, which this experiment was measured against, are the package's `word_slots` connector (recipes/quickstart.yaml).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import vision_oracle as vo  # noqa: E402  (registers synth_truth)
from vlm.connectors.base import Connector, VisualTokens, register_connector  # noqa: E402
from vlm.connectors.reduce import masked_avg_pool2d  # noqa: E402
from vlm.towers.base import VisualFeatures  # noqa: E402


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
    p.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"), help="its last stage is run")
    p.add_argument("--out", default="runs/word_mil")
    p.add_argument("--soft", action="store_true", help="words weighted by probability, not thresholded")
    p.add_argument("--tower", choices=["effnet", "truth"], default="truth",
                   help="truth: the vision oracle's features; effnet: the quickstart's tower")
    p.add_argument("--steps", type=int, default=600, help="tagging steps of 32 clips")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    args = p.parse_args()
    from vlm.model import VideoLLM
    from vlm.train.engine import run_recipe
    from vlm.train.recipe import PartSpec, load_recipe
    from vlm.video import read_clip

    torch.manual_seed(0)
    data, out = Path(args.data).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tower = ({"name": "synth_truth", "data": str(data)} if args.tower == "truth"
             else {"name": "efficientnet_lite0", "image_size": 128, "layer": 11, "cell_stats": True})
    base = [f"vars.data={data}", f"model.tower={json.dumps(tower)}", 'model.connector={"name": "mlp", "pool": 2}']
    model = VideoLLM.from_config(load_recipe(args.recipe, base).model_config()).eval()
    metas = [json.loads(line) for line in (data / "meta.jsonl").read_text().splitlines()]
    feats: dict[str, list] = {"train": [], "test": []}
    texts: dict[str, list] = {"train": [], "test": []}
    answers: dict[str, list[str]] = {}
    for name in ("qa_train.json", "qa_test.json"):
        for r in json.loads((data / name).read_text()):
            answers.setdefault(r["video"], []).extend(c["value"] for c in r["conversations"] if c["from"] == "gpt")
    for m in metas:
        clip = read_clip(data / m["video"], model.config.num_frames, "uniform")
        with torch.no_grad():
            feats[m["split"]].append(model.tower.encode(model.processor.preprocess_clip(clip)[0][None])[0].float())
        texts[m["split"]].append(" ".join([m["caption"], *answers.get(m["video"], [])]))
    x = {s: torch.stack(v) for s, v in feats.items()}
    tok = model.processor.tokenizer
    ids = {s: [set(tok(t, add_special_tokens=False)["input_ids"]) for t in v] for s, v in texts.items()}
    df = Counter(i for s in ids["train"] for i in s)
    vocab = sorted(i for i, c in df.items() if 3 <= c <= 0.5 * len(ids["train"]) and tok.decode([i]).strip().isalpha())
    present = {s: torch.tensor([[v in w for v in vocab] for w in ids[s]], dtype=torch.float32) for s in ids}
    conn = WordMIL(x["train"].shape[-1], 1, vocab=vocab)
    held = train_mil(conn, x, present, model.tower.grid_for(model.config.num_frames), args.steps)
    torch.save(conn.head.state_dict(), out / "head.pt")
    connector = {"name": "word_mil", "vocab": vocab, "soft": args.soft, "weights": str(out / "head.pt")}
    print("tagging, held-out clips:", held, flush=True)
    (out / "stage_a.json").write_text(json.dumps(held, indent=1))
    del model
    recipe = load_recipe(args.recipe, base[:2] + [f"output_dir={out}/run", f"model.connector={json.dumps(connector)}"]
                         + args.set)
    recipe.stages = recipe.stages[-1:]  # the instruction stage, with this connector frozen
    recipe.stages[0].parts["connector"] = PartSpec(mode="frozen")
    vo.score_run(run_recipe(recipe), data, out, connector["name"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
