"""Padding-free training forwards: a padded batch's real tokens run through the LLM as one row.

A batch padded to its longest sample makes the LLM compute every pad position in every layer: 21% of what the
quickstart's stage 2 reads, 35% of the long recipe's (docs/BENCHMARKS.md). Packing drops them without changing
which samples share a batch: the rows' real positions are concatenated into one sequence, each sample keeps its own
position ids (rotary embeddings see 0, 1, ... per sample), and attention runs per sample, causally, inside the
sample's span (`cu_seq_lens`, the cumulative lengths flash-attention's variable-length kernels take). The loss is
the same function of the same weights; only the order of floating-point sums differs.

Attention: an LLM on `flash_attention_2/3/4` reads the spans itself (transformers' variable-length path); one on
`sdpa` switches to `segment_attention`, which is transformers' SDPA attention unless it is given the spans, and then
PyTorch's SDPA, causal, once per sample. The switch is for good, not for the one forward: gradient checkpointing
recomputes a layer during the backward pass and must see the attention its forward saw.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SEGMENTS = "vlm_sdpa_segments"
_NATIVE = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def segment_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      cu_seq_lens_q: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except in a packed forward: given the samples' spans `cu_seq_lens_q` [n + 1]
    (0, end of the first, ..., N) of query [1, H, N, d] and key/value [1, H_kv, N, d], causal attention within each
    span. Returns [1, N, H, d] as transformers expects."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"a packed forward has one row, got {query.shape[0]}")
    bounds = cu_seq_lens_q.tolist()
    gqa = query.shape[1] != key.shape[1]
    out = torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                    dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
                     for a, b in zip(bounds[:-1], bounds[1:])], dim=2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENTS, segment_attention)
AttentionMaskInterface.register(SEGMENTS, sdpa_mask)  # padded forwards get SDPA's own masks


def attention_limit(llm: nn.Module) -> str | None:
    """Why `llm`'s attention would not follow spans or a mask given from outside (a sliding window that is on, as
    configs may carry one switched off; soft-capped attention), else None."""
    config = llm.config
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"{type(llm).__name__} uses sliding-window attention"
    if getattr(config, "attn_logit_softcapping", None):
        return f"{type(llm).__name__} soft-caps its attention"
    return None


def supports_packing(llm: nn.Module) -> str | None:
    """None when `llm` can run packed forwards, else why not."""
    config = llm.config
    if why := attention_limit(llm):
        return why
    if getattr(config, "final_logit_softcapping", None):
        return f"{type(llm).__name__} soft-caps its logits"
    if config._attn_implementation not in ("sdpa", SEGMENTS, *_NATIVE):
        return f"attention implementation {config._attn_implementation!r} (load the LLM with sdpa or flash attention)"
    return None


def enable_packing(llm: nn.Module) -> None:
    """Let `llm` run packed forwards: an `sdpa` LLM switches to `segment_attention` for good (the same SDPA for every
    forward without spans, so gradient checkpointing's recomputation and evaluation see what they saw before); flash
    attention reads the spans itself. Raises ValueError with the reason where packing cannot hold."""
    why = supports_packing(llm)
    if why:
        raise ValueError(f"padding-free batches are not available: {why}")
    if llm.config._attn_implementation == "sdpa":
        llm.config._attn_implementation = SEGMENTS


def pack(embeds: torch.Tensor, attention: torch.Tensor, targets: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A padded batch as one row: (embeds [1, N, D], position_ids [1, N], targets [1, N], cu_seq_lens [B + 1],
    longest sample) from embeds [B, S, D], attention [B, S] (1 on real positions, on either side of padding) and
    per-position targets [B, S] (what each position predicts, already shifted within its row)."""
    real = attention.bool()
    lengths = real.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("a packed batch has an empty sample")
    positions = real.long().cumsum(1) - 1
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return embeds[real][None], positions[real][None], targets[real][None], cu, int(lengths.max())
