"""Multiple-choice protocol profiles, string by string: the prompts, the recorded settings, the parsers, the score
normalisation and the registry rules (no model, no video)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import evals.profiles as profiles
from evals.profiles import (
    MVBENCH_SYSTEM,
    PROFILES,
    Parsed,
    check_ans,
    cloze_continuations,
    cloze_turns,
    get_profile,
    lmms_eval_extract,
    lmms_eval_question,
    lmms_eval_turns,
    loglik_continuations,
    mvbench_answer_text,
    mvbench_question,
    mvbench_turns,
    normalize_scores,
    parse_lmms_eval,
    parse_mvbench,
    register_profile,
)
from vlm.data.conversation import Turn
from vlm.data.mvbench import MCQItem

ITEM = MCQItem("t", 0, Path("v.mp4"), "What happened?", ["Ate.", "Slept.", "Ran  "], "Slept.", 1)

# the notebook's `system` argument, minus its final "\n" (which `mvbench_turns` puts back before the question)
NOTEBOOK_SYSTEM = ("Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
                   "movement of objects, and the action and pose of persons. Based on your observations, select the "
                   "best option that accurately addresses the question.")


# ---------------------------------------------------------------------- prompts
def test_mvbench_prompt_is_the_notebooks_string():
    assert MVBENCH_SYSTEM == NOTEBOOK_SYSTEM
    question = "Question: What happened?\nOptions:\n(A) Ate.\n(B) Slept.\n(C) Ran"  # trailing whitespace stripped
    assert mvbench_question(ITEM) == question
    system, user = mvbench_turns(ITEM)
    assert (system.role, system.text) == ("system", NOTEBOOK_SYSTEM)
    assert user.role == "user"
    assert user.text == "<video>\n" + NOTEBOOK_SYSTEM + "\n" + question + "\nOnly give the best option."


def test_lmms_eval_prompt_is_the_tasks_string():
    text = "Question:What happened?\nOption:\nA. Ate.\nB. Slept.\nC. Ran  \nOnly give the best option.\n"
    assert lmms_eval_question(ITEM) == text
    turns = lmms_eval_turns(ITEM)
    assert [(t.role, t.text) for t in turns] == [("user", "<video>\n" + text)]  # no system turn of its own


def test_loglik_and_cloze_continuations_and_turns():
    assert loglik_continuations(ITEM) == ["A) Ate.", "B) Slept.", "C) Ran  "]
    assert cloze_continuations(ITEM) == ["Ate.", "Slept.", "Ran  "]
    assert [(t.role, t.text) for t in cloze_turns(ITEM)] == [("user", "<video>\nWhat happened?")]


# ---------------------------------------------------------------------- what each built-in profile is
def test_builtin_profiles_and_their_records():
    assert list(PROFILES) == ["mvbench", "lmms_eval", "loglik", "cloze"]
    example_turns = [{"role": t.role, "text": t.text} for t in mvbench_turns(MCQItem(
        "example", 0, Path("v.mp4"), "<question>", ["<option 1>", "<option 2>"], "<option 1>", 0))]

    mv = get_profile("mvbench").record()
    assert mv["name"] == "mvbench" and mv["mode"] == "generate" and mv["prefill"] == "Best option:("
    assert (mv["max_new_tokens"], mv["greedy"], mv["stop"]) == (100, True, ["\n"])
    assert mv["turns_example"] == example_turns
    assert mv["system_prompt"] == NOTEBOOK_SYSTEM and mv["question_prompt"] == "\nOnly give the best option."
    assert "continuations_example" not in mv and "score_norm" not in mv
    assert mv["source"] == "OpenGVLab/Ask-Anything video_chat2/mvbench.ipynb"

    lm = get_profile("lmms_eval").record()
    assert lm["mode"] == "generate" and lm["prefill"] == ""
    assert (lm["max_new_tokens"], lm["greedy"], lm["stop"]) == (16, True, [])
    assert lm["post_prompt"] == "Only give the best option.\n"
    assert lm["turns_example"] == [{"role": "user", "text": "<video>\nQuestion:<question>\nOption:\nA. <option 1>\n"
                                                             "B. <option 2>\nOnly give the best option.\n"}]

    ll = get_profile("loglik").record()
    assert ll["mode"] == "loglik" and ll["prefill"] == "Best option:(" and ll["turns_example"] == example_turns
    assert ll["continuations_example"] == ["A) <option 1>", "B) <option 2>"] and ll["score_norm"] == "sum"
    assert "max_new_tokens" not in ll and "stop" not in ll

    cz = get_profile("cloze").record()
    assert cz["mode"] == "loglik" and cz["prefill"] == "" and cz["score_norm"] == "chars"
    assert cz["continuations_example"] == ["<option 1>", "<option 2>"]
    assert cz["turns_example"] == [{"role": "user", "text": "<video>\n<question>"}]
    assert get_profile("mvbench").parse is parse_mvbench and get_profile("lmms_eval").parse is parse_lmms_eval
    common = {"name", "mode", "description", "source", "prefill", "turns_example"}
    generate = common | {"max_new_tokens", "greedy", "stop", "parse"}
    assert set(mv) == generate | {"system_prompt", "question_prompt", "answer"}
    assert set(lm) == generate | {"post_prompt"}
    assert set(ll) == set(cz) == common | {"continuations_example", "score_norm", "score"}
    assert cz["description"] == ("cloze formulation: '<video>\\nquestion' (no options, no letters); each option's text "
                                 "scored as the answer by log-likelihood per character; argmax is the answer")
    assert cz["source"] == "OLMES (Gu et al., 2024) cloze formulation; lm-evaluation-harness acc_norm"
    with pytest.raises(KeyError, match="unknown multiple-choice profile 'nope'.*mvbench, lmms_eval, loglik, cloze"):
        get_profile("nope")


def test_record_renders_the_prompt_on_a_fixed_example_item():
    """A profile's prompt may use any field of the item (a per-task prompt, say): the record shows the example item's
    fields as they are, so a stored record says exactly what the prompt looks like."""
    def echo(item: MCQItem) -> list[Turn]:
        return [Turn("user", f"{item.task}|{item.index}|{item.video}|{item.question}|{'/'.join(item.candidates)}|"
                             f"{item.answer}|{item.answer_index}|{item.answer_letter}|{item.uid}")]

    mine = dataclasses.replace(get_profile("cloze"), name="echo", build_turns=echo,
                               continuations=lambda item: [item.uid, item.answer, str(item.video)])
    rec = mine.record()
    assert rec["turns_example"] == [{"role": "user", "text": "example|0|v.mp4|<question>|<option 1>/<option 2>|"
                                                             "<option 1>|0|A|example/0"}]
    assert rec["continuations_example"] == ["example/0", "<option 1>", "v.mp4"]


# ---------------------------------------------------------------------- parsers
def test_check_ans_compares_first_words():
    assert check_ans("(B) Slept.", "(B) Slept.")
    assert check_ans("(b", "(B) x")  # prediction inside the ground truth's first word, case-insensitive
    assert check_ans("(B)Slept", "(B) x")  # the ground truth's first word inside the prediction's
    assert check_ans("(B.", "(B) x")  # dots removed from the prediction
    assert not check_ans("(A) Slept.", "(B) Slept.") and not check_ans("x (B)", "(B) x")  # only the first word
    # words are split at spaces only, as the notebook's `split(' ')` does: a tab or newline joins two words ...
    assert not check_ans("(B\tx", "(B) y") and not check_ans("(c)\nz", "(C)\nx")
    # ... and a leading space makes the first word "", inside every ground truth (Ask-Anything's GitHub issue 227)
    assert check_ans(" x", "(B) y") and check_ans("(D)", " (C) x")


def test_parse_mvbench():
    assert mvbench_answer_text("  B) Slept.\nBecause") == "(B) Slept."
    assert parse_mvbench("B) Slept.\nBecause ...", 2) == Parsed("B", "(B) Slept.")
    assert parse_mvbench("\n\nB", 2) == Parsed("B", "(B")
    assert parse_mvbench("B. Slept", 2).letter == "B"  # "(b." -> "(b"
    assert parse_mvbench("C) x", 3).letter == "C"
    assert parse_mvbench("C) x", 2) == Parsed(None, "(C) x", "check_ans accepts no option")
    assert parse_mvbench("", 4) == Parsed(None, "(", "check_ans accepts 4 options (ambiguous)")
    assert parse_mvbench(")", 3) == Parsed(None, "()", "check_ans accepts no option")


def test_lmms_eval_extract_and_parse():
    assert lmms_eval_extract("B. Slept.") == "B"
    assert lmms_eval_extract(" B.Slept") == "B"  # "X. text" on the stripped answer, before any normalisation
    assert lmms_eval_extract("The answer is (C)") == "C"  # "(" next to a space: dropped
    assert lmms_eval_extract("option(B)") == "B"  # "(" inside a word: a space
    assert lmms_eval_extract("x-b -y") is None  # "-" next to a space somewhere: every "-" dropped ("xb y")
    assert lmms_eval_extract("x-b- y") is None and lmms_eval_extract("x-b-y") == "B"  # else a space ("x b y")
    assert lmms_eval_extract("b,c 1,000") is None  # "1,000" present: every mark dropped ("bc 1000")
    assert lmms_eval_extract("b,c") == "B"  # otherwise a mark inside a word is a space ("b c")
    assert lmms_eval_extract("so it is b.") == "B"  # a sentence-final period is dropped, not spaced
    assert lmms_eval_extract("e") == "E" and lmms_eval_extract("f") is None
    # newlines and tabs become spaces before the punctuation pass: "x-b -y" (every "-" dropped), "b c"
    assert lmms_eval_extract("x-b\n-y") is None and lmms_eval_extract("x-b\t-y") is None
    assert lmms_eval_extract("b\nc") == "B" and lmms_eval_extract("b\tc") == "B"
    assert lmms_eval_extract("bX") is None and lmms_eval_extract("Xb") is None  # only quotes/brackets are stripped
    # lower-cased as lmms-eval does with Python's str.lower: "İ" becomes "i" + a combining dot (not a word character)
    assert "İb".lower() == "i\u0307b" and lmms_eval_extract("İb") == "B"
    assert lmms_eval_extract("a dog") == "A"  # lmms-eval's quirk, reproduced
    assert lmms_eval_extract("none") is None
    assert parse_lmms_eval("E", 5) == Parsed("E", "E") and parse_lmms_eval("D", 4) == Parsed("D", "D")
    assert parse_lmms_eval("E", 4) == Parsed(None, "E", "letter E is not an option (only 4)")
    assert parse_lmms_eval("none", 4) == Parsed(None, "none", "no letter A-E found")


# ---------------------------------------------------------------------- loglik score normalisation
def test_normalize_scores_by_hand():
    conts = ["a", "abcd", "", "ab"]
    scores = [-1.5, -2.0, -3.0, -5.0]
    assert normalize_scores(scores, conts, "sum") == [-1.5, -2.0, -3.0, -5.0]
    assert normalize_scores(scores, conts, "sum") is not scores
    assert normalize_scores(scores, conts, "chars") == [-1.5, -0.5, -3.0, -2.5]  # "" divides by 1
    with pytest.raises(ValueError, match="unknown score normalisation 'tokens'"):
        normalize_scores(scores, conts, "tokens")
    with pytest.raises(ValueError, match="3 scores for 4 continuations"):
        normalize_scores(scores[:3], conts, "chars")


# ---------------------------------------------------------------------- registry rules
def test_register_profile_checks_what_it_registers():
    base = get_profile("lmms_eval")
    before = dict(PROFILES)
    with pytest.raises(TypeError, match="is not an MCQProfile"):
        register_profile({"name": "x"})  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="'mvbench' is already registered"):
        register_profile(dataclasses.replace(base, name="mvbench"))
    with pytest.raises(ValueError, match="mode must be 'generate' or 'loglik', got 'chat'"):
        register_profile(dataclasses.replace(base, name="x", mode="chat"))
    with pytest.raises(ValueError, match="score_norm must be 'sum' or 'chars', got 'mean'"):
        register_profile(dataclasses.replace(base, name="x", score_norm="mean"))
    bad = [dataclasses.replace(base, name="x", parse=None),  # generate without a parser
           dataclasses.replace(base, name="x", continuations=loglik_continuations),  # generate with continuations
           dataclasses.replace(get_profile("loglik"), name="x", continuations=None),  # loglik without continuations
           dataclasses.replace(get_profile("loglik"), name="x", parse=parse_mvbench)]  # loglik with a parser
    for profile in bad:
        with pytest.raises(ValueError, match="a generate profile needs `parse`, a loglik profile `continuations`"):
            register_profile(profile)
    assert PROFILES == before  # nothing half-registered
    try:
        for name, src in (("x_gen", base), ("x_ll", get_profile("cloze"))):
            assert register_profile(dataclasses.replace(src, name=name)) is PROFILES[name] is get_profile(name)
    finally:
        PROFILES.pop("x_gen", None), PROFILES.pop("x_ll", None)
    assert profiles.PROFILES is PROFILES
