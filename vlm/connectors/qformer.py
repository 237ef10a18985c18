"""Querying-transformer connectors: BLIP-2's Q-Former, Video-LLaMA's video Q-Former and InstructBLIP queries.

The Q-Former is written here with `scaled_dot_product_attention` instead of using transformers'
`Blip2QFormerModel`: in transformers 5.23 that class builds the cross-attention key mask with the length of
queries + text, so instruction-aware queries (text in self-attention) combined with a visual key mask (pruned
tokens) fail with a shape error; its mask and attention dispatch are also internal APIs that changed across 4.x/5.x,
and it forces its LayerNorm dtype on inputs. The architecture is the same as BLIP-2's (post-LN BERT layers,
cross-attention every `cross_attention_frequency` layers, separate feed-forward weights for queries and text);
loading a pretrained BLIP-2 Q-Former would need a key mapping (not provided).
"""

from __future__ import annotations

import logging
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlm.connectors.base import Connector, Instruction, TokenReducer, VisualTokens, register_connector
from vlm.connectors.reduce import check_reducer_chain
from vlm.towers.base import VisualFeatures

logger = logging.getLogger(__name__)


class Attention(nn.Module):
    """Multi-head attention with a key-padding mask; keys/values may come from a different width (cross)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"Q-Former: hidden size {dim} is not a multiple of the number of heads {heads}")
        kv_dim = kv_dim or dim
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, Lq, D], kv [B, Lk, Dkv], key_mask [B, Lk] bool (True = attend; every row has a True) or None
        b, lq, d = x.shape
        lk = kv.shape[1]
        q = self.q(x).reshape(b, lq, self.heads, -1).transpose(1, 2)  # [B, H, Lq, Dh]
        k = self.k(kv).reshape(b, lk, self.heads, -1).transpose(1, 2)  # [B, H, Lk, Dh]
        v = self.v(kv).reshape(b, lk, self.heads, -1).transpose(1, 2)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, Lk]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(b, lq, d))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))


class QFormerLayer(nn.Module):
    """Post-LN layer: self-attention over [queries; text] -> cross-attention of the queries to the visual tokens
    (when `cross`) -> feed-forward, with separate feed-forward weights for text tokens (InstructBLIP)."""

    def __init__(self, dim: int, heads: int, ffn: int, kv_dim: int, cross: bool, text: bool, dropout: float):
        super().__init__()
        self.self_attn = Attention(dim, heads, dropout=dropout)
        self.self_norm = nn.LayerNorm(dim, eps=1e-12)
        self.cross_attn = Attention(dim, heads, kv_dim=kv_dim, dropout=dropout) if cross else None
        self.cross_norm = nn.LayerNorm(dim, eps=1e-12) if cross else None
        self.ffn = FeedForward(dim, ffn, dropout)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-12)
        self.text_ffn = FeedForward(dim, ffn, dropout) if text else None
        self.text_ffn_norm = nn.LayerNorm(dim, eps=1e-12) if text else None
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        h: torch.Tensor,
        num_queries: int,
        self_mask: torch.Tensor | None,
        visual: torch.Tensor | None,
        visual_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        # h [B, K + S, D]: K queries then S text tokens
        h = self.self_norm(h + self.drop(self.self_attn(h, h, self_mask)))
        q, text = h[:, :num_queries], h[:, num_queries:]
        if self.cross_attn is not None and self.cross_norm is not None and visual is not None:
            q = self.cross_norm(q + self.drop(self.cross_attn(q, visual, visual_mask)))
        q = self.ffn_norm(q + self.ffn(q))
        if text.shape[1] == 0:
            return q
        if self.text_ffn is None or self.text_ffn_norm is None:
            raise RuntimeError("Q-Former layer got text tokens but was built without text feed-forward weights")
        text = self.text_ffn_norm(text + self.text_ffn(text))
        return torch.cat([q, text], dim=1)


class QFormer(nn.Module):
    """A stack of QFormerLayers with an input LayerNorm (BLIP-2, Li et al. 2023). With cross_attention_frequency
    0 it is a plain post-LN self-attention encoder over its inputs. Returns the query outputs only."""

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        kv_dim: int,
        cross_attention_frequency: int = 2,
        intermediate_size: int | None = None,
        text: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        ffn = intermediate_size or 4 * hidden_size
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.drop_in = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(
                hidden_size,
                num_heads,
                ffn,
                kv_dim,
                cross=cross_attention_frequency > 0 and i % cross_attention_frequency == 0,
                text=text,
                dropout=dropout,
            )
            for i in range(num_layers)
        )

    def forward(
        self,
        queries: torch.Tensor,
        visual: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # queries [B, K, D], visual [B, N, Dv], visual_mask [B, N], text [B, S, D], text_mask [B, S],
        # query_mask [B, K] (which queries may be attended to in self-attention) -> [B, K, D]
        k = queries.shape[1]
        h = queries if text is None else torch.cat([queries, text], dim=1)
        self_mask = None
        if text_mask is not None or query_mask is not None:
            b = queries.shape[0]
            qm = query_mask if query_mask is not None else queries.new_ones(b, k, dtype=torch.bool)
            tm = text_mask if text_mask is not None else queries.new_ones(b, h.shape[1] - k, dtype=torch.bool)
            self_mask = _nonempty(torch.cat([qm, tm], dim=1))
        visual_mask = None if visual_mask is None else _nonempty(visual_mask)
        h = self.drop_in(self.norm(h))
        for layer in self.layers:
            h = layer(h, k, self_mask, visual, visual_mask)
        return h[:, :k]


def _nonempty(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool -> same, with fully-masked rows opened up (their outputs are masked out by the caller;
    attention over no keys would give NaN)."""
    return mask | ~mask.any(dim=-1, keepdim=True)


@register_connector("qformer")
class QFormerConnector(Connector):
    """Learnable queries read the visual tokens through cross-attention (BLIP-2, Li et al. 2023).

    Two stages, as Video-LLaMA (Zhang et al. 2023): a frame-level Q-Former (`frame_queries` queries per temporal
    position, `num_layers` layers, cross-attention every `cross_attention_frequency` layers), then learnable
    temporal position embeddings (one per temporal position, up to `max_frames`) added to the frame outputs, then
      - per_frame=False (default): a video-level Q-Former (`temporal_layers` layers, cross-attention in every
        layer) whose `num_queries` queries attend to all T' * frame_queries frame outputs -> groups = 1,
        tokens = num_queries;
      - per_frame=True: `temporal_layers` self-attention layers over all T' * frame_queries frame outputs
        (0 = none) -> groups = T', tokens per group = frame_queries.
    instruction_aware=True (InstructBLIP, Dai et al. 2023): the instruction's LLM embeddings are projected to the
    Q-Former width and join the queries in the self-attention of each query stage (not in cross-attention); only
    query outputs are returned. With no instruction given, the queries run alone.
    Beyond `max_frames` temporal positions: pe_overflow "interpolate" (linear, with a warning) or "error".
    Mask rule: pruned visual tokens are masked out of the cross-attention keys; a temporal position with no kept
    token is masked out of the video-level keys (per_frame: out of the temporal self-attention keys, and its
    output tokens are masked out). The video tokens themselves are always kept.
    Output projection: Linear(hidden_size, out_dim).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        reducers: Sequence[TokenReducer] = (),
        num_queries: int = 32,
        frame_queries: int | None = None,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int | None = None,
        cross_attention_frequency: int = 2,
        temporal_layers: int = 2,
        max_frames: int = 32,
        pe_overflow: Literal["interpolate", "error"] = "interpolate",
        per_frame: bool = False,
        instruction_aware: bool = False,
        instruction_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__(in_dim, out_dim, reducers)
        check_reducer_chain(self.reducers, consumer="qformer", consumer_needs_spatial=False)
        if cross_attention_frequency < 1:
            raise ValueError(f"qformer: cross_attention_frequency must be >= 1, got {cross_attention_frequency}")
        if not per_frame and temporal_layers < 1:
            raise ValueError("qformer: the video-level Q-Former (per_frame=False) needs temporal_layers >= 1")
        if pe_overflow not in ("interpolate", "error"):
            raise ValueError(f"qformer: pe_overflow must be 'interpolate' or 'error', got {pe_overflow!r}")
        self.num_queries = num_queries
        self.frame_queries = frame_queries or num_queries
        self.hidden_size = hidden_size
        self.max_frames = max_frames
        self.pe_overflow = pe_overflow
        self.per_frame = per_frame
        self.uses_instruction = instruction_aware
        self._warned_overflow = False

        std = 0.02  # BLIP-2's initializer range
        self.frame_query_tokens = nn.Parameter(torch.randn(self.frame_queries, hidden_size) * std)  # [Kf, H]
        self.frame_qformer = QFormer(
            hidden_size, num_layers, num_heads, in_dim, cross_attention_frequency, intermediate_size,
            text=instruction_aware, dropout=dropout,
        )
        self.frame_position = nn.Embedding(max_frames, hidden_size)  # [max_frames, H]
        if per_frame:
            self.video_query_tokens = None
            self.temporal = (
                QFormer(hidden_size, temporal_layers, num_heads, hidden_size, 0, intermediate_size, dropout=dropout)
                if temporal_layers > 0
                else None
            )
        else:
            self.video_query_tokens = nn.Parameter(torch.randn(num_queries, hidden_size) * std)  # [K, H]
            self.temporal = QFormer(
                hidden_size, temporal_layers, num_heads, hidden_size, 1, intermediate_size,
                text=instruction_aware, dropout=dropout,
            )
        self.instruction_proj = nn.Linear(instruction_dim or out_dim, hidden_size) if instruction_aware else None
        self.out_proj = nn.Linear(hidden_size, out_dim)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def project_grid(self, grid: tuple[int, int, int]) -> tuple[int, int]:
        if self.per_frame:
            return grid[0], self.frame_queries
        return 1, self.num_queries

    def temporal_embedding(self, t: int) -> torch.Tensor:
        """[T', H] learnable temporal position embeddings, linearly interpolated beyond `max_frames`."""
        table = self.frame_position.weight  # [max_frames, H]
        if t <= self.max_frames:
            return table[:t]
        if self.pe_overflow == "error":
            raise ValueError(
                f"qformer: {t} temporal positions exceed max_frames={self.max_frames} of the temporal position "
                f"embeddings; sample fewer frames, build with a larger max_frames, or set pe_overflow='interpolate'"
            )
        if not self._warned_overflow:
            logger.warning("qformer: %d temporal positions > max_frames=%d: interpolating the temporal embeddings",
                           t, self.max_frames)
            self._warned_overflow = True
        return F.interpolate(table.T[None], size=t, mode="linear", align_corners=True)[0].T

    def project(self, feats: VisualFeatures, instruction: Instruction | None = None) -> VisualTokens:
        b, t, n, _ = feats.tokens.shape
        kf, hid = self.frame_queries, self.hidden_size
        dtype = self.out_proj.weight.dtype
        visual = feats.tokens.to(dtype).reshape(b * t, n, -1)  # [B*T', N, D]
        visual_mask = None if feats.mask is None else feats.mask.reshape(b * t, n)  # [B*T', N]

        text = text_mask = None
        if self.instruction_proj is not None and instruction is not None:
            text = self.instruction_proj(instruction.embeds.to(dtype))  # [B, S, H]
            text_mask = instruction.mask.bool()  # [B, S]

        def per_frame_rep(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.repeat_interleave(t, dim=0)  # [B*T', ...]

        queries = self.frame_query_tokens.expand(b * t, -1, -1)  # [B*T', Kf, H]
        frames = self.frame_qformer(queries, visual, visual_mask, per_frame_rep(text), per_frame_rep(text_mask))
        frames = frames.reshape(b, t, kf, hid) + self.temporal_embedding(t)[None, :, None, :]  # [B, T', Kf, H]
        frames = frames.reshape(b, t * kf, hid)  # [B, T'*Kf, H], chronological

        frame_kept = None if feats.mask is None else feats.mask.any(dim=-1)  # [B, T']
        token_kept = None if frame_kept is None else frame_kept.repeat_interleave(kf, dim=1)  # [B, T'*Kf]
        if self.per_frame:
            out = frames if self.temporal is None else self.temporal(frames, query_mask=token_kept)
            groups, mask = t, token_kept
            timestamps = feats.timestamps
        else:
            assert self.video_query_tokens is not None
            vq = self.video_query_tokens.expand(b, -1, -1)  # [B, K, H]
            out = self.temporal(vq, frames, token_kept, text, text_mask)  # [B, K, H]
            groups, mask = 1, None
            timestamps = None if feats.timestamps is None else feats.timestamps[:, :1]
        embeds = self.out_proj(out)  # [B, L, D_llm]
        return VisualTokens(embeds=embeds, groups=groups, mask=mask, timestamps=timestamps)
