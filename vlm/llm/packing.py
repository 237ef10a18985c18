"""Padding-free training forwards: a padded batch's real tokens run through the LLM as one row.

A batch padded to its longest sample makes the LLM compute every pad position in every layer: 21% of what the
quickstart's stage 2 reads, 35% of the long recipe's (docs/BENCHMARKS.md). Packing drops them without changing
which samples share a batch: the rows' real positions are concatenated into one sequence, each sample keeps its own
position ids (rotary embeddings see 0, 1, ... per sample), and attention runs per sample, causally, inside the
sample's span (`cu_seq_lens`, the cumulative lengths flash-attention's variable-length kernels take). The loss is
the same function of the same weights; only the order of floating-point sums differs.

Attention: an LLM on `flash_attention_2/3/4` reads the spans itself (transformers' variable-length path); on `sdpa`
or `eager` it runs `segment_attention` for the packed forward: PyTorch's SDPA, causal, once per sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

SEGMENTS = "vlm_segments"
_NATIVE = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def segment_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      cu_seq_lens_q: torch.Tensor | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """Causal attention inside each packed sample: query [1, H, N, d], key/value [1, H_kv, N, d], the samples'
    spans `cu_seq_lens_q` [n + 1] (0, end of the first, ..., N). Returns [1, N, H, d] as transformers expects."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError("segment attention runs packed forwards only: one row and its cu_seq_lens_q")
    bounds = cu_seq_lens_q.tolist()
    gqa = query.shape[1] != key.shape[1]
    out = torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                    dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
                     for a, b in zip(bounds[:-1], bounds[1:])], dim=2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENTS, segment_attention)


def supports_packing(llm: nn.Module) -> str | None:
    """None when `llm` can run packed forwards, else why not."""
    config = llm.config
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"{type(llm).__name__} uses sliding-window attention"
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        return f"{type(llm).__name__} soft-caps its attention or logits"
    if config._attn_implementation not in ("sdpa", "eager", *_NATIVE):
        return f"attention implementation {config._attn_implementation!r}"
    return None


@contextlib.contextmanager
def packed_attention(llm: nn.Module) -> Iterator[None]:
    """Within the block, `llm` attends per packed sample (see the module docstring); restored after."""
    config = llm.config
    before = config._attn_implementation
    if before in _NATIVE:
        yield
        return
    config._attn_implementation = SEGMENTS
    try:
        yield
    finally:
        config._attn_implementation = before


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
