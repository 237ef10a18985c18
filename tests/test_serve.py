"""`vlm serve`: the OpenAI-compatible API and its refusals, in process (FastAPI's TestClient) on a tiny model."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from vlm.video.encode import write_video  # noqa: E402


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    for name in ("a.mp4", "b.mp4"):
        write_video(root / name, rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), fps=4.0)
    (root / "notes.txt").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def client(tiny_model_dir, media, tmp_path_factory):
    from vlm.serve.app import create_app

    app = create_app(tiny_model_dir, upload_dir=tmp_path_factory.mktemp("uploads"), media_root=media,
                     served_name="tiny", max_upload_bytes=200_000, max_sessions=2,
                     chat_options={"max_new_tokens": 6})
    with TestClient(app) as c:
        yield c


def ask(client, content, stream=False, **extra):
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "stream": stream, **extra}
    return client.post("/v1/chat/completions", json=body)


def video(url: str, text: str = "What happens?") -> list[dict]:
    return [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": text}]


def test_models_health_and_page(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["max_sessions"] == 2
    page = client.get("/")
    assert page.status_code == 200 and "tiny" in page.text and "/v1/chat/completions" in page.text
    assert client.get("/ui/media").json()["files"] == ["a.mp4", "b.mp4"]


def test_answer_equals_videochat(client, tiny_model_dir, media):
    """The served answer is VideoChat's greedy answer on the same video, and the usage counts its tokens."""
    from vlm.chat import VideoChat

    r = ask(client, video("a.mp4"))
    assert r.status_code == 200, r.text
    body = r.json()
    chat = VideoChat.from_pretrained(tiny_model_dir, max_new_tokens=6)
    chat.load_video(media / "a.mp4")
    expected = chat.ask("What happens?")
    assert body["choices"][0]["message"]["content"] == expected
    assert body["usage"]["completion_tokens"] == chat.last_stats.generated_tokens
    assert body["usage"]["prompt_tokens"] == chat.last_stats.reused_tokens + chat.last_stats.prefilled_tokens
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_stream_joins_to_the_answer_and_second_turn_reuses_the_cache(client):
    first = ask(client, video("b.mp4")).json()["choices"][0]["message"]["content"]
    r = ask(client, video("b.mp4"), stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == first
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    # a follow-up question replays the history: the video's session is reused, not re-encoded
    before = client.get("/health").json()["sessions"]
    follow = {"model": "tiny", "messages": [{"role": "user", "content": video("b.mp4")},
                                            {"role": "assistant", "content": first},
                                            {"role": "user", "content": "And then?"}]}
    r = client.post("/v1/chat/completions", json=follow)
    assert r.status_code == 200, r.text
    assert client.get("/health").json()["sessions"] == before


def test_upload_and_data_url(client, media):
    data = (media / "a.mp4").read_bytes()
    r = client.post("/v1/files", files={"file": ("clip.mp4", data, "video/mp4")}, data={"purpose": "user_data"})
    assert r.status_code == 200, r.text
    assert r.json()["purpose"] == "user_data" and r.json()["filename"] == "clip.mp4"
    file_id = r.json()["id"]
    assert r.json()["bytes"] == len(data)
    by_file = ask(client, video(file_id)).json()["choices"][0]["message"]["content"]
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    by_data = ask(client, video(url)).json()["choices"][0]["message"]["content"]
    by_path = ask(client, video("a.mp4")).json()["choices"][0]["message"]["content"]
    assert by_file == by_data == by_path
    frames = client.post("/ui/frames", json={"url": file_id}).json()
    assert len(frames["frames"]) == 4 and frames["frames"][0].startswith("data:image/jpeg;base64,")


@pytest.mark.parametrize("content,status,words", [
    (video("notes.txt"), 400, "not a readable video"),
    (video("../outside.mp4"), 403, "outside the media root"),
    (video("/etc/passwd"), 403, "outside the media root"),
    (video("missing.mp4"), 404, "no such file"),
    (video("https://example.com/a.mp4"), 400, "remote URLs"),
    (video("file-0123456789abcdef01234567"), 404, "no such uploaded file"),
    (video("data:video/mp4;base64,@@@"), 400, "invalid base64"),
])
def test_bad_media_is_a_4xx_with_one_line(client, content, status, words):
    r = ask(client, content)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert words in message and "\n" not in message


def test_truncated_and_oversized_uploads(client, media, tmp_path):
    data = (media / "a.mp4").read_bytes()
    r = client.post("/v1/files", files={"file": ("cut.mp4", data[: len(data) // 3], "video/mp4")})
    assert r.status_code == 200
    r = ask(client, video(r.json()["id"]))
    assert r.status_code == 400 and "not a readable video" in r.json()["error"]["message"]
    r = client.post("/v1/files", files={"file": ("big.mp4", b"\0" * 300_000, "video/mp4")})
    assert r.status_code == 413 and "upload limit" in r.json()["error"]["message"]
    big = "data:video/mp4;base64," + base64.b64encode(b"\0" * 300_000).decode()
    assert ask(client, video(big)).status_code == 413


@pytest.mark.parametrize("body,words", [
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, "frobnicate: unknown field"),
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, "last message"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": video("a.mp4")}]},
     "first user message"),
])
def test_malformed_requests(client, body, words):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def test_malformed_json_and_unknown_model(client):
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("malformed JSON")
    r = client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and "not served here" in r.json()["error"]["message"]


def test_text_only_and_session_bound(client):
    r = ask(client, "Say something.")
    assert r.status_code == 200 and isinstance(r.json()["choices"][0]["message"]["content"], str)
    for name in ("a.mp4", "b.mp4", "a.mp4"):
        assert ask(client, video(name)).status_code == 200
    health = client.get("/health").json()
    assert health["sessions"] <= 2 and health["busy"] == 0 and health["evicted"] >= 1


def test_set_history_equals_asking_in_turn(tiny_model_dir, media):
    """Replaying a conversation (what the server does per request) answers as asking it turn by turn, reuses the
    cached prefix, and refuses a history that is not user/assistant alternation."""
    from vlm.chat import VideoChat
    from vlm.data.conversation import Turn

    live = VideoChat.from_pretrained(tiny_model_dir, max_new_tokens=5)
    live.load_video(media / "a.mp4")
    first = live.ask("What happens?")
    second = live.ask("And then?")
    replay = VideoChat(live.model, max_new_tokens=5)
    replay.load_video(media / "a.mp4")
    held = replay.nbytes
    replay.set_history([Turn("user", "What happens?"), Turn("assistant", first)])
    assert replay.ask("And then?") == second
    assert replay.last_stats.reused_tokens >= replay.load_stats.prefix_tokens
    assert replay.nbytes > held > 0  # the cache grew with the turns
    with pytest.raises(ValueError, match="alternation"):
        replay.set_history([Turn("user", "a"), Turn("user", "b")])
