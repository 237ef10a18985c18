"""The vision oracle: a recipe trained with perfect perception in place of the vision tower, on the synthetic world.

    python scripts/vision_oracle.py --data demo_data/synth --recipe recipes/quickstart.yaml --out runs/vision_oracle

The `synth_truth` tower replaces the recipe's tower. It looks every frame up (by a hash of its pixels) in the
world's ground truth (`meta.jsonl`) and emits an 8x8 grid per frame, the grid EfficientNet's stride-16 tap has at
128 px, of clean, linearly readable channels: the background's kind and tones in every cell, and in the cell
holding each visible object's centre its colour, shape and size (one-hot), visibility, opacity, scale, angle and
sub-cell position. Nothing is lost before the connector and nothing is hard to read: what the connector and the
LLM then learn is the bound of the vision path at that budget, as the text oracle is the bound of the language
side. The run trains the recipe, scores the held-out benchmark (`cloze`) and measures visual reliance, writing
`eval_cloze/` and `reliance/` under `--out` (read by scripts/grounding_chart.py).

`--literal` replaces the recipe's connector by a fixed verbalizer (`synth_literal_words`): each 2x2 cell's token is
the sum of the LLM's input embeddings of " <colour>" and " <shape>" of the object there, or of its background
tone's word when the cell is empty: visual tokens that are literally the LLM's own words. `--literal slots`
(`synth_literal_slots`) writes them one word per token and only for what is there: per frame the background tone's
word, then per visible object (at most 3, in reading order of their cells) " <colour>", " <shape>", " <row>",
" <column>" (top/middle/bottom, left/center/right); unused slots are pruned.

Frames are found by content, so only the world's own clips can be encoded (any other frame is a KeyError naming
it); identical frames within a clip share one entry, and two different states with identical pixels are counted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_tools.synth.generate import seen_background  # noqa: E402
from data_tools.synth.world import BG_KINDS, BG_TONES, COLORS, SHAPES, SIZES  # noqa: E402
from vlm.connectors.base import Connector, VisualTokens, register_connector  # noqa: E402
from vlm.connectors.reduce import masked_avg_pool2d  # noqa: E402
from vlm.towers.base import VisionTower, VisualFeatures, register_tower  # noqa: E402
from vlm.towers.common import CLIP_MEAN, CLIP_STD  # noqa: E402
from vlm.video.decode import VideoReader  # noqa: E402
from vlm.video.transforms import VideoPreprocessor  # noqa: E402

COLOR_NAMES, SHAPE_NAMES = list(COLORS), [*SHAPES, "box"]  # the shuffle scenario's boxes are a shape of their own
SIZE_NAMES, TONES = list(SIZES), list(BG_TONES)
OBJECT_CHANNELS = len(COLOR_NAMES) + len(SHAPE_NAMES) + len(SIZE_NAMES) + 7  # + visible, opacity, scale, 2 angle, dx, dy
BACKGROUND_CHANNELS = len(BG_KINDS) + len(TONES)
GRID = 8


def frame_key(frame: torch.Tensor) -> bytes:
    """A frame's identity: the hash of its preprocessed pixels mapped back to 0-255 integers."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float64)[:, None, None]
    pixels = torch.round((frame.double() * std + mean) * 255).to(torch.int16)
    return hashlib.sha1(pixels.numpy().tobytes()).digest()


def frame_truth(meta: dict, k: int) -> np.ndarray:
    """Frame k of a clip as [GRID * GRID, channels] of ground truth."""
    cell = meta["size"] / GRID
    out = np.zeros((GRID, GRID, BACKGROUND_CHANNELS + OBJECT_CHANNELS), np.float32)
    background = seen_background(meta, k)
    out[:, :, BG_KINDS.index(background["kind"])] = 1
    for tone in background["tones"]:
        out[:, :, len(BG_KINDS) + TONES.index(tone)] = 1
    for obj in meta["objects"]:
        track = obj["track"]
        if not track["visible"][k]:
            continue
        x, y = track["x"][k], track["y"][k]
        row, col = min(GRID - 1, max(0, int(y // cell))), min(GRID - 1, max(0, int(x // cell)))
        v = np.zeros(OBJECT_CHANNELS, np.float32)
        v[COLOR_NAMES.index(track["color"][k])] = 1
        v[len(COLOR_NAMES) + SHAPE_NAMES.index(obj["shape"])] = 1
        v[len(COLOR_NAMES) + len(SHAPE_NAMES) + SIZE_NAMES.index(obj["size"])] = 1
        angle = np.deg2rad(track["angle"][k]) * 4  # shapes repeat within 90 degrees
        v[-7:] = [1, track["opacity"][k], track["scale"][k], np.sin(angle), np.cos(angle),
                  x / cell - col - 0.5, y / cell - row - 0.5]
        out[row, col, BACKGROUND_CHANNELS:] += v
    return out.reshape(GRID * GRID, -1)


@register_tower("synth_truth")
class SynthTruthTower(VisionTower):
    """data: the synthetic folder whose clips it knows (meta.jsonl + videos)."""

    def __init__(self, data: str, image_size: int = 128):
        super().__init__()
        self.data = str(data)
        self.preprocessor = VideoPreprocessor(size=image_size, mean=CLIP_MEAN, std=CLIP_STD, mode="squash")
        self.hidden_size = BACKGROUND_CHANNELS + OBJECT_CHANNELS
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the tower a device and dtype
        self.table: dict[bytes, np.ndarray] = {}
        self.clashes = 0
        root = Path(data)
        for line in (root / "meta.jsonl").read_text(encoding="utf-8").splitlines():
            meta = json.loads(line)
            with VideoReader(root / meta["video"]) as reader:
                pixels, _ = self.preprocessor.clip(reader.get(np.arange(reader.info.num_frames)))
            for k in range(pixels.shape[0]):
                key, truth = frame_key(pixels[k]), frame_truth(meta, k)
                if key in self.table and not np.array_equal(self.table[key], truth):
                    self.clashes += 1
                    continue
                self.table.setdefault(key, truth)

    def grid_for(self, num_frames: int, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        return (num_frames, GRID, GRID)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, t = pixel_values.shape[:2]
        rows = []
        for i in range(b):
            for j in range(t):
                key = frame_key(pixel_values[i, j].cpu())
                if key not in self.table:
                    raise KeyError(f"synth_truth: frame {j} of clip {i} is not a frame of {self.data}")
                rows.append(self.table[key])
        tokens = torch.from_numpy(np.stack(rows)).reshape(b, t, GRID * GRID, self.hidden_size)
        return tokens.to(self.anchor.device, self.anchor.dtype)


@register_connector("synth_literal_words")
class LiteralWords(Connector):
    """The fixed verbalizer of `--literal` over the `synth_truth` tower's channels (needs the packaged SmolLM2)."""

    def __init__(self, in_dim: int, out_dim: int, reducers=()):
        super().__init__(in_dim, out_dim, reducers)
        from vlm.llm.load import load_llm

        llm, tokenizer = load_llm("smollm2")
        table = llm.get_input_embeddings().weight.detach()

        def words(names: list[str]) -> torch.Tensor:
            return torch.stack([table[tokenizer(" " + n, add_special_tokens=False)["input_ids"][0]] for n in names])

        self.register_buffer("colors", words(COLOR_NAMES))
        self.register_buffer("shapes", words(SHAPE_NAMES))
        self.register_buffer("tones", words(TONES))
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a trainable part, so a recipe's connector stage is valid

    def project_grid(self, grid: tuple[int, int, int]) -> tuple[int, int]:
        t, h, w = grid
        return t, -(-h // 2) * -(-w // 2)

    def project(self, feats: VisualFeatures, instruction=None) -> VisualTokens:
        x, _, _ = masked_avg_pool2d(feats.tokens.float(), feats.grid, None, 2)  # [B, T, cells, C]
        b, t, n, _ = x.shape
        first = BACKGROUND_CHANNELS
        colors = x[..., first:first + len(COLOR_NAMES)]
        shapes = x[..., first + len(COLOR_NAMES):first + len(COLOR_NAMES) + len(SHAPE_NAMES)]
        tones = x[..., len(BG_KINDS):len(BG_KINDS) + len(TONES)]
        objects = self.colors[colors.argmax(-1)] + self.shapes[shapes.argmax(-1)]
        embeds = torch.where(colors.sum(-1, keepdim=True) > 0, objects, self.tones[tones.argmax(-1)]) + 0 * self.anchor
        return VisualTokens(embeds=embeds.reshape(b, t * n, -1), groups=t, timestamps=feats.timestamps)


SLOTS, ROWS, COLS = 3, ["top", "middle", "bottom"], ["left", "center", "right"]


def word_table(names: list[str]) -> torch.Tensor:
    """The packaged SmolLM2's input embeddings of " <name>" (first token of each)."""
    from vlm.llm.load import load_llm

    llm, tokenizer = load_llm("smollm2")
    table = llm.get_input_embeddings().weight.detach()
    return torch.stack([table[tokenizer(" " + n, add_special_tokens=False)["input_ids"][0]] for n in names])


def emit_slots(tone_words: torch.Tensor, objects: list[list[list[torch.Tensor]]], dim: int) -> VisualTokens:
    """Per frame: its tone word, then up to SLOTS objects' words (4 each); unused slots pruned by the mask.
    tone_words [B, T, D]; objects[b][t] = list of word-embedding lists, in reading order."""
    b, t = tone_words.shape[:2]
    per = 1 + 4 * SLOTS
    out = torch.zeros(b, t, per, dim, device=tone_words.device)
    mask = torch.zeros(b, t, per, dtype=torch.bool, device=tone_words.device)
    out[:, :, 0], mask[:, :, 0] = tone_words, True
    for i in range(b):
        for j in range(t):
            for k, words in enumerate(objects[i][j][:SLOTS]):
                for q, e in enumerate(words):
                    out[i, j, 1 + 4 * k + q], mask[i, j, 1 + 4 * k + q] = e, True
    return VisualTokens(embeds=out.reshape(b, t * per, dim), groups=t, mask=mask.reshape(b, t * per))


def cell_words(cell: int, rows: torch.Tensor, cols: torch.Tensor) -> list[torch.Tensor]:
    """The row and column words of a cell of the 8x8 grid (3x3 coarse position)."""
    return [rows[(cell // GRID) * 3 // GRID], cols[(cell % GRID) * 3 // GRID]]


@register_connector("synth_literal_slots")
class LiteralSlots(Connector):
    """`--literal slots` over the `synth_truth` tower's channels (needs the packaged SmolLM2)."""

    def __init__(self, in_dim: int, out_dim: int, reducers=()):
        super().__init__(in_dim, out_dim, reducers)
        words = word_table(COLOR_NAMES + SHAPE_NAMES + TONES + ROWS + COLS)
        sizes = [len(COLOR_NAMES), len(SHAPE_NAMES), len(TONES), 3, 3]
        for name, part in zip(("colors", "shapes", "tones", "rows", "cols"), words.split(sizes)):
            self.register_buffer(name, part.clone())
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a trainable part, so a recipe's connector stage is valid

    def project_grid(self, grid: tuple[int, int, int]) -> tuple[int, int]:
        return grid[0], 1 + 4 * SLOTS

    def project(self, feats: VisualFeatures, instruction=None) -> VisualTokens:
        x = feats.tokens.float()  # [B, T, 64, C]
        first = BACKGROUND_CHANNELS
        colors = x[..., first:first + len(COLOR_NAMES)]
        shapes = x[..., first + len(COLOR_NAMES):first + len(COLOR_NAMES) + len(SHAPE_NAMES)]
        tones = self.tones[x[..., 0, len(BG_KINDS):len(BG_KINDS) + len(TONES)].argmax(-1)]
        objects = [[[[self.colors[colors[i, j, c].argmax()], self.shapes[shapes[i, j, c].argmax()],
                      *cell_words(c, self.rows, self.cols)]
                     for c in (colors[i, j].sum(-1) > 0).nonzero().flatten().tolist()]
                    for j in range(x.shape[1])] for i in range(x.shape[0])]
        out = emit_slots(tones, objects, self.colors.shape[-1])
        out.embeds = out.embeds + 0 * self.anchor
        out.timestamps = feats.timestamps
        return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="demo_data/synth")
    p.add_argument("--recipe", default="recipes/quickstart.yaml")
    p.add_argument("--out", default="runs/vision_oracle")
    p.add_argument("--literal", nargs="?", const="sum", choices=["sum", "slots"],
                   help="a fixed verbalizer in place of the recipe's connector: summed words per cell, or word slots")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    args = p.parse_args()
    from vlm.train.engine import run_recipe
    from vlm.train.recipe import load_recipe

    data = Path(args.data).resolve()
    tower = json.dumps({"name": "synth_truth", "data": str(data)})
    sets = [f"vars.data={data}", f"output_dir={args.out}", f"model.tower={tower}"]
    if args.literal:
        name = {"sum": "synth_literal_words", "slots": "synth_literal_slots"}[args.literal]
        sets.append(f'model.connector={{"name": "{name}"}}')
    score_run(run_recipe(load_recipe(args.recipe, sets + args.set)), data, Path(args.out), "vision oracle")
    return 0


def score_run(final: Path, data: Path, out: Path, label: str) -> None:
    """A trained run scored (`cloze`, held-out benchmark) and checked for reliance (60 held-out records), into
    OUT/eval_cloze and OUT/reliance (what scripts/grounding_chart.py reads)."""
    from evals.mcq import evaluate_mcq
    from evals.reliance import visual_reliance
    from vlm.model import VideoLLM

    model = VideoLLM.from_pretrained(final)
    result = evaluate_mcq(model, data / "mvbench", out / "eval_cloze", profile="cloze",
                          model_name=str(final), workers=0)
    reliance = visual_reliance(model, data / "qa_test.json", out / "reliance", limit=60, model_name=str(final), workers=0)
    m, r = result.metrics, reliance.metrics
    print(f"{label}: {m['accuracy_mean_over_tasks']:.1f}% mean over tasks; reliance gap {r['gap']:+.3f} +- "
          f"{r['gap_stderr']:.3f}, own clip preferred {r['own_preferred_percent']:.0f}%")


if __name__ == "__main__":
    sys.exit(main())
