"""VideoLLM's side of the evaluation interface: answer requests in text, or score given continuations.

`ScoringMixin` is a base class of `VideoLLM`. Its two methods take request objects by duck typing (the
dataclasses live in `evals.interface`, which `vlm` never imports); a request needs the attributes

    uid: str, clip: vlm.video.Clip | None, turns: list[Turn], prefill: str, media_type: str
    + max_new_tokens: int, stop: tuple[str, ...]       (generate_answers)
    + continuations: list[str]                          (score_options)

Option scoring shares the prompt: a batch of video + question prefixes (left-padded) is prefilled into one KV
cache, each prompt's row is repeated once per continuation, and only the continuation tokens extend it, all
options of all prompts in one forward. `share_prefix=False` recomputes every continuation from scratch (the
reference the tests compare against).
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

    def _batches(self, requests: Sequence[Any], batch_size: int | None) -> list[tuple[str, list[int]]]:
        """(prefill, request indices) chunks of at most `batch_size` (None: no limit); one prefill per chunk."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.prefill, []).append(i)
        step = batch_size or max(1, len(requests))
        return [(prefill, idx[s : s + step]) for prefill, idx in groups.items() for s in range(0, len(idx), step)]

    def _request_batch(self, requests: Sequence[Any], chunk: list[int], prefill: str) -> Any:
        samples = [self._request_sample(requests[i]) for i in chunk]
        return self.processor.build_batch(samples, generation=True, prefill=prefill)  # type: ignore[attr-defined]

    def _request_sample(self, r: Any) -> dict[str, Any]:
        media = r.media_type if r.clip is not None else None
        return self.processor.make_sample(r.turns, r.clip, media, str(r.uid), memory=getattr(r, "visual", None))  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ text answers
    @torch.no_grad()
    def generate_answers(self, requests: Sequence[Any], *, batch_size: int | None = None) -> list[str]:
        """Greedy answers, one per request, without the prefill; requests with equal prefill run as one batch
        (of at most `batch_size`)."""
        answers: list[str] = [""] * len(requests)
        for prefill, chunk in self._batches(requests, batch_size):
            batch = self._request_batch(requests, chunk, prefill)
            max_new = max(int(requests[i].max_new_tokens) for i in chunk)
            stops = sorted({s for i in chunk for s in getattr(requests[i], "stop", ())})
            extra: dict[str, Any] = {}
            if stops:
                extra["stopping_criteria"] = StoppingCriteriaList([FirstLineStop(self.processor.tokenizer, stops)])  # type: ignore[attr-defined]
            texts = self.generate(batch, max_new_tokens=max_new, **extra)  # type: ignore[attr-defined]
            for i, text in zip(chunk, texts):
                answers[i] = text
        return answers

    # ------------------------------------------------------------------ option scores
    @torch.no_grad()
    def score_options(self, requests: Sequence[Any], *, share_prefix: bool = True,
                      batch_size: int | None = None) -> list[list[float]]:
        """Per request, the summed log-probability of each continuation's tokens after prompt + prefill.

        Continuations are tokenized on their own (no special tokens) and appended to the prompt's tokens, so
        every option is scored against the same prompt tokens. Requests with equal prefill are scored as one
        batch (of at most `batch_size`): their prompts left-padded into one prefix forward, then every option
        of every request in one forward over the cached prefixes.
        """
        out: list[list[float]] = [[] for _ in requests]
        tokenizer = self.processor.tokenizer  # type: ignore[attr-defined]
        score = self._score_with_cache if share_prefix else self._score_recompute
        for prefill, chunk in self._batches(requests, batch_size):
            embeds, attention, _ = self.embed(self._request_batch(requests, chunk, prefill))  # type: ignore[attr-defined]  # [B, S, D]
            conts = [[tokenizer(c, add_special_tokens=False)["input_ids"] for c in requests[i].continuations]
                     for i in chunk]
            for i, scores in zip(chunk, score(embeds, attention, conts)):
                out[i] = scores
        return out

    def _continuation_ids(self, conts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded continuation ids [R, L] and their mask [R, L]."""
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
    def _option_rows(conts: list[list[list[int]]], device: torch.device) -> tuple[torch.Tensor, list[list[int]]]:
        """The prompt row of every option, flattened over prompts ([R]), and the options in that order."""
        rows = torch.tensor([b for b, options in enumerate(conts) for _ in options], dtype=torch.long, device=device)
        return rows, [c for options in conts for c in options]

    @staticmethod
    def _gather(first_logp: torch.Tensor, rest_logp: torch.Tensor, conts: list[list[list[int]]]) -> list[list[float]]:
        """Sums of token log-probs per prompt and option: an option's first token from its row of first_logp [R, V]
        (the prompt's last position), the rest from rest_logp [R, L, V]; rows run over prompts, then options.

        Summed as Python floats (float64, on any device), so sums that differ by less than float32's resolution
        are no tie.
        """
        scores: list[list[float]] = []
        r = 0
        for options in conts:
            row_scores = []
            for c in options:
                picked = [float(first_logp[r, c[0]])] if c else []
                if len(c) > 1:
                    nxt = torch.as_tensor(c[1:], device=rest_logp.device)
                    picked += rest_logp[r, torch.arange(len(c) - 1, device=rest_logp.device), nxt].tolist()
                row_scores.append(math.fsum(picked))
                r += 1
            scores.append(row_scores)
        return scores

    def _score_with_cache(self, embeds: torch.Tensor, attention: torch.Tensor,
                          conts: list[list[list[int]]]) -> list[list[float]]:
        """Prompts [B, S, D] (left-padded, `attention` [B, S]) and per prompt its options' token ids."""
        # logits only at the last prompt position: the rest of the prompt is never scored
        logits, cache = self.prefill(embeds, attention)  # type: ignore[attr-defined]  # [B, 1, V]
        rows, flat = self._option_rows(conts, embeds.device)  # [R]
        first_logp = F.log_softmax(logits[:, -1].float(), dim=-1)[rows]  # [R, V]
        if all(len(c) <= 1 for c in flat):
            return self._gather(first_logp, first_logp.new_zeros(len(flat), 1, 1), conts)
        cache.batch_select_indices(rows)  # [B, ...] -> [R, ...] per layer, in place
        ids, mask = self._continuation_ids(flat, embeds.device)  # [R, L]
        full_mask = torch.cat([attention[rows], mask], dim=1)  # [R, S + L]
        cont_embeds = self.llm.get_input_embeddings()(ids)  # type: ignore[attr-defined]  # [R, L, D]
        logits = self.extend(cache, cont_embeds, full_mask, logits_to_keep=0)  # type: ignore[attr-defined]
        rest_logp = F.log_softmax(logits.float(), dim=-1)  # [R, L, V]; position j predicts token j + 1
        return self._gather(first_logp, rest_logp, conts)

    def _score_recompute(self, embeds: torch.Tensor, attention: torch.Tensor,
                         conts: list[list[list[int]]]) -> list[list[float]]:
        """Reference: each option appended to its prompt and run in one full forward, no cache."""
        rows, flat = self._option_rows(conts, embeds.device)
        ids, mask = self._continuation_ids(flat, embeds.device)  # [R, L]
        cont_embeds = self.llm.get_input_embeddings()(ids).to(embeds.dtype)  # type: ignore[attr-defined]  # [R, L, D]
        full = torch.cat([embeds[rows], cont_embeds], dim=1)  # [R, S + L, D]
        full_mask = torch.cat([attention[rows], mask], dim=1)
        keep = ids.shape[1] + 1  # the prompt's last position and the options'
        logits = self.llm(inputs_embeds=full, attention_mask=full_mask, use_cache=False,  # type: ignore[attr-defined]
                          logits_to_keep=keep).logits.float()
        logp = F.log_softmax(logits, dim=-1)  # [R, L + 1, V]
        return self._gather(logp[:, 0], logp[:, 1:], conts)
