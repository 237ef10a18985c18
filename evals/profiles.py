"""Multiple-choice protocol profiles: how a question becomes a prompt, and how an answer becomes a letter.

A profile is named and recorded with every result, because the same model scores differently under
different prompts and parsers. Three are built in:

`mvbench`   the official protocol of MVBench's evaluation notebook (OpenGVLab/Ask-Anything,
            video_chat2/mvbench.ipynb: `qa_template`, `infer_mvbench`, `check_ans`), with the setting the
            notebook runs (`system_llm=True`): the system prompt is the system message *and* is prepended to
            the question; the question is "Question: ...\\nOptions:\\n(A) ...\\n(B) ..." followed by
            "\\nOnly give the best option."; the assistant turn is prefilled with "Best option:("; greedy
            decoding, at most 100 new tokens; the answer is "(" + the first line of the generated text, and
            it is judged by `check_ans`, which compares only its first space-separated word with "(x)".
`lmms_eval` lmms-eval's MVBench task (EvolvingLMMs-Lab/lmms-eval, lmms_eval/tasks/mvbench/utils.py at
            f6548f5d, `mvbench_doc_to_text` + `mcq_acc`; post_prompt from the task YAMLs): no system prompt
            of its own, "Question:" + question + "\\nOption:\\n" + "A. option\\n" per option +
            "Only give the best option.\\n", greedy, at most 16 new tokens, letter extracted by its regexes.
`loglik`    the `mvbench` prompt and prefill, no generation: each option's continuation "A) option text"
            is scored by its summed token log-likelihood and the best-scoring option is the answer.
`cloze`     the cloze formulation that OLMES (Gu et al., 2024) recommends for small models: the question alone
            (no options, no letters) as the user turn, each option's own text as the assistant's answer,
            scored by its log-likelihood per character (lm-evaluation-harness's `acc_norm`), so a model is never
            asked to map an answer to a letter and long options are not penalised for their length.

Parsing never guesses: an answer from which no single option letter can be read is *unparsable*; it is
scored wrong and stays in the denominator.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vlm.data.conversation import Turn
from vlm.data.mvbench import LETTERS, MCQItem

MVBENCH_SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and movement "
    "of objects, and the action and pose of persons. Based on your observations, select the best option that "
    "accurately addresses the question."
)
MVBENCH_PREFILL = "Best option:("
MVBENCH_QUESTION_PROMPT = "\nOnly give the best option."
LMMS_EVAL_POST_PROMPT = "Only give the best option.\n"


@dataclass(frozen=True)
class Parsed:
    """What a profile read from an answer: the option letter, or None when unparsable (with the reason)."""

    letter: str | None
    answer: str  # the text the parser looked at (e.g. "(" + first line for `mvbench`)
    reason: str = ""


@dataclass(frozen=True)
class MCQProfile:
    """A named prompt + answer protocol for multiple-choice questions."""

    name: str
    mode: str  # "generate" | "loglik"
    description: str
    build_turns: Callable[[MCQItem], list[Turn]]
    prefill: str = ""
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()
    parse: Callable[[str, int], Parsed] | None = None  # (generated text, number of options) -> Parsed
    continuations: Callable[[MCQItem], list[str]] | None = None  # loglik: one continuation per option
    score_norm: str = "sum"  # loglik: "sum" of token log-probs, or "chars": the sum divided by the characters
    source: str = ""
    settings: dict = field(default_factory=dict)

    def record(self) -> dict:
        """The profile as stored in results: every string that shapes the prompt, and the parse rule."""
        example = MCQItem(task="example", index=0, video=Path("v.mp4"), question="<question>",
                          candidates=["<option 1>", "<option 2>"], answer="<option 1>", answer_index=0)
        rec = {"name": self.name, "mode": self.mode, "description": self.description, "source": self.source,
               "prefill": self.prefill, "turns_example": [{"role": t.role, "text": t.text} for t in self.build_turns(example)]}
        if self.mode == "generate":
            rec.update(max_new_tokens=self.max_new_tokens, greedy=True, stop=list(self.stop))
        if self.continuations is not None:
            rec["continuations_example"] = self.continuations(example)
            rec["score_norm"] = self.score_norm
        return rec | self.settings


# ---------------------------------------------------------------------- mvbench (the official notebook)
def mvbench_question(item: MCQItem) -> str:
    """The notebook's `qa_template`: "Question: q\\nOptions:\\n(A) a\\n(B) b" (trailing whitespace stripped)."""
    text = f"Question: {item.question}\nOptions:\n"
    for i, c in enumerate(item.candidates):
        text += f"({LETTERS[i]}) {c}\n"
    return text.rstrip()


def mvbench_turns(item: MCQItem) -> list[Turn]:
    """System prompt as system message and, as in `infer_mvbench(system_llm=True)`, before the question too."""
    user = "<video>\n" + MVBENCH_SYSTEM + "\n" + mvbench_question(item) + MVBENCH_QUESTION_PROMPT
    return [Turn("system", MVBENCH_SYSTEM), Turn("user", user)]


def check_ans(pred: str, gt: str) -> bool:
    """The notebook's `check_ans`, re-implemented: compare the first space-separated words, lower-cased.

    True when the prediction's first word (dots removed) is a substring of the ground truth's first word
    "(x)", or the ground truth's first word is a substring of the prediction's. Known quirk (Ask-Anything's
    GitHub issue 227): a bare "(" or ")" or "" passes for every ground truth; `parse_mvbench` treats an answer that
    passes for more than one option as unparsable instead of correct.
    """
    pred_option = pred.lower().split(" ")[0]
    gt_option = gt.lower().split(" ")[0]
    return pred_option.replace(".", "") in gt_option or gt_option in pred_option


def mvbench_answer_text(generated: str) -> str:
    """What the notebook scores: return_prompt "(" + the first line of the stripped generation."""
    return "(" + generated.strip().split("\n")[0]


def parse_mvbench(generated: str, num_options: int) -> Parsed:
    """The option letter `check_ans` accepts for this answer, if exactly one option's "(x)" is accepted."""
    answer = mvbench_answer_text(generated)
    accepted = [LETTERS[i] for i in range(num_options) if check_ans(answer, f"({LETTERS[i]}) option")]
    if len(accepted) == 1:
        return Parsed(accepted[0], answer)
    if not accepted:
        return Parsed(None, answer, "check_ans accepts no option")
    return Parsed(None, answer, f"check_ans accepts {len(accepted)} options (ambiguous)")


# ---------------------------------------------------------------------- lmms_eval
def lmms_eval_question(item: MCQItem) -> str:
    """`mvbench_doc_to_text`: "Question:" + q + "\\nOption:\\n" + "A. a\\n"... + post_prompt (no space after ':')."""
    options = "".join(f"{string.ascii_uppercase[i]}. {c}\n" for i, c in enumerate(item.candidates))
    return "Question:" + item.question + "\nOption:\n" + options + LMMS_EVAL_POST_PROMPT


def lmms_eval_turns(item: MCQItem) -> list[Turn]:
    """No system turn (the model's default system prompt, if any, applies), video first, then the text."""
    return [Turn("user", "<video>\n" + lmms_eval_question(item))]


_LMMS_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_OPTION_LINE = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
_LONE_LETTER = re.compile(r"\b([A-E])\b", re.IGNORECASE)


def _lmms_punctuation(text: str) -> str:
    """lmms-eval's VQA-style punctuation pass: drop a mark next to a space (or in "1,000"), else make it a space."""
    out = text
    for p in _LMMS_PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_NUMBER.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def lmms_eval_extract(pred: str) -> str | None:
    """`mcq_acc`'s `process`: "X. text" -> X; else normalise and take the first standalone letter A-E.

    Returns the upper-case letter or None. Faithful quirks: only A-E are recognised, and a standalone "a"
    (the article) anywhere in the normalised answer reads as option A.
    """
    m = _OPTION_LINE.match(pred.strip())
    if m:
        return m.group(1).upper()
    text = pred.replace("\n", " ").replace("\t", " ").strip()
    text = _lmms_punctuation(text)
    text = text.strip("'").strip('"').strip(")").strip("(").strip().lower()
    m = _LONE_LETTER.search(text)
    return m.group(1).upper() if m else None


def parse_lmms_eval(generated: str, num_options: int) -> Parsed:
    """lmms-eval's letter, accepted only if it names one of this question's options."""
    letter = lmms_eval_extract(generated)
    if letter is None:
        return Parsed(None, generated, "no letter A-E found")
    if LETTERS.index(letter) >= num_options:
        return Parsed(None, generated, f"letter {letter} is not an option (only {num_options})")
    return Parsed(letter, generated)


# ---------------------------------------------------------------------- loglik
def loglik_continuations(item: MCQItem) -> list[str]:
    """After the prefill "Best option:(", option i continues as "X) text" (the notebook's answer format)."""
    return [f"{LETTERS[i]}) {c}" for i, c in enumerate(item.candidates)]


# ---------------------------------------------------------------------- cloze
def cloze_turns(item: MCQItem) -> list[Turn]:
    """The question alone after the video; the model's own system prompt (if any) applies."""
    return [Turn("user", "<video>\n" + item.question)]


def cloze_continuations(item: MCQItem) -> list[str]:
    """Each option's own text is the answer."""
    return list(item.candidates)


def normalize_scores(scores: list[float], continuations: list[str], norm: str) -> list[float]:
    """Summed log-likelihoods as the profile compares them: as they are, or per character of the continuation."""
    if len(scores) != len(continuations):
        raise ValueError(f"{len(scores)} scores for {len(continuations)} continuations")
    if norm == "sum":
        return list(scores)
    if norm == "chars":
        return [s / max(1, len(c)) for s, c in zip(scores, continuations)]
    raise ValueError(f"unknown score normalisation '{norm}' (sum | chars)")


PROFILES: dict[str, MCQProfile] = {
    "mvbench": MCQProfile(
        name="mvbench", mode="generate", build_turns=mvbench_turns, prefill=MVBENCH_PREFILL, max_new_tokens=100,
        stop=("\n",), parse=parse_mvbench,
        description="MVBench official notebook: system prompt (also before the question), 'Best option:(' prefill, "
                    "greedy, answer = '(' + first line, judged by check_ans on the first word",
        source="OpenGVLab/Ask-Anything video_chat2/mvbench.ipynb",
        settings={"system_prompt": MVBENCH_SYSTEM, "question_prompt": MVBENCH_QUESTION_PROMPT,
                  "answer": "'(' + generated.strip().split('\\n')[0]",
                  "parse": "check_ans(answer, '(X) ...') for each option X; exactly one accepted -> X, else unparsable"},
    ),
    "lmms_eval": MCQProfile(
        name="lmms_eval", mode="generate", build_turns=lmms_eval_turns, prefill="", max_new_tokens=16,
        parse=parse_lmms_eval,
        description="lmms-eval mvbench task: 'Question:q\\nOption:\\nA. a\\n...Only give the best option.\\n', greedy, "
                    "16 new tokens, letter by mcq_acc's regexes",
        source="EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/mvbench/utils.py @ f6548f5d",
        settings={"post_prompt": LMMS_EVAL_POST_PROMPT,
                  "parse": "^([A-E])\\.\\s*(.+)$ on the stripped answer, else punctuation pass + lower-case + "
                           "first \\b([A-E])\\b; a letter beyond the options is unparsable"},
    ),
    "loglik": MCQProfile(
        name="loglik", mode="loglik", build_turns=mvbench_turns, prefill=MVBENCH_PREFILL,
        continuations=loglik_continuations,
        description="mvbench prompt + prefill; each option's 'X) text' scored by summed token log-likelihood "
                    "(prefix computed once, shared through the KV cache); argmax is the answer",
        source="this project",
        settings={"score": "sum of log p(continuation tokens | prompt + prefill); ties -> unparsable"},
    ),
    "cloze": MCQProfile(
        name="cloze", mode="loglik", build_turns=cloze_turns, continuations=cloze_continuations, score_norm="chars",
        description="cloze formulation: '<video>\\nquestion' (no options, no letters); each option's text scored as "
                    "the answer by log-likelihood per character; argmax is the answer",
        source="OLMES (Gu et al., 2024) cloze formulation; lm-evaluation-harness acc_norm",
        settings={"score": "sum of log p(option tokens | prompt) / len(option characters); ties -> unparsable"},
    ),
}


def register_profile(profile: MCQProfile) -> MCQProfile:
    """Add a profile under its name (e.g. another benchmark's prompt over the MVBench layout); duplicates raise."""
    if not isinstance(profile, MCQProfile):
        raise TypeError(f"{profile!r} is not an MCQProfile")
    if profile.name in PROFILES:
        raise KeyError(f"multiple-choice profile '{profile.name}' is already registered")
    if profile.mode not in ("generate", "loglik"):
        raise ValueError(f"profile '{profile.name}': mode must be 'generate' or 'loglik', got '{profile.mode}'")
    if profile.score_norm not in ("sum", "chars"):
        raise ValueError(f"profile '{profile.name}': score_norm must be 'sum' or 'chars', got '{profile.score_norm}'")
    if (profile.mode == "generate") != (profile.parse is not None) or (profile.mode == "loglik") != (profile.continuations is not None):
        raise ValueError(f"profile '{profile.name}': a generate profile needs `parse`, a loglik profile `continuations`")
    PROFILES[profile.name] = profile
    return profile


def get_profile(name: str) -> MCQProfile:
    """A built-in profile by name."""
    if name not in PROFILES:
        raise KeyError(f"unknown multiple-choice profile '{name}'; profiles: {', '.join(PROFILES)}")
    return PROFILES[name]
