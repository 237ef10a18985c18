"""VideoLLM's side of the evaluation interface: answer requests in text, or score given continuations.

`ScoringMixin` is a base class of `VideoLLM`. Its two methods take request objects by duck typing (the
dataclasses live in `evals.interface`, which `vlm` never imports); a request needs the attributes

    uid: str, clip: vlm.video.Clip | None, turns: list[Turn], prefill: str, media_type: str
    + max_new_tokens: int, stop: tuple[str, ...]       (generate_answers)
    + continuations: list[str]                          (score_options)

Option scoring shares the prompt: the video + question prefix is prefilled into a KV cache once, the cache is
repeated along the batch dimension once per continuation, and only the continuation tokens extend it.
`share_prefix=False` recomputes every continuation from scratch (the reference the tests compare against).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from transformers import StoppingCriteria, StoppingCriteriaList

log = logging.getLogger(__name__)


class FirstLineStop(StoppingCriteria):
    """Stops a row once its generated text holds one of `stops` after some non-blank text.

    With `inputs_embeds` generation the ids passed here are the generated tokens only.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stops:
            return done
        for i, row in enumerate(input_ids.tolist()):
            text = self.tokenizer.decode(row, skip_special_tokens=True).lstrip()
            done[i] = any(s in text for s in self.stops)
        return done


class ScoringMixin:
    """`generate_answers` and `score_options` for a `VideoLLM` (uses its processor, embed, prefill, extend, llm)."""

    # ------------------------------------------------------------------ text answers
    @torch.no_grad()
    def generate_answers(self, requests: Sequence[Any], *, batch_size: int | None = None) -> list[str]:
        """Greedy answers, one per request, without the prefill; requests with equal prefill run as one batch."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.prefill, []).append(i)
        step = batch_size or max(1, len(requests))
        for prefill, idx in groups.items():
            for start in range(0, len(idx), step):
                chunk = idx[start : start + step]
                samples = [self._request_sample(requests[i]) for i in chunk]
                batch = self.processor.build_batch(samples, generation=True, prefill=prefill)  # type: ignore[attr-defined]
                max_new = max(int(requests[i].max_new_tokens) for i in chunk)
                stops = sorted({s for i in chunk for s in getattr(requests[i], "stop", ())})
                extra: dict[str, Any] = {}
                if stops:
                    extra["stopping_criteria"] = StoppingCriteriaList([FirstLineStop(self.processor.tokenizer, stops)])  # type: ignore[attr-defined]
                texts = self.generate(batch, max_new_tokens=max_new, **extra)  # type: ignore[attr-defined]
                for i, text in zip(chunk, texts):
                    answers[i] = text
        return [a if a is not None else "" for a in answers]

    # ------------------------------------------------------------------ option scores
    @torch.no_grad()
    def score_options(self, requests: Sequence[Any], *, share_prefix: bool = True) -> list[list[float]]:
        """Per request, the summed log-probability of each continuation's tokens after prompt + prefill.

        Continuations are tokenized on their own (no special tokens) and appended to the prompt's tokens,
        so every option is scored against the same prompt tokens.
        """
        out: list[list[float]] = []
        for r in requests:
            sample = self._request_sample(r)
            batch = self.processor.build_batch([sample], generation=True, prefill=r.prefill)  # type: ignore[attr-defined]
            embeds, attention, _ = self.embed(batch)  # type: ignore[attr-defined]  # [1, S, D], [1, S]
            tokenizer = self.processor.tokenizer  # type: ignore[attr-defined]
            conts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in r.continuations]
            if share_prefix:
                out.append(self._score_with_cache(embeds, attention, conts))
            else:
                out.append(self._score_recompute(embeds, attention, conts))
        return out

    def _request_sample(self, r: Any) -> dict[str, Any]:
        return self.processor.make_sample(r.turns, r.clip, r.media_type if r.clip is not None else None, str(r.uid))  # type: ignore[attr-defined]

    def _continuation_ids(self, conts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded continuation ids [K, L] and their mask [K, L]."""
        width = max(1, max(len(c) for c in conts))
        tok = self.processor.tokenizer  # type: ignore[attr-defined]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(conts), width), int(pad), dtype=torch.long, device=device)
        mask = torch.zeros((len(conts), width), dtype=torch.long, device=device)
        for k, c in enumerate(conts):
            if c:
                ids[k, : len(c)] = torch.as_tensor(c, device=device)
                mask[k, : len(c)] = 1
        return ids, mask

    @staticmethod
    def _gather(first_logp: torch.Tensor, rest_logp: torch.Tensor, conts: list[list[int]]) -> list[float]:
        """Sum of token log-probs: first token from the prompt's last position, the rest from rest_logp [K, L, V].

        Summed as Python floats (float64, on any device), so sums that differ by less than float32's resolution
        are no tie.
        """
        scores = []
        for k, c in enumerate(conts):
            if not c:
                scores.append(0.0)
                continue
            picked = [float(first_logp[c[0]])]
            if len(c) > 1:
                nxt = torch.as_tensor(c[1:], device=rest_logp.device)
                picked += rest_logp[k, torch.arange(len(c) - 1, device=rest_logp.device), nxt].tolist()
            scores.append(math.fsum(picked))
        return scores

    def _score_with_cache(self, embeds: torch.Tensor, attention: torch.Tensor, conts: list[list[int]]) -> list[float]:
        # logits only at the last prompt position: the rest of the prompt is never scored
        logits, cache = self.prefill(embeds, attention)  # type: ignore[attr-defined]  # [1, 1, V]
        first_logp = F.log_softmax(logits[0, -1].float(), dim=-1)  # [V]
        if all(len(c) <= 1 for c in conts):
            return self._gather(first_logp, first_logp.new_zeros(len(conts), 1, 1), conts)
        cache.batch_repeat_interleave(len(conts))  # [1, ...] -> [K, ...] per layer, in place
        ids, mask = self._continuation_ids(conts, embeds.device)  # [K, L]
        full_mask = torch.cat([attention.expand(len(conts), -1), mask], dim=1)  # [K, S + L]
        cont_embeds = self.llm.get_input_embeddings()(ids)  # type: ignore[attr-defined]  # [K, L, D]
        logits = self.extend(cache, cont_embeds, full_mask, logits_to_keep=0)  # type: ignore[attr-defined]
        rest_logp = F.log_softmax(logits.float(), dim=-1)  # [K, L, V]; position j predicts token j + 1
        return self._gather(first_logp, rest_logp, conts)

    def _score_recompute(self, embeds: torch.Tensor, attention: torch.Tensor, conts: list[list[int]]) -> list[float]:
        """Reference: each continuation appended to the prompt and run in one full forward, no cache."""
        k, s = len(conts), embeds.shape[1]
        ids, mask = self._continuation_ids(conts, embeds.device)  # [K, L]
        cont_embeds = self.llm.get_input_embeddings()(ids).to(embeds.dtype)  # type: ignore[attr-defined]  # [K, L, D]
        full = torch.cat([embeds.expand(k, -1, -1), cont_embeds], dim=1)  # [K, S + L, D]
        full_mask = torch.cat([attention.expand(k, -1), mask], dim=1)
        logits = self.llm(inputs_embeds=full, attention_mask=full_mask, use_cache=False).logits.float()  # type: ignore[attr-defined]
        logp = F.log_softmax(logits, dim=-1)
        first_logp = logp[0, s - 1]
        return self._gather(first_logp, logp[:, s:], conts)
