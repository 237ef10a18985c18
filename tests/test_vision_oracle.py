"""scripts/vision_oracle.py: the ground-truth tower finds every frame of its world and emits its ground truth;
the literal verbalizer turns an object's cell into its colour and shape words."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import vision_oracle as vo  # noqa: E402

from vlm.video import read_clip  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from data_tools.synth import generate

    root = tmp_path_factory.mktemp("world")
    generate(root, 5, seed=3, frames=16, size=128)
    return root


def test_truth_tower_looks_frames_up_by_content(world):
    tower = vo.SynthTruthTower(str(world))
    meta = json.loads((world / "meta.jsonl").read_text().splitlines()[0])
    clip = read_clip(world / meta["video"], 4)
    pixels, _ = tower.preprocessor.clip(clip)
    tokens = tower.encode(pixels[None])  # [1, 4, 64, C]
    for j, k in enumerate(clip.indices.tolist()):
        assert torch.equal(tokens[0, j], torch.from_numpy(vo.frame_truth(meta, k)))
    obj = next(o for o in meta["objects"] if o["track"]["visible"][clip.indices[0]])
    k = int(clip.indices[0])
    cell = int(obj["track"]["y"][k] // 16) * 8 + int(obj["track"]["x"][k] // 16)
    assert tokens[0, 0, cell, vo.BACKGROUND_CHANNELS + vo.COLOR_NAMES.index(obj["track"]["color"][k])] == 1
    with pytest.raises(KeyError, match="not a frame of"):
        tower.encode(torch.zeros(1, 1, 3, 128, 128))


@pytest.mark.slow
def test_literal_words_are_the_llm_embeddings_of_what_is_there(world):
    tower = vo.SynthTruthTower(str(world))
    words = vo.LiteralWords(tower.hidden_size, 576)
    feats = torch.zeros(1, 1, 64, tower.hidden_size)
    feats[0, 0, :, len(vo.BG_KINDS) + vo.TONES.index("navy")] = 1  # a navy background everywhere
    feats[0, 0, 9, vo.BACKGROUND_CHANNELS + vo.COLOR_NAMES.index("red")] = 1  # a red circle in cell (1, 1)
    feats[0, 0, 9, vo.BACKGROUND_CHANNELS + len(vo.COLOR_NAMES) + vo.SHAPE_NAMES.index("circle")] = 1
    from vlm.towers.base import VisualFeatures

    out = words.project(VisualFeatures(tokens=feats, grid=(1, 8, 8))).embeds[0].detach()  # [16, 576]
    red, circle = words.colors[vo.COLOR_NAMES.index("red")], words.shapes[vo.SHAPE_NAMES.index("circle")]
    torch.testing.assert_close(out[0], red + circle)  # pooled cell (0, 0) holds grid cell (1, 1)
    torch.testing.assert_close(out[1], words.tones[vo.TONES.index("navy")])
    assert np.isclose(float(out[5].norm()), float(words.tones[vo.TONES.index("navy")].norm()))


@pytest.mark.slow
def test_literal_slots_write_one_word_per_token_for_what_is_there(world):
    """`--literal slots`: per frame the tone word, then each object's colour, shape, row and column words in
    reading order; unused slots are pruned by the mask."""
    from vlm.towers.base import VisualFeatures

    tower = vo.SynthTruthTower(str(world))
    slots = vo.LiteralSlots(tower.hidden_size, 576)
    feats = torch.zeros(1, 2, 64, tower.hidden_size)
    feats[0, :, :, len(vo.BG_KINDS) + vo.TONES.index("navy")] = 1
    for cell, color, shape in ((63, "red", "circle"), (9, "blue", "star")):  # frame 0: two objects; frame 1: none
        feats[0, 0, cell, vo.BACKGROUND_CHANNELS + vo.COLOR_NAMES.index(color)] = 1
        feats[0, 0, cell, vo.BACKGROUND_CHANNELS + len(vo.COLOR_NAMES) + vo.SHAPE_NAMES.index(shape)] = 1
    out = slots.project(VisualFeatures(tokens=feats, grid=(2, 8, 8)))
    per = 1 + 4 * vo.SLOTS
    assert out.embeds.shape == (1, 2 * per, 576) and out.groups == 2
    kept = out.embeds[0][out.mask[0]].detach()
    word = lambda table, names, n: table[names.index(n)]  # noqa: E731
    expected = [word(slots.tones, vo.TONES, "navy"),
                word(slots.colors, vo.COLOR_NAMES, "blue"), word(slots.shapes, vo.SHAPE_NAMES, "star"),
                slots.rows[0], slots.cols[0],  # cell 9 = (1, 1): top left
                word(slots.colors, vo.COLOR_NAMES, "red"), word(slots.shapes, vo.SHAPE_NAMES, "circle"),
                slots.rows[2], slots.cols[2],  # cell 63 = (7, 7): bottom right
                word(slots.tones, vo.TONES, "navy")]  # frame 1: the tone alone
    torch.testing.assert_close(kept, torch.stack(expected))


def test_word_slot_targets_match_the_truth_towers_object_cells(world):
    """The quickstart's word_slots heads are trained on targets (from `vlm data synth`'s regions) that put each
    visible object in the cell the vision oracle puts it, with its colour and shape, and the frame's background
    words."""
    import yaml

    from data_tools.synth.generate import frame_regions, scene_words
    from vlm.connectors.words import WordSlots
    from vlm.towers.base import VisualFeatures

    cfg = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())["model"]["connector"]
    slots = WordSlots(4, 8, scene=cfg["scene"], objects=cfg["objects"])
    meta = json.loads((world / "meta.jsonl").read_text().splitlines()[1])
    indices = np.array([0, 5, 10, 15])
    feats = VisualFeatures(torch.zeros(1, 4, vo.GRID * vo.GRID, 4), (4, vo.GRID, vo.GRID),
                           timestamps=torch.tensor(indices / meta["fps"])[None])
    target = slots.slot_targets(feats, [frame_regions(meta)])
    found, (color, shape), scene = target["found"][0], target["objects"][:, 0], target["scene"][:, 0]
    for j, k in enumerate(indices):
        truth = vo.frame_truth(meta, int(k))
        colors = truth[:, vo.BACKGROUND_CHANNELS:vo.BACKGROUND_CHANNELS + len(vo.COLOR_NAMES)]
        visible = [o for o in meta["objects"] if o["track"]["visible"][k] and o["track"]["opacity"][k] >= 0.5]
        cells = set(torch.nonzero(found[j]).flatten().tolist())
        assert 0 < len(cells) <= len(visible) and cells <= set(np.flatnonzero(colors.sum(1)))
        for c in cells:
            assert colors[c, vo.COLOR_NAMES.index(cfg["objects"]["color"][color[j, c]])] >= 1
            assert truth[c, vo.BACKGROUND_CHANNELS + len(vo.COLOR_NAMES) + vo.SHAPE_NAMES.index(cfg["objects"]["shape"][shape[j, c]])] >= 1
        assert int((color[j] >= 0).sum()) == len(cells)
    for a, (attr, words) in enumerate(cfg["scene"].items()):  # the background seen in each frame
        assert scene[a].tolist() == [words.index(scene_words(meta, int(k))[attr]) for k in indices]
