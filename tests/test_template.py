"""Chat template and label masking: labels are exactly each answer and its end-of-turn marker, every template/tokenizer
mismatch is an error naming the sample, and training skips such a sample, counts it and says which one it was."""

from __future__ import annotations

import copy
import json

import pytest
from tokenizers import normalizers, processors
from transformers import AutoTokenizer

from tests.conftest import TINY_LLM
from tests.train_helpers import make_tiny_data, tiny_recipe
from vlm.data.conversation import Turn
from vlm.llm.load import load_llm, packaged_smollm2_folder
from vlm.llm.template import IGNORE_INDEX, VISUAL_TOKEN, ChatTemplate, TemplateMismatchError
from vlm.train.engine import run_recipe
from vlm.train.metrics import read_jsonl
from vlm.train.recipe import parse_recipe

V = VISUAL_TOKEN
SLOT = [V, V, V]
# SmolLM2's template adds its own system turn when the conversation has none
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
ONE_TURN = [Turn("user", "<video>\nWhat happens?"), Turn("assistant", "A red circle moves left.")]
TWO_TURNS = [Turn("system", "Be brief."), Turn("user", "<video>\nWhat happens?"), Turn("assistant", "Left."),
             Turn("user", "And then?"), Turn("assistant", "It stops.")]
# a plain-text template: no special tokens, the end of turn is a blank line
PLAIN = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n\n{% endfor %}"
         "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@pytest.fixture(scope="module")
def tok():
    """The tokenizer of the tiny test LLM (the packaged SmolLM2's, ChatML template)."""
    return load_llm(**copy.deepcopy(TINY_LLM))[1]


def fresh_tokenizer(chat_template: str | None = None):
    """A tokenizer of its own (to change its template or normalizer without touching the shared one)."""
    t = AutoTokenizer.from_pretrained(str(packaged_smollm2_folder()))
    if chat_template is not None:
        t.chat_template = chat_template
    return t


def expected(tok, *segments) -> tuple[list[int], list[int]]:
    """(ids, labels) from hand-written segments: (text, labelled) pairs and visual slots (lists of ids)."""
    ids: list[int] = []
    labels: list[int] = []
    for seg in segments:
        if isinstance(seg, list):
            ids += seg
            labels += [IGNORE_INDEX] * len(seg)
            continue
        text, labelled = seg
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if labelled else [IGNORE_INDEX] * len(part)
    return ids, labels


def label_runs(tok, labels: list[int]) -> list[str]:
    """The decoded text of each contiguous run of labelled positions."""
    runs: list[list[int]] = []
    prev = IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX:
            if prev == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        prev = label
    return [tok.decode(r) for r in runs]


# ---------------------------------------------------------------- labels
def test_single_turn_labels_are_the_answer_and_its_end_of_turn(tok):
    enc = ChatTemplate(tok).encode(ONE_TURN, "video", SLOT, where="s0")
    ids, labels = expected(tok, (SMOL_SYSTEM + "<|im_start|>user\n", False), SLOT,
                           ("\nWhat happens?<|im_end|>\n<|im_start|>assistant\n", False),
                           ("A red circle moves left.<|im_end|>\n", True))
    assert enc.input_ids == ids and enc.labels == labels and not enc.truncated
    start = ids.index(V)
    assert enc.input_ids[start:start + 3] == SLOT and enc.input_ids.count(V) == 3
    first = next(j for j, x in enumerate(enc.labels) if x != IGNORE_INDEX)
    assert tok.convert_ids_to_tokens(enc.input_ids[first - 4:first]) == ["<|im_start|>", "ass", "istant", "Ċ"]
    assert tok.convert_ids_to_tokens(enc.labels[first:]) == ["A", "Ġred", "Ġcircle", "Ġmoves", "Ġleft", ".", "<|im_end|>", "Ċ"]
    assert label_runs(tok, enc.labels) == ["A red circle moves left.<|im_end|>\n"]


def test_multi_turn_labels_every_answer_and_nothing_of_the_other_turns(tok):
    enc = ChatTemplate(tok).encode(TWO_TURNS, "video", SLOT, where="s1")
    ids, labels = expected(tok, ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n", False), SLOT,
                           ("\nWhat happens?<|im_end|>\n<|im_start|>assistant\n", False), ("Left.<|im_end|>\n", True),
                           ("<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n", False),
                           ("It stops.<|im_end|>\n", True))
    assert enc.input_ids == ids and enc.labels == labels  # the explicit system turn replaces SmolLM's default one
    assert label_runs(tok, enc.labels) == ["Left.<|im_end|>\n", "It stops.<|im_end|>\n"]


def test_system_prompt_is_inserted_once_and_never_labelled(tok):
    template = ChatTemplate(tok, system_prompt="Answer in one word.")
    enc = template.encode(ONE_TURN, "video", SLOT, where="s2")
    ids, labels = expected(tok, ("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\n", False), SLOT,
                           ("\nWhat happens?<|im_end|>\n<|im_start|>assistant\n", False),
                           ("A red circle moves left.<|im_end|>\n", True))
    assert enc.input_ids == ids and enc.labels == labels
    # a conversation with its own system turn keeps it, and the configured prompt is not added
    assert template.encode(TWO_TURNS, "video", SLOT).input_ids == ChatTemplate(tok).encode(TWO_TURNS, "video", SLOT).input_ids
    # an empty conversation still gets the system prompt
    assert template.render_prompt([]) == "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>assistant\n"


def test_plain_text_template_labels_the_answer_and_its_blank_line():
    tok = fresh_tokenizer(PLAIN)
    enc = ChatTemplate(tok).encode(TWO_TURNS[1:], "video", SLOT, where="s3")
    ids, _ = expected(tok, ("USER: ", False), SLOT,
                      ("\nWhat happens?\n\nASSISTANT: Left.\n\nUSER: And then?\n\nASSISTANT: It stops.\n\n", False))
    assert enc.input_ids == ids  # (a blank line is two tokens before a word, one at the end of the text)
    after = ids.index(V) + len(SLOT)
    left = after + tok.convert_ids_to_tokens(ids[after:]).index("ĠLeft")
    answers = list(range(left, left + 4)) + list(range(len(ids) - 4, len(ids)))
    assert enc.labels == [ids[j] if j in answers else IGNORE_INDEX for j in range(len(ids))]
    assert tok.convert_ids_to_tokens([ids[j] for j in answers]) == ["ĠLeft", ".", "Ċ", "Ċ", "ĠIt", "Ġstops", ".", "ĊĊ"]
    assert label_runs(tok, enc.labels) == [" Left.\n\n", " It stops.\n\n"]


def test_image_and_text_only_samples(tok):
    image = [Turn("user", "What is this? <image>"), Turn("assistant", "A square.")]
    enc = ChatTemplate(tok).encode(image, "image", [V], where="img")
    ids, labels = expected(tok, (SMOL_SYSTEM + "<|im_start|>user\nWhat is this? ", False), [V],
                           ("<|im_end|>\n<|im_start|>assistant\n", False), ("A square.<|im_end|>\n", True))
    assert enc.input_ids == ids and enc.labels == labels
    text = [Turn("user", "Hi"), Turn("assistant", "Hello.")]
    enc = ChatTemplate(tok).encode(text, None, where="txt")
    ids, labels = expected(tok, (SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
                           ("Hello.<|im_end|>\n", True))
    assert enc.input_ids == ids and enc.labels == labels


def test_a_tokenizer_that_adds_a_bos_adds_none_to_the_rendered_text():
    """The template renders any BOS itself (Llama's does); tokenizing around the visual slot must not add more."""
    tok = fresh_tokenizer()
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                         special_tokens=[("<|endoftext|>", bos)])
    assert tok("Hi")["input_ids"][0] == bos  # the tokenizer does add one by default
    template = ChatTemplate(tok)
    enc = template.encode(ONE_TURN, "video", SLOT)
    ids, labels = expected(tok, (SMOL_SYSTEM + "<|im_start|>user\n", False), SLOT,
                           ("\nWhat happens?<|im_end|>\n<|im_start|>assistant\n", False),
                           ("A red circle moves left.<|im_end|>\n", True))
    assert (enc.input_ids, enc.labels) == (ids, labels) and bos not in ids
    assert template.encode_prompt(ONE_TURN[:1], "video", SLOT) == ids[:ids.index(V) + 3] + expected(
        tok, ("\nWhat happens?<|im_end|>\n<|im_start|>assistant\n", False))[0]


def test_a_conversation_without_answers_has_no_labels_and_is_no_error(tok):
    enc = ChatTemplate(tok).encode(ONE_TURN[:1], "video", SLOT, where="q")
    assert enc.input_ids == expected(tok, (SMOL_SYSTEM + "<|im_start|>user\n", False), SLOT,
                                     ("\nWhat happens?<|im_end|>\n", False))[0]
    assert enc.labels == [IGNORE_INDEX] * len(enc.input_ids)


def test_generation_prompt_ends_with_the_assistant_header_and_prefill(tok):
    template = ChatTemplate(tok)
    turns = ONE_TURN[:1]
    assert template.render_prompt(turns, "Answer:") == (SMOL_SYSTEM + "<|im_start|>user\n<video>\nWhat happens?<|im_end|>\n"
                                                        "<|im_start|>assistant\nAnswer:")
    ids = template.encode_prompt(turns, "video", SLOT, prefill="Answer:", where="g")
    assert ids == expected(tok, (SMOL_SYSTEM + "<|im_start|>user\n", False), SLOT,
                           ("\nWhat happens?<|im_end|>\n<|im_start|>assistant\nAnswer:", False))[0]
    assert template.encode_prompt(TWO_TURNS[:4], "video", SLOT) == \
        template.encode(TWO_TURNS[:3], "video", SLOT).input_ids + expected(
            tok, ("<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n", False))[0]


def test_a_tokenizer_without_chat_template_is_refused():
    tok = fresh_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="^the tokenizer has no chat template; set tokenizer.chat_template first$"):
        ChatTemplate(tok)
    with pytest.raises(ValueError, match="^the tokenizer has no chat template"):
        ChatTemplate(object())  # not even the attribute: the same clear error, not an AttributeError


# ---------------------------------------------------------------- mismatches: errors naming the sample
@pytest.mark.parametrize("text,found", [("What happens?", 0), ("<video> then <video>?", 2), ("<image> What?", 0)])
def test_wrong_placeholder_count_names_the_sample(tok, text, found):
    turns = [Turn("user", text), Turn("assistant", "Left.")]
    message = f"^clip7: expected exactly one <video> in the rendered conversation, found {found}$"
    with pytest.raises(TemplateMismatchError, match=message):
        ChatTemplate(tok).encode(turns, "video", SLOT, where="clip7")
    with pytest.raises(TemplateMismatchError, match=message):
        ChatTemplate(tok).encode_prompt(turns[:1], "video", SLOT, where="clip7")


@pytest.mark.parametrize("template,token", [
    # the generation prompt ends with a space that the answer's first word takes into its token
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
     "{% if add_generation_prompt %}assistant: {% endif %}", "ĠLeft"),
    # a turn ends with a space that the next turn's first word takes into its token
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
     "{% if add_generation_prompt %}assistant:{% endif %}", "Ġuser"),
])
def test_a_token_straddling_an_answer_boundary_names_the_sample(template, token):
    with pytest.raises(TemplateMismatchError, match=f"^s3: token '{token}' straddles the boundary of an assistant turn$"):
        ChatTemplate(fresh_tokenizer(template)).encode(TWO_TURNS[1:], "video", SLOT, where="s3")


def test_answer_tokens_that_decode_differently_name_the_sample():
    tok = fresh_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.NFKC()  # the ligature "ﬁ" becomes "fi"
    turns = [Turn("user", "<video>\nHow is it?"), Turn("assistant", "A ﬁne day.")]
    with pytest.raises(TemplateMismatchError) as e:
        ChatTemplate(tok).encode(turns, "video", SLOT, where="s4")
    assert str(e.value) == "s4: assistant tokens decode to 'A fine day.<|im_end|>\\n', expected 'A ﬁne day.<|im_end|>\\n'"


def test_a_placeholder_inside_an_answer_is_a_mismatch(tok):
    turns = [Turn("user", "Look."), Turn("assistant", "It is <video>.")]
    with pytest.raises(TemplateMismatchError) as e:
        ChatTemplate(tok).encode(turns, "video", SLOT, where="s5")
    assert str(e.value) == "s5: assistant tokens decode to 'It is .<|im_end|>\\n', expected 'It is <video>.<|im_end|>\\n'"


@pytest.mark.parametrize("template,turn", [
    # the template changes the answer's text
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | lower }}<|im_end|>\n{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", 1),
    # the generation prompt is not how the template renders an assistant turn
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>bot\n{% endif %}", 1),
    # the last message is rendered differently from the same message followed by more turns
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
     "{% if not add_generation_prompt %}<|endoftext|>{% endif %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", 1),
    # ... which a one-answer conversation does not notice, but the second answer of this one does
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
     "{% if add_generation_prompt and messages | length > 2 %}<|im_start|>Assistant\n{% endif %}"
     "{% if add_generation_prompt and messages | length <= 2 %}<|im_start|>assistant\n{% endif %}", 3),
])
def test_an_unstable_template_names_the_sample_and_the_turn(template, turn):
    with pytest.raises(TemplateMismatchError, match=f"^s6: the chat template does not render assistant turn {turn} as a stable prefix$"):
        ChatTemplate(fresh_tokenizer(template)).encode(TWO_TURNS[1:], "video", SLOT, where="s6")


# ---------------------------------------------------------------- truncation
def test_truncation_boundaries(tok):
    template = ChatTemplate(tok)
    full = template.encode(TWO_TURNS, "video", SLOT)
    n = len(full.input_ids)
    first = next(j for j, x in enumerate(full.labels) if x != IGNORE_INDEX)
    last_visual = n - 1 - full.input_ids[::-1].index(V)
    assert template.encode(TWO_TURNS, "video", SLOT, max_length=n) == full  # fits exactly: not truncated
    cut = template.encode(TWO_TURNS, "video", SLOT, max_length=n - 1)
    assert (cut.input_ids, cut.labels, cut.truncated) == (full.input_ids[:-1], full.labels[:-1], True)
    one = template.encode(TWO_TURNS, "video", SLOT, max_length=first + 1)  # one answer token is left
    assert one.labels == [IGNORE_INDEX] * first + [full.input_ids[first]] and one.truncated
    with pytest.raises(TemplateMismatchError, match=rf"^s8: no assistant token left to learn from \(max_length={first}\)$"):
        template.encode(TWO_TURNS, "video", SLOT, max_length=first, where="s8")
    with pytest.raises(TemplateMismatchError, match=rf"^s8: no assistant token left to learn from \(max_length={last_visual + 1}\)$"):
        template.encode(TWO_TURNS, "video", SLOT, max_length=last_visual + 1, where="s8")  # cut right after the visual tokens
    with pytest.raises(TemplateMismatchError, match=rf"^s8: {n} tokens exceed max_length={last_visual} inside the visual "
                                                    r"tokens; use fewer frames or a larger max_length$"):
        template.encode(TWO_TURNS, "video", SLOT, max_length=last_visual, where="s8")
    assert full.truncated is False  # a bool in the record, not a falsy stand-in
    # without `where`, errors name the sample generically
    with pytest.raises(TemplateMismatchError, match=r"^sample: no assistant token left"):
        template.encode(TWO_TURNS, "video", SLOT, max_length=first)
    with pytest.raises(TemplateMismatchError, match=r"^sample: expected exactly one <image> in the rendered conversation, found 0$"):
        template.encode_prompt(TWO_TURNS[:1], "image", SLOT)


# ---------------------------------------------------------------- training skips the sample
def test_training_skips_counts_and_names_a_sample_whose_answers_are_truncated_away(tmp_path):
    data = make_tiny_data(tmp_path / "data", n=3, bad=False)
    records = json.loads(data["captions"].read_text())
    records.append({"id": "toolong", "video": "videos/v0.mp4", "conversations": [
        {"from": "human", "value": "<video>\n" + "Describe every frame of the video in detail. " * 40},
        {"from": "gpt", "value": "A red square moves to the right."}]})
    data["captions"].write_text(json.dumps(records))
    raw = tiny_recipe(data, tmp_path / "run", max_steps=2)  # 4 samples, batches of 2: one epoch visits every sample
    raw["stages"] = raw["stages"][:1]
    run_recipe(parse_recipe(raw))
    stage = tmp_path / "run" / "1-align"
    summary = json.loads((stage / "stage.json").read_text())
    assert summary["skipped_samples"] == 1 and summary["malformed_records"] == 0
    assert (stage / "skipped.txt").read_text().splitlines() == [
        f"{data['captions']}[3] (id toolong): no assistant token left to learn from (max_length=256)"]
    assert [r["skipped"] for r in read_jsonl(stage / "metrics.jsonl")][-1] == 1
