"""The word-slot connector's heads: what each cell of a frame holds (an object's centre, its attributes) and what
the frame shows (the scene), and how an object moves, read from the frames around it (`vlm.connectors.words`)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from vlm.data.regions import cell_of, nearest_frames


class SlotHead(nn.Module):
    """Per cell: an object-centre logit and per-attribute logits (from the cell and its difference to the frame
    mean), then with `offsets` the (row, column) offset in cells from the cell's middle to the centre of the nearest
    object (CenterNet's offset, read here to tell one object lighting two cells from two objects in neighbouring
    cells); per frame: per-scene-attribute logits (from the frame's mean and spread over cells and, with
    `scene_grid` g > 1, the means of its g x g regions: where in the frame a tone is, e.g. which end of a
    gradient is which)."""

    def __init__(self, in_dim: int, object_classes: int, scene_classes: int, hidden: int = 256, scene_grid: int = 1,
                 offsets: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.offsets = bool(offsets)
        self.cell = nn.Sequential(nn.Linear(2 * in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                  nn.Linear(hidden, 1 + object_classes + 2 * self.offsets))
        self.scene_grid = int(scene_grid)
        regions = self.scene_grid ** 2 if self.scene_grid > 1 else 0
        self.scene = nn.Sequential(nn.Linear((2 + regions) * in_dim, hidden), nn.GELU(),
                                   nn.Linear(hidden, max(1, scene_classes)))

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, N, C] on a (T, h, w) grid -> cell outputs [B, T, N, 1 + object classes (+ 2 offsets)], scene
        logits [B, T, S]."""
        x = self.norm(x.to(self.norm.weight.dtype))
        frame = x.mean(2, keepdim=True)
        scene = [frame[:, :, 0], x.std(2)]
        if self.scene_grid > 1:
            b, t, _, c = x.shape
            maps = x.reshape(b * t, grid[1], grid[2], c).permute(0, 3, 1, 2)
            scene.append(F.adaptive_avg_pool2d(maps, self.scene_grid).flatten(1).reshape(b, t, -1))
        return self.cell(torch.cat([x, x - frame], -1)), self.scene(torch.cat(scene, -1))


class MotionHead(nn.Module):
    """Per queried cell: logits of the attributes that need time (how an object moves, grows, turns), from the
    cell and its 3x3 neighbourhood in the previous and the next frame (the edges repeat at the clip's ends)."""

    def __init__(self, in_dim: int, classes: int, hidden: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.net = nn.Sequential(nn.Linear(19 * in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int], b: torch.Tensor, t: torch.Tensor,
                c: torch.Tensor) -> torch.Tensor:
        """x [B, T, N, C]; b, t, c: [M] clip, frame and cell of each query -> [M, classes]."""
        x = self.norm(x.to(self.norm.weight.dtype))
        h, w = grid[1], grid[2]
        row, col = c // w, c % w
        offsets = torch.tensor([-1, 0, 1], device=c.device)
        rows = (row[:, None, None] + offsets[None, :, None]).clamp(0, h - 1)
        cols = (col[:, None, None] + offsets[None, None, :]).clamp(0, w - 1)
        around = (rows * w + cols).flatten(1)  # [M, 9]
        last = x.shape[1] - 1
        prev = x[b[:, None], (t - 1).clamp(min=0)[:, None], around]  # [M, 9, C]
        nxt = x[b[:, None], (t + 1).clamp(max=last)[:, None], around]
        return self.net(torch.cat([x[b, t, c], prev.flatten(1), nxt.flatten(1)], -1))


def centre_targets(centres: list[tuple[float, float]], h: int, w: int) -> dict[int, tuple[float, float]]:
    """The offset targets of one frame: for each cell in the 3x3 neighbourhood of an object's cell, the (row,
    column) offset in cells from the cell's middle to that object's centre ([x, y] in [0, 1]), the nearest object
    where two neighbourhoods meet."""
    best: dict[int, tuple[float, float, float]] = {}
    for x, y in centres:
        gy, gx = y * h, x * w
        r0, c0 = divmod(cell_of((x, y), h, w), w)
        for r in range(max(0, r0 - 1), min(h, r0 + 2)):
            for c in range(max(0, c0 - 1), min(w, c0 + 2)):
                dy, dx = gy - (r + 0.5), gx - (c + 0.5)
                d = dy * dy + dx * dx
                if r * w + c not in best or d < best[r * w + c][0]:
                    best[r * w + c] = (d, dy, dx)
    return {cell: (dy, dx) for cell, (_, dy, dx) in best.items()}


def distinct_peaks(logits: torch.Tensor, offsets: torch.Tensor | None, radius: float) -> torch.Tensor:
    """Which cells of centre-logit maps [M, h, w] are peaks: the highest of their 3x3 neighbourhood, or with
    centre offsets [M, h, w, 2] (cells) any cell whose predicted centre lies `radius` cells or more from that of
    every higher cell of its neighbourhood (two objects in neighbouring cells are two peaks, one object lighting
    two cells is one). -> [M, h, w] bool."""
    if offsets is None:
        maps = logits[:, None]
        return (F.max_pool2d(maps, 3, 1, 1) == maps)[:, 0]
    m, h, w = logits.shape
    rows = torch.arange(h, device=logits.device, dtype=offsets.dtype)[:, None].expand(h, w)
    cols = torch.arange(w, device=logits.device, dtype=offsets.dtype)[None, :].expand(h, w)
    centres = offsets + torch.stack([rows, cols], -1)  # [M, h, w, 2], in cells
    around = F.unfold(F.pad(logits[:, None], (1, 1, 1, 1), value=float("-inf")), 3)  # [M, 9, h * w]
    far = F.pad(centres.permute(0, 3, 1, 2), (1, 1, 1, 1), value=1e4)
    near = F.unfold(far, 3).reshape(m, 2, 9, h * w)  # each neighbour's predicted centre
    gap = (near - centres.permute(0, 3, 1, 2).reshape(m, 2, 1, h * w)).norm(dim=1)  # [M, 9, h * w]
    higher = around > logits.reshape(m, 1, h * w)
    return ~(higher & (gap < radius)).any(1).reshape(m, h, w)


def slot_targets(regions: Sequence[Sequence[dict[str, Any]]], timestamps: Sequence[Sequence[float]],
                 grid: tuple[int, int, int], scene_vocab: Mapping[str, Sequence[str]],
                 attributes: Mapping[str, Sequence[str]], offsets: bool = False) -> dict[str, torch.Tensor]:
    """Each clip's annotations at its frames' timestamps, on a (T, h, w) grid: "found" [B, T, N] (1 where a cell
    holds an object's centre), "objects" [A, B, T, N] (each object then motion attribute's word index there, -100
    elsewhere), "scene" [S, B, T] (each scene attribute's word index), and with `offsets` "offset" [B, T, N, 2]
    and "near" [B, T, N] (the cells it is defined at: `centre_targets`)."""
    b, t, h, w = len(regions), len(timestamps[0]), grid[1], grid[2]
    n = h * w
    found = torch.zeros(b, t, n)
    objects = torch.full((len(attributes), b, t, n), -100, dtype=torch.long)
    scene = torch.zeros(len(scene_vocab), b, t, dtype=torch.long)
    offset, near = torch.zeros(b, t, n, 2), torch.zeros(b, t, n, dtype=torch.bool)
    # indices gathered in lists and written at once: element-wise tensor writes cost more than the rest of a step
    words: dict[tuple[int, int, int], list[int]] = {}  # (clip, frame, cell) -> its object's words (the last one's)
    scene_words, near_at, near_d = [], [], []
    for i, clip in enumerate(regions):
        for j, frame in enumerate(nearest_frames(clip, timestamps[i])):
            if offsets:
                for c, d in centre_targets([o["center"] for o in frame.get("objects", [])], h, w).items():
                    near_at.append((i, j, c))
                    near_d.append(d)
            scene_words.append([vocab.index(frame["scene"][attr]) for attr, vocab in scene_vocab.items()])
            for obj in frame.get("objects", []):
                words[(i, j, cell_of(obj["center"], h, w))] = [vocab.index(obj[attr]) for attr, vocab in attributes.items()]
    if scene_vocab:
        scene[:] = torch.tensor(scene_words, dtype=torch.long).t().reshape(len(scene_vocab), b, t)
    if words:
        i, j, c = torch.tensor(list(words)).unbind(1)
        found[i, j, c] = 1
        if attributes:
            objects[:, i, j, c] = torch.tensor(list(words.values()), dtype=torch.long).t()
    if near_at:
        i, j, c = torch.tensor(near_at).unbind(1)
        offset[i, j, c], near[i, j, c] = torch.tensor(near_d, dtype=offset.dtype), True
    out = {"found": found, "objects": objects, "scene": scene}
    return out | ({"offset": offset, "near": near} if offsets else {})


def slot_loss(connector: Any, feats: Any, regions: Sequence[Sequence[dict[str, Any]]]) -> torch.Tensor:
    """A word-slot connector's heads against each clip's annotations (`connector.slot_targets`): binary
    cross-entropy for object centres (positives weighted 10x: few cells hold one), cross-entropy for each object
    attribute at the cells that hold an object and for each scene attribute per frame, smooth L1 for the centre
    offsets, cross-entropy for each motion attribute where objects are. `feats`: after the connector's reducers."""
    target = connector.slot_targets(feats, regions)
    found, objects, scenes, offsets = connector.split_logits(feats, with_offsets=True)
    loss = F.binary_cross_entropy_with_logits(found.float(), target["found"],
                                              pos_weight=torch.tensor(10.0, device=found.device))
    for logits, y in zip(objects, target["objects"]):
        if bool((y >= 0).any()):
            loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    for logits, y in zip(scenes, target["scene"]):
        loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    if offsets is not None and bool(target["near"].any()):
        loss = loss + F.smooth_l1_loss(offsets[target["near"]].float(), target["offset"][target["near"]])
    if connector.motion_vocab and bool(target["found"].any()):  # only where objects are: a few cells per frame
        b, t, c = target["found"].nonzero(as_tuple=True)
        motion_targets = target["objects"][len(connector.object_vocab):]
        for logits, y in zip(connector.motion_logits(feats, b, t, c), motion_targets):
            loss = loss + F.cross_entropy(logits.float(), y[b, t, c])
    return loss
