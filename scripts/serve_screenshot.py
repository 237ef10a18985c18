"""Drive `vlm serve`'s web page in headless Chromium: upload a video, ask a question, wait for the streamed answer,
save a screenshot. Used by the browser test and to draw docs/serving_page.png:

    python scripts/serve_screenshot.py MODEL_DIR VIDEO OUT.png [--question "..."]

Needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver) and selenium.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@contextlib.contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Run `app` with uvicorn on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def drive_page(base_url: str, video: Path, question: str, out_png: Path, timeout: float = 180.0) -> str:
    """Upload `video` on the page, ask `question`, wait for the whole streamed answer; returns it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            wait = WebDriverWait(driver, timeout)
            driver.get(base_url + "/")
            driver.find_element(By.ID, "file").send_keys(str(Path(video).resolve()))
            driver.find_element(By.ID, "upload").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#frames img"))
            driver.find_element(By.ID, "question").send_keys(question)
            driver.find_element(By.ID, "send").click()
            answer = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#log .assistant[data-done='1'], #log .error"))
            if "error" in answer[0].get_attribute("class"):
                raise RuntimeError(f"the page showed an error: {answer[0].text}")
            out_png.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out_png))
            return answer[0].text
        finally:
            driver.quit()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("video", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--question", default="Describe what happens in the video.")
    args = p.parse_args()
    from vlm.serve.app import create_app

    with tempfile.TemporaryDirectory() as uploads:
        with live_server(create_app(args.model, upload_dir=uploads, chat_options={"max_new_tokens": 48})) as url:
            answer = drive_page(url, args.video, args.question, args.out)
    print(f"answer: {answer}\nscreenshot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
