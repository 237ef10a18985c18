"""`vlm serve` on a real socket (uvicorn on 127.0.0.1): concurrent load, and the web page in headless Chromium."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from serve_screenshot import CHROMEDRIVER, CHROMIUM, drive_page, live_server  # noqa: E402

from vlm.video.encode import write_video  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    from vlm.serve.app import create_app

    media = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(1)
    for i in range(4):
        write_video(media / f"v{i}.mp4", rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), fps=4.0)
    app = create_app(tiny_model_dir, upload_dir=tmp_path_factory.mktemp("uploads"), media_root=media,
                     served_name="tiny", max_sessions=2, chat_options={"max_new_tokens": 8})
    with live_server(app) as url:
        yield url, app


def _request(url: str, i: int) -> tuple[int, str]:
    content = [{"type": "video_url", "video_url": {"url": f"v{i % 4}.mp4"}}, {"type": "text", "text": f"Question {i % 4}?"}]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "stream": i % 2 == 0}
    with httpx.Client(timeout=120) as client:
        r = client.post(url + "/v1/chat/completions", json=body)
    if i % 2:
        return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
    events = [e[6:] for e in r.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]", r.text
    return r.status_code, "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                                  for e in events[:-1] if json.loads(e)["choices"])


@pytest.mark.slow
def test_twenty_concurrent_requests(server):
    """20 requests at once over 4 videos (two sessions kept): all answered, equal to the same request made alone
    (greedy), /health answers during the load, and afterwards no session is busy and the pool is within bounds."""
    url, app = server
    alone = {i: _request(url, i) for i in range(4)}
    healthy = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            healthy.append(httpx.get(url + "/health", timeout=60).status_code)

    poller = threading.Thread(target=poll)
    poller.start()
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: _request(url, i), range(20)))
    done.set()
    poller.join()
    assert all(status == 200 for status, _ in results), results
    for i, (_, text) in enumerate(results):
        assert text == alone[i % 4][1], (i, text)
    assert healthy and set(healthy) == {200}
    stats = httpx.get(url + "/health").json()
    assert stats["busy"] == 0 and stats["sessions"] <= 2 and stats["bytes"] <= stats["max_bytes"]
    assert stats["evicted"] >= 2


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()) or importlib.util.find_spec("selenium") is None,
                    reason="needs Debian's chromium and chromium-driver and selenium (.ci/run installs them)")
def test_web_page_in_headless_chromium(server, real_clip, tmp_path):
    url, _ = server
    png = tmp_path / "page.png"
    answer = drive_page(url, real_clip, "What happens in the video?", png)
    assert isinstance(answer, str)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    from PIL import Image

    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[0] > 400 and image.std() > 10  # a rendered page, not a blank one


@pytest.mark.slow
def test_the_openai_client(server):
    """The official `openai` client, as docs/SERVING.md shows it: a video part, plain and streamed."""
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny"]
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v1.mp4"}},
                                             {"type": "text", "text": "What happens?"}]}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5)
    text = reply.choices[0].message.content
    assert reply.usage.completion_tokens <= 5 and text
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    with pytest.raises(openai.PermissionDeniedError, match="outside the media root"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "../x.mp4"}}, {"type": "text", "text": "?"}]}])


@pytest.mark.slow
def test_vlm_serve_command(tiny_model_dir, tmp_path):
    """`vlm serve MODEL --port P` starts, answers /health and a chat request, and stops on SIGTERM."""
    import os
    import signal
    import socket
    import subprocess
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vlm.cli", "serve", str(tiny_model_dir), "--port", str(port),
                             "--name", "tiny", "--max-new-tokens", "4"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "Hello?"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode in (0, -signal.SIGTERM), out  # uvicorn re-raises the signal after a graceful shutdown
    assert f"http://127.0.0.1:{port}/" in out
