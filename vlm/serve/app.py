"""`vlm serve`: an OpenAI-compatible chat server about videos, and a web page to chat with one.

    POST /v1/chat/completions   OpenAI's chat completions (streamed as server-sent events with "stream": true);
                                a user message may carry {"type": "video_url", "video_url": {"url": ...}} (or
                                "image_url"), the url a data: URL, an uploaded file's id or a path under the
                                media root (vlm.serve.media)
    POST /v1/files              multipart upload of a video or image -> {"id": "file-...", ...}
    GET  /v1/models             the served model
    GET  /health                liveness and the session pool's counters
    GET  /                      the web page; it uses /ui/media and /ui/frames beside the API above

Every refusal is an OpenAI-style error body {"error": {"message": one line, "type", "code"}} with a 4xx status;
the model runs in worker threads, so /health answers while answers are generated.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
import uuid
from contextlib import ExitStack
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from vlm.chat import ContextOverflowError, VideoChat
from vlm.serve.media import MediaError, MediaStore
from vlm.serve.schema import ChatRequest, Conversation, FramesRequest, to_conversation
from vlm.serve.sessions import SessionPool
from vlm.video import VideoDecodeError

log = logging.getLogger(__name__)


def _error(status: int, message: str) -> JSONResponse:
    kind = {404: "not_found_error", 413: "request_too_large", 403: "permission_error"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    err = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    if err.get("type") == "json_invalid":
        return f"malformed JSON: {err.get('ctx', {}).get('error', err.get('msg', ''))}"
    if err.get("type") == "extra_forbidden":
        return f"{where}: unknown field"
    return f"{where or 'body'}: {err.get('msg', 'invalid')}"


class _Turn:
    """One request's answer in progress: the checked-out session and the answer's text pieces."""

    def __init__(self, pool: SessionPool, media: Path | None, conv: Conversation):
        self.pool, self._stack, self._closed = pool, ExitStack(), False
        try:
            self.chat: VideoChat = self._stack.enter_context(pool.session(media))
            self.chat.set_history(conv.history)
            with pool.model_lock:  # preparing may encode the video (a connector conditioned on the question)
                self.pieces: Iterator[str] = self.chat.ask(conv.question, stream=True, **conv.settings)  # type: ignore[assignment]
        except BaseException:
            self._stack.close()
            raise

    def next_piece(self) -> str | None:
        with self.pool.model_lock:
            return next(self.pieces, None)

    def close(self) -> None:
        """Idempotent: called at the stream's end, when a client leaves, and by the response's background task.
        Waits for a generation step still running in a worker thread (it holds the model lock)."""
        with self.pool.model_lock:
            if self._closed:
                return
            self._closed = True
            self.pieces.close()  # type: ignore[attr-defined]  # records the (partial) answer in the session
        self._stack.close()

    def usage(self) -> tuple[dict[str, int], str]:
        s = self.chat.last_stats
        prompt = 0 if s is None else s.reused_tokens + s.prefilled_tokens
        done = 0 if s is None else s.generated_tokens
        finish = "stop" if s is None or s.stopped == "eos" else "length"
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}, finish


def create_app(model_folder: str | Path, *, upload_dir: str | Path, media_root: str | Path | None = None,
               served_name: str | None = None, max_upload_bytes: int = 64 << 20, max_sessions: int = 8,
               max_session_bytes: int = 2 << 30, chat_options: dict[str, Any] | None = None,
               model: Any = None) -> FastAPI:
    """The server app over a saved VideoLLM folder (or an already loaded `model`); `chat_options` go to every
    `VideoChat` (num_frames, max_new_tokens, temperature, ...)."""
    from vlm.model import VideoLLM

    model = model if model is not None else VideoLLM.from_pretrained(model_folder)
    folder = Path(model_folder)
    name = served_name or (folder.parent.name if folder.name == "final" else folder.name)  # runs/X/final -> X
    options = dict(chat_options or {})
    pool = SessionPool(lambda require_video: VideoChat(model, require_video=require_video, **options),
                       max_sessions=max_sessions, max_bytes=max_session_bytes)
    store = MediaStore(upload_dir, media_root, max_bytes=max_upload_bytes)
    app = FastAPI(title="vlm serve", version="1")
    app.state.pool, app.state.store, app.state.served_name = pool, store, name
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(exc))

    def _media(conv_url: str | None) -> Path | None:
        return None if conv_url is None else store.resolve(conv_url)

    def _refusal(e: Exception, url: str | None) -> JSONResponse:
        if isinstance(e, MediaError):
            return _error(e.status, e.message)
        if isinstance(e, VideoDecodeError):
            return _error(400, f"{url}: not a readable video or image: {e.reason}")
        return _error(400, str(e).splitlines()[0] if str(e) else type(e).__name__)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, **pool.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "vlm"}]}

    @app.post("/v1/files")
    async def upload(request: Request, file: UploadFile = File(...), purpose: str = Form("vision")) -> Any:
        length = int(request.headers.get("content-length") or 0)
        if length > max_upload_bytes + (64 << 10):
            return _error(413, f"{file.filename}: larger than the server's upload limit of {max_upload_bytes / (1 << 20):.1f} MiB")
        try:
            file_id = await run_in_threadpool(store.store, file.file, file.filename or "upload")
        except MediaError as e:
            return _error(e.status, e.message)
        size = (store.upload_dir / file_id).stat().st_size
        return {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
                "filename": file.filename, "purpose": purpose}

    @app.post("/v1/chat/completions")
    async def completions(req: ChatRequest) -> Any:
        if req.model != name:
            return _error(404, f"model {req.model!r} is not served here (GET /v1/models lists {name!r})")
        conv = None
        try:
            conv = to_conversation(req)
            turn = await run_in_threadpool(lambda: _Turn(pool, _media(conv.media_url), conv))
        except (MediaError, VideoDecodeError, ContextOverflowError, ValueError) as e:
            return _refusal(e, None if conv is None else conv.media_url)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            try:
                text = await _drain(turn)
            finally:
                turn.close()
            usage, finish = turn.usage()
            return {"id": rid, "object": "chat.completion", "created": now, "model": name, "usage": usage,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> str:
            body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage is not None:
                body = {**body, "choices": [], "usage": usage}
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> Any:
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (piece := await run_in_threadpool(turn.next_piece)) is not None:
                    yield chunk({"content": piece})
                usage, finish = turn.usage()
                yield chunk({}, finish)
                if include_usage:
                    yield chunk({}, usage=usage)
                yield "data: [DONE]\n\n"
            finally:
                turn.close()

        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(turn.close),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---------------------------------------------------------------- the web page
    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("vlm.serve").joinpath("page.html").read_text(encoding="utf-8").replace("{{MODEL}}", name)

    @app.get("/ui/media")
    async def media() -> dict[str, Any]:
        return {"files": store.listing(), "media_root": None if store.media_root is None else str(store.media_root)}

    @app.post("/ui/frames")
    async def frames(req: FramesRequest) -> Any:
        """The sampled frames of a video as JPEG data URLs; loads its session so the first question is quick."""
        def load() -> dict[str, Any]:
            with pool.session(store.resolve(req.url)) as chat:
                clip = chat.clip
                assert clip is not None
                return {"frames": [_jpeg(f) for f in clip.frames], "timestamps": [round(float(t), 2) for t in clip.timestamps],
                        "media_type": chat.media_type, "visual_tokens": chat.num_visual_tokens}
        try:
            return await run_in_threadpool(load)
        except (MediaError, VideoDecodeError, ContextOverflowError, ValueError) as e:
            return _refusal(e, req.url)

    return app


async def _drain(turn: _Turn) -> str:
    pieces = []
    while (piece := await run_in_threadpool(turn.next_piece)) is not None:
        pieces.append(piece)
    return "".join(pieces)


def _jpeg(frame: Any, width: int = 160) -> str:
    from PIL import Image

    image = Image.fromarray(frame)
    image.thumbnail((width, width))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
