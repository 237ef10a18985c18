"""VideoLLM's side of the evaluation interface: answer requests in text, or score given continuations.

`ScoringMixin` is a base class of `VideoLLM`. Its two methods take request objects by duck typing (the
dataclasses live in `evals.interface`, which `vlm` never imports); a request needs the attributes

    uid: str, clip: vlm.video.Clip | None, turns: list[Turn], prefill: str, media_type: str
    + max_new_tokens: int, stop: tuple[str, ...]       (generate_answers)
    + continuations: list[str]                          (score_options)

Option scoring shares the prompt: the start that a batch's prompts share (one clip's video, asked several
questions) is computed once. With an LLM that takes a custom attention mask (sdpa, eager), that start, the rest of
each prompt and every continuation run as one row under a prefix-tree mask (`_score_tree`); otherwise the rest of
each prompt extends a KV cache, each prompt's row is repeated once per continuation, and only the continuation
tokens extend it (`_score_with_cache`). `share_prefix=False` recomputes every continuation from scratch (the
reference the tests compare against). `answer_losses` gives each sample's answer loss, the start a clip's samples
share computed once (visual reliance).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from transformers import StoppingCriteria, StoppingCriteriaList

from vlm.llm.packing import SEGMENTS, attention_limit

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
        score = self._score_recompute
        if share_prefix:
            score = self._score_tree if self._takes_tree_mask() else self._score_with_cache
        for prefill, chunk in self._batches(requests, batch_size):
            embeds, attention, _ = self.embed(self._request_batch(requests, chunk, prefill))  # type: ignore[attr-defined]  # [B, S, D]
            conts = [[tokenizer(c, add_special_tokens=False)["input_ids"] for c in requests[i].continuations]
                     for i in chunk]
            for i, scores in zip(chunk, score(embeds, attention, conts)):
                out[i] = scores
        return out

    def _takes_tree_mask(self) -> bool:
        """Whether the LLM attends under a custom 4D mask as given (sdpa and eager; not flash attention, sliding
        windows or soft-capped attention)."""
        llm = self.llm  # type: ignore[attr-defined]
        return llm.config._attn_implementation in ("sdpa", "eager", SEGMENTS) and attention_limit(llm) is None

    # ------------------------------------------------------------------ answer losses
    @torch.no_grad()
    def answer_losses(self, batch: Any) -> list[float]:
        """Per sample of a training batch (labels on the answers), the mean loss of its answer tokens: what the
        causal-LM objective gives for the sample alone (nan without answer tokens). The start the samples share
        before their first answer (one clip's questions share the system prompt and the video) runs once into a
        KV cache; every sample's rest extends it (up to its last answer token), and the LM head runs only where
        an answer token is predicted. (One row under a prefix-tree mask, as `_score_tree` does, measured 1.04x
        faster on the quickstart's reliance: the rests are most of the work.)"""
        embeds, attention, labels = self.embed(batch)  # type: ignore[attr-defined]  # [B, S, D], [B, S], [B, S]
        real = attention.bool()
        return self._answer_losses([(embeds[b][real[b]], labels[b][real[b]]) for b in range(embeds.shape[0])])

    def _answer_losses(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
        """`answer_losses` of rows (embeddings [S_i, D], labels [S_i]) without padding, grouped by the start they
        share before their first answer (`_share_groups`; a question asked before the video starts a group of its
        own); each group's start is computed once."""
        caps = [max(int(lab.ge(0).nonzero()[0]) if bool(lab.ge(0).any()) else len(lab), 1) for _, lab in rows]
        group_of, starts = self._share_groups([e for e, _ in rows], caps)  # token 0 is never predicted: caps >= 1
        groups = [[r for r, g in enumerate(group_of) if g == k] for k in range(len(starts))]
        losses = [math.nan] * len(rows)
        for members, k in zip(groups, starts):
            last, cache = self.prefill(rows[members[0]][0][None, :k])  # type: ignore[attr-defined]  # [1, 1, V]
            for r in members:  # one at a time after the cached start: no padding
                e, t = rows[r][0], rows[r][1][k:]
                at = t.ge(0).nonzero()[:, 0]  # token k + j is predicted by the rest's position j - 1 (j = 0: `last`)
                if not len(at):
                    continue
                pred = [last[0]] if int(at[0]) == 0 else []
                later = at[at > 0] - 1
                if len(later):
                    n = int(later[-1]) + 1  # the rest up to the last position that predicts an answer token
                    pred.append(self.extend(cache, e[None, k : k + n], logits_to_keep=later)[0])  # type: ignore[attr-defined]
                    cache.crop(-n)  # back to the shared start
                losses[r] = float(F.cross_entropy(torch.cat(pred).float(), t[at]))
        return losses

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

    @staticmethod
    def _prefix_plan(embeds: torch.Tensor, attention: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
        """For left-padded prompts [B, S, D]: each row's real length, its group, and per group the length of the
        start all its rows share. A row joins the first group whose first row shares at least half of the shorter
        prompt with it (`_share_groups`). The grouping only decides what is computed once; every score is the same
        either way."""
        lengths = [int(n) for n in attention.sum(1)]
        if any(not bool(attention[i, attention.shape[1] - n:].all()) for i, n in enumerate(lengths)):
            raise ValueError("score_options needs left-padded prompts (build them with build_batch(generation=True))")
        s = embeds.shape[1]
        group_of, shared = ScoringMixin._share_groups([embeds[b, s - n:] for b, n in enumerate(lengths)], lengths)
        return lengths, group_of, shared

    @staticmethod
    def _share_groups(rows: list[torch.Tensor], caps: list[int]) -> tuple[list[int], list[int]]:
        """Rows (embeddings [n_i, D]) grouped by the start they share, looked for in each row's first caps[i]
        positions: each row's group, and per group the length of the start all its rows share. A row joins the
        first group whose first row shares at least half of the shorter span with it (one clip's questions share
        the system prompt and the video); the grouping only decides what is computed once."""
        leaders: list[int] = []
        shared: list[int] = []
        group_of: list[int] = []
        for b, n in enumerate(caps):
            for g, first in enumerate(leaders):
                m = min(n, caps[first])
                same = (rows[b][:m] == rows[first][:m]).all(-1)
                common = m if bool(same.all()) else int((~same).nonzero()[0])
                if 2 * common >= m:
                    group_of.append(g)
                    shared[g] = min(shared[g], common)
                    break
            else:
                group_of.append(len(leaders))
                leaders.append(b)
                shared.append(n)
        return group_of, shared

    def _score_with_cache(self, embeds: torch.Tensor, attention: torch.Tensor,
                          conts: list[list[list[int]]]) -> list[list[float]]:
        """Prompts [B, S, D] (left-padded, `attention` [B, S]) and per prompt its options' token ids.

        Three forwards at most, each position once: the start each group of prompts shares (`_prefix_plan`; a
        clip's questions share its video), the rest of every prompt after its group's cached start, then every
        option of every prompt after its prompt. Padding sits between the parts and is masked, and positions are
        passed explicitly, so each row sees exactly the positions it would see alone.
        """
        b, s, d = embeds.shape
        device = embeds.device
        lengths, group_of, shared = self._prefix_plan(embeds, attention)
        width = max(shared)
        starts = embeds.new_zeros(len(shared), width, d)
        start_mask = attention.new_zeros(len(shared), width)
        start_pos = torch.zeros(len(shared), width, dtype=torch.long, device=device)
        for g, k in enumerate(shared):
            i = group_of.index(g)
            starts[g, width - k:] = embeds[i, s - lengths[i] : s - lengths[i] + k]
            start_mask[g, width - k:] = 1
            start_pos[g, width - k:] = torch.arange(k, device=device)
        logits, cache = self.prefill(starts, start_mask, position_ids=start_pos)  # type: ignore[attr-defined]  # [G, 1, V]
        group = torch.tensor(group_of, dtype=torch.long, device=device)  # [B]
        if group_of != list(range(b)):
            cache.batch_select_indices(group)  # [G, ...] -> [B, ...] per layer, in place
        last, mask = logits[group, -1], start_mask[group]  # [B, V], [B, width]
        rest = [n - shared[g] for n, g in zip(lengths, group_of)]  # each prompt's positions after its group's start
        if max(rest) > 0:
            w = max(rest)
            cols = torch.arange(w, device=device)
            after = torch.tensor(rest, device=device)[:, None]  # [B, 1]
            rest_mask = (cols >= w - after).to(attention.dtype)  # [B, w]: the last `rest` positions are the row's
            start = torch.tensor([shared[g] for g in group_of], device=device)[:, None]  # [B, 1]
            rest_pos = (start + cols - (w - after)).clamp(min=0)
            mask = torch.cat([mask, rest_mask], dim=1)
            rest_logits = self.extend(cache, embeds[:, s - w:], mask, position_ids=rest_pos)  # type: ignore[attr-defined]
            last = torch.where(after > 0, rest_logits[:, -1], last)
        rows, flat = self._option_rows(conts, device)  # [R]
        first_logp = F.log_softmax(last.float(), dim=-1)[rows]  # [R, V]
        if all(len(c) <= 1 for c in flat):
            return self._gather(first_logp, first_logp.new_zeros(len(flat), 1, 1), conts)
        cache.batch_select_indices(rows)  # [B, ...] -> [R, ...] per layer, in place
        ids, cont_mask = self._continuation_ids(flat, device)  # [R, L]
        full_mask = torch.cat([mask[rows], cont_mask], dim=1)  # [R, past + L]
        cont_pos = torch.tensor(lengths, device=device)[rows][:, None] + torch.arange(ids.shape[1], device=device)
        cont_embeds = self.llm.get_input_embeddings()(ids)  # type: ignore[attr-defined]  # [R, L, D]
        logits = self.extend(cache, cont_embeds, full_mask, logits_to_keep=0, position_ids=cont_pos)  # type: ignore[attr-defined]
        rest_logp = F.log_softmax(logits.float(), dim=-1)  # [R, L, V]; position j predicts token j + 1
        return self._gather(first_logp, rest_logp, conts)

    def _tree_logits(self, parts: list[torch.Tensor], parent: list[int], first: list[int],
                     wanted: list[int]) -> torch.Tensor:
        """One forward of a row of `parts` (each [n_p, D], at positions first[p] on; part p follows its parent part
        parent[p], -1 for the first) under a prefix-tree mask: each part attends to its ancestors and causally
        within itself, so it sees what it would see after its ancestors alone. Logits [len(wanted), V] at the
        row's indices `wanted`."""
        device, dtype = parts[0].device, parts[0].dtype
        ancestors = torch.zeros(len(parts), len(parts), dtype=torch.bool, device=device)
        for p, up in enumerate(parent):
            if up >= 0:
                ancestors[p] = ancestors[up]
            ancestors[p, p] = True
        part_of = torch.repeat_interleave(torch.arange(len(parts), device=device),
                                          torch.tensor([len(x) for x in parts], device=device))
        idx = torch.arange(len(part_of), device=device)
        allowed = ancestors[part_of][:, part_of] & ((part_of[:, None] != part_of[None]) | (idx[None] <= idx[:, None]))
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        pos = torch.cat([torch.arange(f, f + len(x), device=device) for f, x in zip(first, parts)])
        return self.llm(inputs_embeds=torch.cat(parts)[None], attention_mask=mask[None, None],  # type: ignore[attr-defined]
                        position_ids=pos[None], use_cache=False,
                        logits_to_keep=torch.tensor(wanted, device=device)).logits[0]

    def _score_tree(self, embeds: torch.Tensor, attention: torch.Tensor,
                    conts: list[list[list[int]]]) -> list[list[float]]:
        """Prompts [B, S, D] (left-padded, `attention` [B, S]) and per prompt its options' token ids, in one forward
        per group of prompts that share a start (`_prefix_plan`: a clip's questions share its video). The row holds
        the start, each prompt's rest and each of its options (`_tree_logits`: start <- prompt's rest <- option),
        so each option sees exactly its prompt, as alone. Nothing is recomputed and no KV cache is copied."""
        b, s, d = embeds.shape
        lengths, group_of, shared = self._prefix_plan(embeds, attention)
        table = self.llm.get_input_embeddings()  # type: ignore[attr-defined]
        scores: list[list[float]] = [[] for _ in range(b)]
        for g, k in enumerate(shared):
            members = [i for i in range(b) if group_of[i] == g]
            lead = members[0]
            parts, parent, first = [embeds[lead, s - lengths[lead] : s - lengths[lead] + k]], [-1], [0]
            end = k  # the row's length so far
            last: dict[int, int] = {}  # prompt -> where its last token sits in the row
            starts: dict[tuple[int, int], int] = {}  # (prompt, option) -> where the option's first token sits
            for i in members:
                part, n = 0, lengths[i] - k
                if n:
                    part = len(parts)
                    parts.append(embeds[i, s - n :])
                    parent.append(0)
                    first.append(k)
                    end += n
                last[i] = end - 1 if n else k - 1  # a prompt that is all start (asked twice) ends with the start
                for j, c in enumerate(conts[i]):
                    if c:
                        starts[(i, j)] = end
                        parts.append(table(torch.as_tensor(c, device=embeds.device)).to(embeds.dtype))
                        parent.append(part)
                        first.append(lengths[i])
                        end += len(c)
            wanted = sorted({last[i] for i in members} | {at + m for (i, j), at in starts.items()
                                                           for m in range(len(conts[i][j]) - 1)})
            logp = F.log_softmax(self._tree_logits(parts, parent, first, wanted).float(), dim=-1)  # [K, V]
            row = {p: r for r, p in enumerate(wanted)}
            for i in members:  # an option's first token after its prompt's last position, the rest after its own
                scores[i] = [math.fsum([float(logp[row[last[i]], c[0]])] + [float(logp[row[starts[(i, j)] + m], c[m + 1]])
                                                                        for m in range(len(c) - 1)]) if c else 0.0
                             for j, c in enumerate(conts[i])]
        return scores

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
