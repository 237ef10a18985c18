"""Open-ended QA: data formats, offline judges, the Video-ChatGPT judge protocol against a local fake server, and
the HTTP judge's retry and cache rules against a fake transport."""

from __future__ import annotations

import contextlib
import email.message
import io
import json
import re
import threading
import types
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from evals import judges
from evals.judges import (ContainsJudge, EmbeddingJudge, ExactMatchJudge, JudgeError, OpenAIJudge, VCGPT_SYSTEM,
                          Verdict, normalize_answer, parse_verdict)
from evals.openqa import evaluate_openqa, load_openqa, load_predictions
from tests.eval_helpers import ScriptedModel, write_clip
from tests.eval_helpers import single_thread  # noqa: F401  (fixture)

ANSWERS = {"what colour is the square": "red square", "which way does it move": "left", "how many squares": "two"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module")
def msrvtt(tmp_path_factory) -> Path:
    """MSRVTT-QA style: {"answer", "id", "question", "video_id": int}, videos video<id>.mp4."""
    root = tmp_path_factory.mktemp("msrvtt")
    write_clip(root / "videos" / "video7.mp4", "red", frames=8)
    write_clip(root / "videos" / "video9.mp4", "green", frames=8)
    qa = [{"answer": "red", "id": 0, "question": "what colour is the square", "video_id": 7},
          {"answer": "left", "id": 1, "question": "which way does it move", "video_id": 7},
          {"answer": "2", "id": 2, "question": "how many squares", "video_id": 9},
          {"answer": "up", "id": 3, "question": "which way does it move", "video_id": 404}]
    (root / "test_qa.json").write_text(json.dumps(qa))
    return root


def test_formats_msrvtt_activitynet_and_video_chatgpt(msrvtt, tmp_path):
    items = load_openqa(msrvtt / "test_qa.json", msrvtt / "videos")
    assert [i.video.name for i in items] == ["video7.mp4", "video7.mp4", "video9.mp4", "404"]
    assert items[2].answer == "2" and items[0].uid == "0"
    write_clip(tmp_path / "v_abc.mp4", "blue", frames=8)
    (tmp_path / "test_q.json").write_text(json.dumps([{"video_name": "abc", "question": "what?", "question_id": "abc_0"}]))
    (tmp_path / "test_a.json").write_text(json.dumps([{"answer": "a square", "type": 2, "question_id": "abc_0"}]))
    anet = load_openqa(tmp_path / "test_q.json", tmp_path, answers=tmp_path / "test_a.json")
    assert anet[0].video.name == "v_abc.mp4" and anet[0].answer == "a square" and anet[0].uid == "abc_0"
    (tmp_path / "preds.json").write_text(json.dumps([{"video_name": "abc", "Q": "what?", "A": "a square", "pred": "square"}]))
    items, preds = load_predictions(tmp_path / "preds.json")
    assert preds == {"0": "square"} and items[0].answer == "a square"


def test_offline_judges_and_normalisation():
    assert normalize_answer("The two Dogs!") == ["2", "dogs"]
    triples = [("q", "two", "2"), ("q", "red", "a red square"), ("q", "red", "blue"), ("q", "the cat", "Cat.")]
    assert [v.correct for v in ExactMatchJudge().judge_many(triples)] == [True, False, False, True]
    assert [v.correct for v in ContainsJudge().judge_many(triples)] == [True, True, False, True]


def test_iou_judge_scores_temporal_grounding(msrvtt, tmp_path):
    """`--judge iou`: the first interval of seconds in the prediction against the answer's; right at IoU >= 0.5;
    mean IoU in the metrics; an answer without an interval is a judge error (unjudged), not a zero."""
    from evals.judges import IoUJudge, build_judge, parse_interval

    assert parse_interval("from 12 s to 15 s") == (12.0, 15.0) and parse_interval("15-12") == (12.0, 15.0)
    assert parse_interval("between 3.5 and 7 seconds") == (3.5, 7.0) and parse_interval("at the end") is None
    out = IoUJudge().judge_many([("q", "from 10 s to 14 s", "from 11 s to 14 s"),  # 3/4
                                 ("q", "from 10 s to 14 s", "It is visible from 12 to 20."),  # 2/10
                                 ("q", "from 10 s to 14 s", "near the end"),  # no interval: 0
                                 ("q", "at the end", "from 1 s to 2 s")])
    assert [v.correct for v in out[:3]] == [True, False, False] and isinstance(out[3], JudgeError)
    assert [v.detail["iou"] for v in out[:3]] == [0.75, 0.2, 0.0] and out[0].score == pytest.approx(3.75)
    assert build_judge("iou", threshold=0.3).judge_id == "iou0.3/v1"
    items = load_openqa(msrvtt / "test_qa.json", msrvtt / "videos")[:2]
    for item, answer in zip(items, ("from 0 s to 4 s", "from 2 s to 6 s")):
        item.answer = answer
    model = ScriptedModel(lambda r: "from 1 s to 4 s")
    res = evaluate_openqa(model, items, IoUJudge(), tmp_path, num_frames=4, progress=False)
    assert res.metrics["accuracy"] == 50.0 and res.metrics["mean_iou"] == pytest.approx((0.75 + 0.4) / 2)


def test_clips_have_the_frame_count_the_model_was_trained_on_unless_asked(msrvtt, tmp_path):
    from types import SimpleNamespace

    items = load_openqa(msrvtt / "test_qa.json", msrvtt / "videos")
    for asked, count in ((None, 6), (4, 4)):
        model = ScriptedModel(lambda r: ANSWERS[r.question])
        model.config = SimpleNamespace(num_frames=6)  # a VideoLLM's config: the frame count it was trained on
        res = evaluate_openqa(model, items, ContainsJudge(), tmp_path / str(count), num_frames=asked, progress=False)
        assert res.settings["num_frames"] == count
        assert {len(c.indices) for c in model.clips.values() if c is not None} == {count}


def test_harness_with_contains_judge_counts_skips_and_resumes(msrvtt, tmp_path):
    items = load_openqa(msrvtt / "test_qa.json", msrvtt / "videos")
    model = ScriptedModel(lambda r: ANSWERS[r.question])
    res = evaluate_openqa(model, items, ContainsJudge(), tmp_path, num_frames=4, progress=False)
    # red in "red square", left == left, "2" vs "two" (number words normalised); video 404 is missing
    assert res.metrics["accuracy"] == 100.0 and res.metrics["mean_score"] == 5.0
    assert res.counts["judged"] == 3 and res.counts["skipped"] == 1 and res.judge["id"] == "contains/v1"
    again = ScriptedModel(lambda r: ANSWERS[r.question])
    res2 = evaluate_openqa(again, items, ExactMatchJudge(), tmp_path, num_frames=4, progress=False)
    assert again.asked == []  # predictions reused, only re-judged with the new judge
    # exact: "red square" != "red"; "left" == "left"; "two" == "2" after normalisation
    assert res2.metrics["accuracy"] == pytest.approx(200.0 / 3) and res2.judge["id"] == "exact/v1"


class FakeJudgeServer:
    """A local OpenAI-compatible endpoint (127.0.0.1 only) that fails first, then answers like a GPT judge."""

    def __init__(self, fail_first: int = 1, junk_first: int = 1):
        self.requests: list[dict] = []
        self.fail_first, self.junk_first = fail_first, junk_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if outer.fail_first > 0:
                    outer.fail_first -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                user = body["messages"][1]["content"]
                answer = re.search(r"Correct Answer: (.*)\n", user).group(1)
                pred = re.search(r"Predicted Answer: (.*)\n", user).group(1)
                ok = answer.lower() in pred.lower()
                content = "Sure! Here it is." if outer.junk_first > 0 else f"{{'pred': '{'yes' if ok else 'no'}', 'score': {4.8 if ok else 1}}}"
                outer.junk_first = max(0, outer.junk_first - 1)
                data = json.dumps({"model": "fake-judge-0613", "choices": [{"message": {"role": "assistant", "content": content}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_http_judge_protocol_retries_and_cache(msrvtt, tmp_path):
    items = load_openqa(msrvtt / "test_qa.json", msrvtt / "videos")[:3]
    preds = {"0": "a red square", "1": "to the right", "2": "there are 2 squares"}
    with FakeJudgeServer() as server:
        judge = OpenAIJudge(server.url, "gpt-3.5-turbo-0613", api_key="sk-test", cache_dir=tmp_path / "cache",
                            backoff=0.01)
        res = evaluate_openqa(None, items, judge, tmp_path / "a", predictions=preds, progress=False)
        assert res.metrics["accuracy"] == pytest.approx(200.0 / 3)  # "right" does not contain "left"
        assert res.metrics["mean_score"] == pytest.approx((4 + 1 + 4) / 3)  # 4.8 truncated to 4, as Video-ChatGPT does
        assert len(server.requests) == 3 + 2  # one 503 and one junk reply were retried
        first = server.requests[0]
        assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
        assert first["body"]["model"] == "gpt-3.5-turbo-0613" and first["body"]["temperature"] == 0.0
        assert first["body"]["messages"][0] == {"role": "system", "content": VCGPT_SYSTEM}
        assert "Python dictionary string" in first["body"]["messages"][1]["content"]
        assert res.judge["id"] == f"openai-compatible:gpt-3.5-turbo-0613@{server.url}?temperature=0&max_tokens=64"
        assert res.judge["served_models"] == ["fake-judge-0613"]
        # a second run with the same cache asks the server nothing
        again = OpenAIJudge(server.url, "gpt-3.5-turbo-0613", cache_dir=tmp_path / "cache", backoff=0.01)
        res2 = evaluate_openqa(None, items, again, tmp_path / "b", predictions=preds, progress=False)
        assert len(server.requests) == 5 and res2.metrics == res.metrics


def test_http_judge_gives_up_and_leaves_the_question_unjudged(msrvtt, tmp_path):
    items = load_openqa(msrvtt / "test_qa.json", msrvtt / "videos")[:1]
    with FakeJudgeServer(fail_first=100) as server:
        judge = OpenAIJudge(server.url, "m", max_retries=2, backoff=0.001, cache_dir=tmp_path / "cache")
        res = evaluate_openqa(None, items, judge, tmp_path / "run", predictions={"0": "red"}, progress=False)
        assert len(server.requests) == 3
    assert res.counts["unjudged"] == 1 and res.counts["judged"] == 0 and res.metrics["accuracy"] is None


# -- the HTTP judge's retry and cache rules, against a fake transport (no network, no real sleeping) -----------
class FakeTransport:
    """Stands in for `urllib.request.urlopen`: answers each request with the next scripted reply.

    A reply is an int (an HTTP error with that status), a (status, headers) pair, an exception to raise,
    or a string (a 200 whose message content is that string)."""

    def __init__(self, *replies, default="{'pred': 'yes', 'score': 5}"):
        self.replies, self.default = list(replies), default
        self.requests: list[dict] = []

    def __call__(self, request, timeout=None):
        body = json.loads(request.data)
        self.requests.append({"url": request.full_url, "body": body, "timeout": timeout})
        reply = self.replies.pop(0) if self.replies else self.default
        if isinstance(reply, int):
            reply = (reply, {})
        if isinstance(reply, tuple):
            status, headers = reply
            message = email.message.Message()
            for k, v in headers.items():
                message[k] = v
            raise urllib.error.HTTPError(request.full_url, status, f"status {status}", message, io.BytesIO(b"{}"))
        if isinstance(reply, BaseException):
            raise reply
        data = json.dumps({"model": body["model"], "choices": [{"message": {"content": reply}}]}).encode()
        return contextlib.closing(io.BytesIO(data))


@pytest.fixture
def transport(monkeypatch):
    """Install a FakeTransport (set `.replies`) and record the judge's sleeps instead of sleeping."""
    fake = FakeTransport()
    sleeps: list[float] = []
    monkeypatch.setattr(judges.urllib.request, "urlopen", fake)
    monkeypatch.setattr(judges, "time", types.SimpleNamespace(sleep=sleeps.append))
    fake.sleeps = sleeps
    return fake


def _judge(**kw) -> OpenAIJudge:
    return OpenAIJudge(kw.pop("base_url", "http://judge.invalid/v1"), kw.pop("model", "judge-model"), api_key="k", **kw)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_http_judge_does_not_retry_client_errors(transport, status):
    transport.replies = [status]
    with pytest.raises(JudgeError, match=rf"HTTP {status} status {status} \(not retried\)"):
        _judge().judge_one("q", "red", "red")
    assert len(transport.requests) == 1 and transport.sleeps == []
    # judge_many turns the failure into that question's JudgeError, and carries on with the next one
    transport.replies = [status]
    out = _judge().judge_many([("q", "red", "red"), ("q", "blue", "blue")])
    assert isinstance(out[0], JudgeError) and isinstance(out[1], Verdict) and out[1].correct


@pytest.mark.parametrize("status", [408, 409, 425, 429, 500, 502, 503, 504, 520, 529])
def test_http_judge_retries_timeouts_rate_limits_and_server_errors(transport, status):
    transport.replies = [status, status]
    verdict = _judge(backoff=1.5).judge_one("q", "red", "red")
    assert verdict.correct and verdict.score == 5.0
    assert len(transport.requests) == 3 and transport.sleeps == [1.5, 3.0]  # backoff, then twice it
    assert transport.requests[0]["body"] == transport.requests[2]["body"]  # the same request again


def test_http_judge_retries_network_errors_and_malformed_replies(transport):
    transport.replies = [urllib.error.URLError("connection refused"), TimeoutError("timed out"),
                         ConnectionResetError("reset"), "Sure! Here it is.", "{'pred': 'maybe', 'score': 3}"]
    verdict = _judge().judge_one("q", "red", "blue")
    assert verdict.correct  # the sixth reply, the default
    assert len(transport.requests) == 6 and transport.sleeps == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_http_judge_retries_are_bounded_and_backoff_capped(transport):
    transport.replies = [503] * 10
    with pytest.raises(JudgeError, match=r"no verdict after 6 attempts: HTTP 503 status 503"):
        _judge(max_retries=5, backoff=1.0, max_backoff=5.0).judge_one("q", "red", "red")
    assert len(transport.requests) == 6  # the first try and 5 retries
    assert transport.sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]  # no sleep after the last attempt
    transport.replies, transport.sleeps[:] = [503] * 10, []
    with pytest.raises(JudgeError, match="no verdict after 1 attempts"):
        _judge(max_retries=0).judge_one("q", "red", "red")
    assert len(transport.requests) == 7 and transport.sleeps == []


@pytest.mark.parametrize(
    "retry_after, slept",
    [("7", 7.0), ("0.25", 0.25), ("0", 0.0), ("120", 30.0),  # a server's wait, capped at max_backoff (30 s)
     ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0), ("soon", 1.0)],  # not a number of seconds: the own backoff
)
def test_http_judge_honours_retry_after(transport, retry_after, slept):
    transport.replies = [(429, {"Retry-After": retry_after})]
    assert _judge().judge_one("q", "red", "red").correct
    assert transport.sleeps == [slept] and len(transport.requests) == 2
    # on a 503 too, and at a later attempt the server's wait replaces the (longer) exponential one
    transport.replies, transport.sleeps[:] = [503, 503, 503, (503, {"Retry-After": "3"})], []
    assert _judge().judge_one("q", "red", "red").correct
    assert transport.sleeps == [1.0, 2.0, 4.0, 3.0]


def test_http_judge_cache_is_per_judge(transport, tmp_path):
    """A cached verdict is reused only by a judge that would send the very same request."""
    cache = tmp_path / "cache"
    transport.replies = ["{'pred': 'yes', 'score': 4}"]
    first = _judge(cache_dir=cache).judge_one("q", "red", "a red one")
    assert first.correct and first.score == 4.0 and len(transport.requests) == 1
    # The same judge (a new object, as in a rerun) reads it from disk: no request.
    again = _judge(cache_dir=cache).judge_one("q", "red", "a red one")
    assert (again.correct, again.score) == (True, 4.0) and len(transport.requests) == 1
    # Every other judge asks its own server, and gets its own verdict ("no" from here on).
    transport.default = "{'pred': 'no', 'score': 1}"
    others = [_judge(cache_dir=cache, model="other-model"),
              _judge(cache_dir=cache, base_url="http://other-judge.invalid/v1"),
              _judge(cache_dir=cache, temperature=0.7),
              _judge(cache_dir=cache, max_tokens=16)]
    for n, judge in enumerate(others, start=2):
        verdict = judge.judge_one("q", "red", "a red one")
        assert (verdict.correct, verdict.score) == (False, 1.0) and len(transport.requests) == n, judge.record()
    # ... as does the same judge asked with another prompt (a changed protocol text).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(judges, "VCGPT_USER", judges.VCGPT_USER.replace("Please evaluate", "Kindly evaluate"))
        assert not _judge(cache_dir=cache).judge_one("q", "red", "a red one").correct
        assert len(transport.requests) == 6
        assert transport.requests[-1]["body"]["messages"][1]["content"].startswith("Kindly evaluate")
    # The first judge's verdict is still its own, and each judge now finds its own on disk.
    assert _judge(cache_dir=cache).judge_one("q", "red", "a red one").correct
    assert not _judge(cache_dir=cache, model="other-model").judge_one("q", "red", "a red one").correct
    assert len(transport.requests) == 6
    # Another question, answer or prediction is another verdict; a judge without a cache always asks.
    for q, a, p in (("q2", "red", "a red one"), ("q", "blue", "a red one"), ("q", "red", "red")):
        _judge(cache_dir=cache).judge_one(q, a, p)
    _judge().judge_one("q", "red", "a red one")
    assert len(transport.requests) == 10


def test_http_judge_does_not_cache_failures(transport, tmp_path):
    transport.replies = [401]
    with pytest.raises(JudgeError):
        _judge(cache_dir=tmp_path).judge_one("q", "red", "red")
    assert _judge(cache_dir=tmp_path).judge_one("q", "red", "red").correct  # asked again, answered this time
    assert len(transport.requests) == 2


def test_parse_verdict():
    assert parse_verdict("{'pred': 'yes', 'score': 4}").correct
    v = parse_verdict("Here: {'pred': 'no', 'score': '2'} done")
    assert not v.correct and v.score == 2.0
    with pytest.raises(ValueError):
        parse_verdict("{'pred': 'maybe', 'score': 3}")


@pytest.mark.slow
def test_minilm_judge_with_the_packaged_model():
    judge = EmbeddingJudge()
    v = judge.judge_many([("q", "the man is cooking food", "a man cooks food"),  # cos 0.95
                          ("q", "two", "three"),  # cos 0.81: below the threshold
                          ("q", "red", "blue"),
                          ("q", "guitar", "he is playing a guitar")])  # contains
    assert [x.correct for x in v] == [True, False, False, True]
    assert v[0].detail["cos"] > 0.9 and v[3].score == 5.0


def test_stored_predictions_are_rejudged_when_a_judge_setting_changes():
    """The harness re-judges a stored prediction unless the same judge (every verdict-changing setting) judged it."""
    from evals.openqa import _judged_by
    rec = {"verdict": True, "judge": _judge().judge_id}
    assert _judged_by(rec, _judge())
    for other in (_judge(temperature=0.7), _judge(max_tokens=16), _judge(model="other-model")):
        assert not _judged_by(rec, other), other.judge_id
    assert not _judged_by({**rec, "verdict": None}, _judge()) and not _judged_by(None, _judge())
