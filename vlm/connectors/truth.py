"""What a word-slot connector would write if its heads were perfect: its own text, from per-frame annotations.

The text oracle (`vlm data synth --oracle`) bounds the language side with the world's events written as a caption;
this bounds the connector's *format*: the same frames, words, sentences and time stamps the LLM reads from the heads,
filled from the annotations the heads are trained on (`regions`, `vlm.data.regions`). Train the LLM on it as a text
oracle (`scripts/words_oracle.py`) and the distance to the heads' model is what perception costs; the distance to
the event oracle is what the format costs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from vlm.towers.base import VisualFeatures


def true_detected(connector: Any, regions: Sequence[Sequence[dict[str, Any]]], timestamps: torch.Tensor,
                  grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The annotations as `WordSlots.detect` returns the heads' choices: scene words [B, T, S], the cells of the
    first `slots` objects in reading order [B, T, k], whether each is one [B, T, k], and each one's object then
    motion words [B, T, k, A] (indices into `connector.words`). Two objects whose centres share a cell are one (as
    a detector on that grid sees them). `timestamps`: [B, T] seconds of the frames read."""
    b, (t, h, w) = len(regions), grid
    feats = VisualFeatures(torch.zeros(b, t, h * w, 1), grid, timestamps=timestamps)
    target = connector.slot_targets(feats, regions)
    n = h * w
    first = target["found"] * (n - torch.arange(n, dtype=torch.float))  # earlier cells score higher: reading order
    score, cells = first.topk(min(connector.slots, n), -1)
    keep = score > 0
    ns, no = len(connector.scene_vocab), target["objects"].shape[0]
    scene = torch.stack([target["scene"][a] + connector.offsets[a] for a in range(ns)], -1) if ns else \
        torch.zeros(b, t, 0, dtype=torch.long)
    attrs = [target["objects"][a].gather(-1, cells).clamp(min=0) + connector.offsets[ns + a] for a in range(no)]
    attrs = torch.stack(attrs, -1) if attrs else cells.new_zeros(*cells.shape, 0)
    return scene, cells, keep, attrs


def written_text(connector: Any, feats: VisualFeatures, detected: tuple[torch.Tensor, ...] | None = None,
                 stamps: bool = True) -> list[str]:
    """Per clip, the text the connector writes from `detected` (as `WordSlots.detect` returns it; None: its heads'
    own choices on `feats`, after the reducers). Frames layout: each frame's words (after "Time: x.xs" when
    `stamps`, as the model's processor writes it; frames joined by a space, so that a word and the next stamp stay
    two tokens as they are for the model), event sentences and count sentences included; tracks and story
    layouts: their one text (no stamps: one group)."""
    if connector.layout != "frames":
        return [connector.text(seen, feats.grid) for seen in connector.detections(feats, detected)]
    ids, mask = connector.frame_ids(feats, detected)
    decode = connector._tokenizer[0].decode
    out = []
    for i in range(ids.shape[0]):
        frames = [decode(ids[i, j][mask[i, j]].tolist()) for j in range(ids.shape[1])]
        out.append(" ".join((f"Time: {s:.1f}s" if stamps else "") + f
                            for s, f in zip(feats.timestamps[i].tolist(), frames)))
    return out


def true_text(connector: Any, regions: Sequence[Sequence[dict[str, Any]]], timestamps: torch.Tensor,
              grid: tuple[int, int, int], stamps: bool = True) -> list[str]:
    """Per clip, the text the connector would write from the annotations (`written_text` of `true_detected`)."""
    if connector.reducers:
        raise ValueError("true_text: the connector's token reducers change the grid its heads read; the truth is "
                         "written on the tower's grid, so use it with a connector without reducers")
    detected = true_detected(connector, regions, timestamps, grid)
    feats = VisualFeatures(torch.zeros(len(regions), grid[0], grid[1] * grid[2], 1), grid, timestamps=timestamps)
    return written_text(connector, feats, detected, stamps)
