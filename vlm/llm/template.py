"""Chat-template rendering with a media placeholder, and labels on assistant tokens only.

A conversation is rendered with the tokenizer's own chat template. The placeholder (`<video>` / `<image>`)
is cut out of the rendered text and replaced by the visual slot: a list of token ids in which
`VISUAL_TOKEN` (a negative id no tokenizer produces) marks each position the connector's tokens fill.
Labels are the token ids of every assistant message and its end-of-turn marker, -100 elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from vlm.data.conversation import PLACEHOLDERS, TemplateMismatchError, Turn

VISUAL_TOKEN = -200  # a visual-token position in input_ids (LLaVA's convention)
IGNORE_INDEX = -100


@dataclass
class EncodedConversation:
    input_ids: list[int]  # text ids with VISUAL_TOKEN at the visual positions
    labels: list[int]  # IGNORE_INDEX except on assistant tokens
    truncated: bool = False


class ChatTemplate:
    """Renders conversations with `tokenizer.apply_chat_template` and tokenizes them around the visual slot."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template first")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt

    def _messages(self, turns: Sequence[Turn]) -> list[dict[str, str]]:
        msgs = [{"role": t.role, "content": t.text} for t in turns]
        if self.system_prompt is not None and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def _render(self, msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    def render_prompt(self, turns: Sequence[Turn], prefill: str = "") -> str:
        """The text the model continues: the conversation, the assistant header, and an optional prefill."""
        return self._render(self._messages(turns), True) + prefill

    def _tokenize_pieces(self, text: str, placeholder: str | None, visual_slot: Sequence[int], where: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` with the placeholder replaced by `visual_slot`, and each id's char span."""
        if placeholder is None:
            pieces = [text]
        else:
            pieces = text.split(placeholder)
            if len(pieces) != 2:
                raise TemplateMismatchError(f"{where}: expected exactly one {placeholder} in the rendered conversation, found {len(pieces) - 1}")
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        offset = 0
        for i, piece in enumerate(pieces):
            enc = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
            ids += enc["input_ids"]
            spans += [(offset + a, offset + b) for a, b in enc["offset_mapping"]]
            offset += len(piece)
            if i == 0 and len(pieces) == 2:
                ids += list(visual_slot)
                spans += [(offset, offset)] * len(visual_slot)
                offset += len(placeholder)  # type: ignore[arg-type]
        return ids, spans

    def encode(self, turns: Sequence[Turn], media_type: str | None, visual_slot: Sequence[int] = (),
               max_length: int | None = None, where: str = "sample") -> EncodedConversation:
        """Token ids and labels of a whole conversation (training). Raises TemplateMismatchError naming `where`."""
        msgs = self._messages(turns)
        text = self._render(msgs, False)
        # Character spans of each assistant message (content + end-of-turn marker): the rendering must be
        # prefix-stable, i.e. the conversation up to a turn renders as a prefix of the whole.
        targets: list[tuple[int, int]] = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self._render(msgs[:i], True)
            upto = self._render(msgs[: i + 1], False)
            if not text.startswith(upto) or not upto.startswith(before) or m["content"] not in upto[len(before):]:
                raise TemplateMismatchError(f"{where}: the chat template does not render assistant turn {i} as a stable prefix")
            targets.append((len(before), len(upto)))
        placeholder = PLACEHOLDERS.get(media_type) if media_type else None
        ids, spans = self._tokenize_pieces(text, placeholder, visual_slot, where)
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in targets:
            covered = []
            for j, (a, b) in enumerate(spans):
                if ids[j] == VISUAL_TOKEN or b <= start or a >= end:
                    continue
                if a < start or b > end:
                    raise TemplateMismatchError(
                        f"{where}: token {self.tokenizer.convert_ids_to_tokens(ids[j])!r} straddles the boundary of an assistant turn")
                labels[j] = ids[j]
                covered.append(ids[j])
            target_text = text[start:end]
            if self.tokenizer.decode(covered) != target_text:
                raise TemplateMismatchError(
                    f"{where}: assistant tokens decode to {self.tokenizer.decode(covered)!r}, expected {target_text!r}")
        truncated = False
        if max_length is not None and len(ids) > max_length:
            if VISUAL_TOKEN in ids[max_length:]:
                raise TemplateMismatchError(f"{where}: {len(ids)} tokens exceed max_length={max_length} inside the visual tokens; "
                                            "use fewer frames or a larger max_length")
            ids, labels, truncated = ids[:max_length], labels[:max_length], True
        if targets and all(label == IGNORE_INDEX for label in labels):
            raise TemplateMismatchError(f"{where}: no assistant token left to learn from (max_length={max_length})")
        return EncodedConversation(ids, labels, truncated)

    def encode_prompt(self, turns: Sequence[Turn], media_type: str | None, visual_slot: Sequence[int] = (),
                      prefill: str = "", where: str = "sample") -> list[int]:
        """Token ids of a generation prompt (ends with the assistant header and the optional prefill)."""
        text = self.render_prompt(turns, prefill)
        placeholder = PLACEHOLDERS.get(media_type) if media_type else None
        return self._tokenize_pieces(text, placeholder, visual_slot, where)[0]
