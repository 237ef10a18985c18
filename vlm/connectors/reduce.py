"""Token reducers: spatial pooling, bipartite token merging (ToMe) and difference-aware pruning (DiffFP).

Each reducer maps VisualFeatures to VisualFeatures and is usable on its own or in front of any connector via
`build_connector(..., reduce=[{"name": "pool2d"}, ...])`.

Mask rule shared by all reducers: a token whose input mask is False ("pruned") never contributes to the value of
a kept output token. Pooling and merging average over kept sources only; an output is kept iff at least one of
its sources is kept.

Some reducers need a real 2-D grid (aligned patch positions across frames) and some destroy it (ToMe returns an
unstructured set on grid (T', 1, k)). `check_reducer_chain` rejects impossible orders at build time.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from vlm.connectors.base import TokenReducer, register_reducer
from vlm.towers.base import VisualFeatures

logger = logging.getLogger(__name__)

Grid = tuple[int, int, int]


def check_reducer_chain(reducers: Sequence[TokenReducer], consumer: str, consumer_needs_spatial: bool) -> None:
    """Raise ValueError when a reducer (or the consumer) needs a spatial grid that an earlier reducer destroyed.

    Reducers declare `needs_spatial_grid` (patch positions must mean the same place in every frame) and
    `keeps_spatial_grid` (output still is a spatial grid); unknown reducers default to (False, True).
    """
    destroyed_by: str | None = None
    for i, reducer in enumerate(reducers):
        name = getattr(reducer, "registry_name", type(reducer).__name__)
        if destroyed_by is not None and getattr(reducer, "needs_spatial_grid", False):
            raise ValueError(
                f"reducer chain: '{name}' (position {i}) needs a spatial (T', h, w) grid, but '{destroyed_by}' "
                f"before it returns an unstructured token set on grid (T', 1, k); put '{name}' before '{destroyed_by}'"
            )
        if not getattr(reducer, "keeps_spatial_grid", True):
            destroyed_by = name
    if destroyed_by is not None and consumer_needs_spatial:
        raise ValueError(
            f"{consumer} after '{destroyed_by}' is not supported: {consumer} pools/convolves over spatial "
            f"neighbours, but '{destroyed_by}' returns an unstructured token set on grid (T', 1, k); reduce with "
            f"pool2d instead, or use a connector without spatial structure (mlp with pool=1, qformer)"
        )


def masked_avg_pool2d(
    tokens: torch.Tensor, grid: Grid, mask: torch.Tensor | None, stride: int
) -> tuple[torch.Tensor, torch.Tensor | None, Grid]:
    """Average pooling with kernel = stride over (h, w), ceil-mode at odd edges, averaging kept tokens only.

    tokens [B, T, h*w, D], mask [B, T, h*w] or None -> (tokens [B, T, h'*w', D], mask or None, (T, h', w')),
    h' = ceil(h / stride). Edge windows average the positions that exist; an output is kept iff any source is.
    """
    b, t, n, d = tokens.shape
    _, h, w = grid
    ho, wo = math.ceil(h / stride), math.ceil(w / stride)
    x = tokens.reshape(b * t, h, w, d).permute(0, 3, 1, 2)  # [B*T, D, h, w]
    m = torch.ones(b * t, 1, h, w, dtype=x.dtype, device=x.device)
    if mask is not None:
        m = mask.reshape(b * t, 1, h, w).to(x.dtype)  # [B*T, 1, h, w]
        x = x * m
    pad = (0, wo * stride - w, 0, ho * stride - h)
    x = F.pad(x, pad)
    m = F.pad(m, pad)  # padded positions weigh 0, so edge windows average only real positions
    xs = F.avg_pool2d(x, stride, stride) * (stride * stride)  # [B*T, D, h', w'] window sums
    ms = F.avg_pool2d(m, stride, stride) * (stride * stride)  # [B*T, 1, h', w'] kept counts
    out = xs / ms.clamp_min(1e-6)
    out = out.permute(0, 2, 3, 1).reshape(b, t, ho * wo, d)  # [B, T, h'*w', D]
    out_mask = None if mask is None else (ms > 0.5).reshape(b, t, ho * wo)
    return out, out_mask, (t, ho, wo)


@register_reducer("pool2d")
class Pool2d(TokenReducer):
    """Spatial 2-D pooling per temporal position: (T', h, w) -> (T', ceil(h/stride), ceil(w/stride)).

    mode "avg": kernel = stride windows (edge windows average the positions that exist).
    mode "bilinear": bilinear resize to ceil(h/stride) x ceil(w/stride) (align_corners=False, no antialias), as
    LLaVA-OneVision does for video frames (Li et al. 2024); for even sizes and stride 2 it equals "avg".
    Masks: pruned tokens are excluded (weights renormalised); an output is kept iff any source with non-zero
    weight is kept.
    """

    needs_spatial_grid = True
    keeps_spatial_grid = True

    def __init__(self, stride: int = 2, mode: Literal["avg", "bilinear"] = "avg"):
        super().__init__()
        if stride < 1:
            raise ValueError(f"pool2d: stride must be >= 1, got {stride}")
        if mode not in ("avg", "bilinear"):
            raise ValueError(f"pool2d: mode must be 'avg' or 'bilinear', got {mode!r}")
        self.stride = stride
        self.mode = mode

    def output_grid(self, grid: Grid) -> Grid:
        t, h, w = grid
        return (t, math.ceil(h / self.stride), math.ceil(w / self.stride))

    def forward(self, feats: VisualFeatures) -> VisualFeatures:
        if self.stride == 1:
            return feats
        if self.mode == "avg":
            tokens, mask, grid = masked_avg_pool2d(feats.tokens, feats.grid, feats.mask, self.stride)
            return feats.with_(tokens=tokens, mask=mask, grid=grid)
        b, t, n, d = feats.tokens.shape
        _, h, w = feats.grid
        _, ho, wo = self.output_grid(feats.grid)
        x = feats.tokens.reshape(b * t, h, w, d).permute(0, 3, 1, 2)  # [B*T, D, h, w]
        if feats.mask is None:
            out = F.interpolate(x, size=(ho, wo), mode="bilinear", align_corners=False)
            out_mask = None
        else:
            m = feats.mask.reshape(b * t, 1, h, w).to(x.dtype)
            xs = F.interpolate(x * m, size=(ho, wo), mode="bilinear", align_corners=False)
            ms = F.interpolate(m, size=(ho, wo), mode="bilinear", align_corners=False)  # [B*T, 1, h', w']
            out = xs / ms.clamp_min(1e-6)
            out_mask = (ms > 1e-6).reshape(b, t, ho * wo)
        out = out.permute(0, 2, 3, 1).reshape(b, t, ho * wo, d)  # [B, T, h'*w', D]
        return feats.with_(tokens=out, mask=out_mask, grid=(t, ho, wo))


@register_reducer("tome")
class TokenMerge(TokenReducer):
    """Bipartite soft token merging (ToMe, Bolya et al. 2023) per temporal position, down to `tokens_per_frame`.

    Rounds of bipartite matching until the budget is met: tokens at even positions form set A, odd positions set
    B; each A token finds its most cosine-similar B token; the r most similar A tokens (r = min(excess, |A|))
    merge into their B match with size-weighted averages (every token carries its source count, so a merged token
    is the exact mean of its sources). Survivors keep their original spatial order. Applied within each temporal
    position separately, as LongVLM merges within segments (Weng et al. 2024). Similarity is on the token
    features: reducers run before any attention, so there are no keys to use. Deterministic (stable sorts).

    Output grid (T', 1, min(N, tokens_per_frame)): an unstructured token set. Masks: pruned tokens merge first and
    carry weight 0 (they never change a kept token's value); a merged token is kept iff any source is kept.
    `last_assignment` [B, T', N] holds, after each forward, the output slot each input token went to.
    """

    needs_spatial_grid = False
    keeps_spatial_grid = False

    def __init__(self, tokens_per_frame: int = 64):
        super().__init__()
        if tokens_per_frame < 1:
            raise ValueError(f"tome: tokens_per_frame must be >= 1, got {tokens_per_frame}")
        self.tokens_per_frame = tokens_per_frame
        self.last_assignment: torch.Tensor | None = None

    def output_grid(self, grid: Grid) -> Grid:
        t, h, w = grid
        return (t, 1, min(h * w, self.tokens_per_frame))

    def forward(self, feats: VisualFeatures) -> VisualFeatures:
        b, t, n, d = feats.tokens.shape
        k = min(n, self.tokens_per_frame)
        x = feats.tokens.reshape(b * t, n, d)  # [M, N, D]
        m = b * t
        w_kept = (
            torch.ones(m, n, dtype=x.dtype, device=x.device)
            if feats.mask is None
            else feats.mask.reshape(m, n).to(x.dtype)
        )
        sum_all = x  # [M, n, D] sum of source features
        size = torch.ones(m, n, dtype=x.dtype, device=x.device)  # [M, n] source counts
        sum_kept = x * w_kept[..., None]  # [M, n, D] sum of kept source features
        kept = w_kept  # [M, n] kept source counts
        pos = torch.arange(n, device=x.device).expand(m, n)  # [M, n] original index of each slot
        assign = torch.arange(n, device=x.device).expand(m, n)  # [M, N] current slot of every input token

        while sum_all.shape[1] > k:
            cur = sum_all.shape[1]
            state = (sum_all, size, sum_kept, kept, pos)
            sum_all, size, sum_kept, kept, pos, assign = self._merge_round(state, assign, cur - k)
        tokens = self._value(sum_all, size, sum_kept, kept).reshape(b, t, k, d)  # [B, T', k, D]
        mask = None if feats.mask is None else (kept > 0).reshape(b, t, k)
        self.last_assignment = assign.reshape(b, t, n).detach()
        return feats.with_(tokens=tokens, mask=mask, grid=(t, 1, k))

    @staticmethod
    def _value(sum_all: torch.Tensor, size: torch.Tensor, sum_kept: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Mean over kept sources, or over all sources when none is kept (such a token is masked out anyway)."""
        mean_kept = sum_kept / kept.clamp_min(1e-6)[..., None]
        mean_all = sum_all / size[..., None]
        return torch.where(kept[..., None] > 0, mean_kept, mean_all)

    def _merge_round(
        self, state: tuple[torch.Tensor, ...], assign: torch.Tensor, excess: int
    ) -> tuple[torch.Tensor, ...]:
        sum_all, size, sum_kept, kept, pos = state
        m, n, d = sum_all.shape
        n_a = (n + 1) // 2
        r = min(excess, n_a)
        feat = F.normalize(self._value(sum_all, size, sum_kept, kept), dim=-1)  # [M, n, D]
        scores = feat[:, ::2] @ feat[:, 1::2].transpose(1, 2)  # [M, |A|, |B|] cosine similarity
        # pruned sources go first and into kept destinations where possible: their weight is 0, so they vanish
        kept_a = kept[:, ::2] > 0  # [M, |A|]
        kept_b = kept[:, 1::2] > 0  # [M, |B|]
        scores = scores + 4.0 * (~kept_a)[:, :, None] - 4.0 * (~kept_b)[:, None, :]
        best, dst = scores.max(dim=-1)  # [M, |A|]
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices  # [M, |A|]
        src_a, unm_a = order[:, :r], order[:, r:]  # indices into A
        dst_b = dst.gather(1, src_a)  # [M, r] indices into B

        def split(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return v[:, ::2], v[:, 1::2]

        def take(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            if v.dim() == 3:
                return v.gather(1, idx[..., None].expand(-1, -1, v.shape[-1]))
            return v.gather(1, idx)

        def add(dst_v: torch.Tensor, src_v: torch.Tensor) -> torch.Tensor:
            if dst_v.dim() == 3:
                return dst_v.scatter_add(1, dst_b[..., None].expand(-1, -1, dst_v.shape[-1]), src_v)
            return dst_v.scatter_add(1, dst_b, src_v)

        merged = []
        for v in (sum_all, size, sum_kept, kept):
            a, bb = split(v)
            merged.append((take(a, unm_a), add(bb, take(a, src_a))))
        pos_a, pos_b = split(pos)
        new_pos = torch.cat([take(pos_a, unm_a), pos_b], dim=1)  # [M, n - r]
        perm = torch.sort(new_pos, dim=1, stable=True).indices  # survivors back in original spatial order
        out = [take(torch.cat(pair, dim=1), perm) for pair in merged]
        new_pos = take(new_pos, perm)

        # old slot -> new slot, for `last_assignment`
        rank = torch.empty_like(perm).scatter_(1, perm, torch.arange(n - r, device=perm.device).expand(m, -1))
        n_unm = n_a - r
        old_slot = torch.empty(m, n, dtype=torch.long, device=perm.device)
        a_slots = torch.arange(0, n, 2, device=perm.device).expand(m, -1)  # [M, |A|] old slot of each A token
        b_slots = torch.arange(1, n, 2, device=perm.device).expand(m, -1)
        old_slot.scatter_(1, take(a_slots, unm_a), rank[:, :n_unm])
        old_slot.scatter_(1, b_slots, rank[:, n_unm:])
        old_slot.scatter_(1, take(a_slots, src_a), take(rank[:, n_unm:], dst_b))
        assign = old_slot.gather(1, assign)
        return (*out, new_pos, assign)


@register_reducer("diff_prune")
class DiffPrune(TokenReducer):
    """Difference-aware frame/patch pruning (VideoLLaMA3's DiffFP, Zhang et al. 2025), applied to features.

    Each patch is compared with the same patch at the previous temporal position: "l1" is the mean absolute
    difference per channel (scale depends on the tower), "cosine" is 1 - cosine similarity (scale-free).
    Patches with distance < `threshold` are pruned; with `frame_threshold`, a whole temporal position whose mean
    patch distance is < `frame_threshold` is pruned. The first temporal position is always kept whole. The result
    is ANDed with any incoming mask. The grid is unchanged (num_tokens is an upper bound; the mask says what is
    kept). `last_kept_fraction` holds the kept fraction of the last batch.
    """

    needs_spatial_grid = True
    keeps_spatial_grid = True

    def __init__(
        self,
        threshold: float = 0.1,
        metric: Literal["l1", "cosine"] = "cosine",
        frame_threshold: float | None = None,
    ):
        super().__init__()
        if metric not in ("l1", "cosine"):
            raise ValueError(f"diff_prune: metric must be 'l1' or 'cosine', got {metric!r}")
        self.threshold = threshold
        self.metric = metric
        self.frame_threshold = frame_threshold
        self.last_kept_fraction: float | None = None

    def output_grid(self, grid: Grid) -> Grid:
        return grid

    @torch.no_grad()
    def distance(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T', N, D] -> [B, T'-1, N] distance of each patch to the same patch one temporal position earlier."""
        cur, prev = tokens[:, 1:].float(), tokens[:, :-1].float()
        if self.metric == "l1":
            return (cur - prev).abs().mean(dim=-1)
        return 1.0 - F.cosine_similarity(cur, prev, dim=-1, eps=1e-6)

    def forward(self, feats: VisualFeatures) -> VisualFeatures:
        b, t, n, _ = feats.tokens.shape
        keep = torch.ones(b, t, n, dtype=torch.bool, device=feats.tokens.device)
        if t > 1:
            dist = self.distance(feats.tokens)  # [B, T'-1, N]
            keep_rest = dist >= self.threshold
            if self.frame_threshold is not None:
                frame_moving = dist.mean(dim=-1) >= self.frame_threshold  # [B, T'-1]
                keep_rest = keep_rest & frame_moving[..., None]
            keep[:, 1:] = keep_rest
        if feats.mask is not None:
            keep = keep & feats.mask
        self.last_kept_fraction = keep.float().mean().item()
        logger.debug("diff_prune kept %.1f%% of %d tokens", 100 * self.last_kept_fraction, keep.numel())
        return feats.with_(mask=keep)


@register_reducer("temporal_pool")
class TemporalPool(TokenReducer):
    """Average over time: (T', h, w) -> (1, h, w). A frame-average baseline: whatever follows it can only see
    what the mean frame shows, so tasks that need order, direction or counts of events fall to chance."""

    needs_spatial_grid = False
    keeps_spatial_grid = True

    def output_grid(self, grid: Grid) -> Grid:
        return (1, grid[1], grid[2])

    def forward(self, feats: VisualFeatures) -> VisualFeatures:
        tokens = feats.tokens  # [B, T, N, D]
        if feats.mask is None:
            pooled = tokens.mean(dim=1, keepdim=True)  # [B, 1, N, D]
            mask = None
        else:
            m = feats.mask.unsqueeze(-1).to(tokens.dtype)  # [B, T, N, 1]
            pooled = (tokens * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1e-6)
            mask = feats.mask.any(dim=1, keepdim=True)  # [B, 1, N]
        ts = None if feats.timestamps is None else feats.timestamps[:, :1]
        return VisualFeatures(tokens=pooled, grid=self.output_grid(feats.grid), mask=mask, timestamps=ts)
