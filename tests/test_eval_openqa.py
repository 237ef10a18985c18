"""Open-ended QA: data formats, offline judges, and the Video-ChatGPT judge protocol against a local fake server."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from evals.judges import (ContainsJudge, EmbeddingJudge, ExactMatchJudge, OpenAIJudge, VCGPT_SYSTEM, normalize_answer,
                          parse_verdict)
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
        assert res.judge["id"] == f"openai-compatible:gpt-3.5-turbo-0613@{server.url}"
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
