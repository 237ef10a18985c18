"""The server's chat sessions: one `VideoChat` per video, reused across requests, bounded in number and bytes.

An OpenAI-style request carries the whole conversation. The pool keeps a `VideoChat` per (video file, its
content) with the video encoded and its prefix prefilled; a request checks its session out, replays the client's
earlier turns (`VideoChat.set_history`: the KV cache keeps every token they share) and asks the last question.
So a conversation's video is decoded and encoded once, and each turn prefills only what is new.

One request at a time uses a session (its lock); every forward of the shared model runs under `model_lock`, one
generation step at a time, so concurrent conversations interleave token by token. After each request, idle
sessions are evicted, least recently used first, until at most `max_sessions` remain and they hold at most
`max_bytes` (clip, pixels, visual tokens and KV cache: `VideoChat.nbytes`).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from vlm.chat import VideoChat


@dataclass
class _Entry:
    chat: VideoChat
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = field(default_factory=time.monotonic)
    users: int = 0  # requests holding or waiting for this session


def file_key(path: Path) -> str:
    """A session key for a file: its resolved path, size and modification time (uploads are named by content)."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]


class SessionPool:
    def __init__(self, make_chat: Callable[[bool], VideoChat], *, max_sessions: int = 8, max_bytes: int = 2 << 30):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.make_chat = make_chat  # make_chat(require_video) -> a fresh session over the shared model
        self.max_sessions = int(max_sessions)
        self.max_bytes = int(max_bytes)
        self.model_lock = threading.Lock()
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self.evicted = 0

    @contextmanager
    def session(self, video: Path | None) -> Iterator[VideoChat]:
        """The session of `video` (None: a text-only one), with the video loaded; exclusive while held.
        Loading errors (VideoDecodeError, ContextOverflowError) propagate and leave no session behind."""
        key = "text" if video is None else file_key(video)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(self.make_chat(video is not None))
            entry.users += 1
        entry.lock.acquire()
        try:
            if video is not None and entry.chat.clip is None:
                with self.model_lock:
                    entry.chat.load_video(video)
            yield entry.chat
        except BaseException:
            if entry.chat.clip is None and video is not None:
                with self._lock:
                    if self._entries.get(key) is entry and entry.users == 1:
                        del self._entries[key]
            raise
        finally:
            entry.last_used = time.monotonic()
            entry.lock.release()
            with self._lock:
                entry.users -= 1
            self.trim()

    def trim(self) -> None:
        """Evict idle sessions, least recently used first, down to the bounds."""
        with self._lock:
            idle = sorted((e.last_used, k) for k, e in self._entries.items() if e.users == 0)
            for _, key in idle:
                if len(self._entries) <= self.max_sessions and self._bytes() <= self.max_bytes:
                    break
                del self._entries[key]
                self.evicted += 1

    def _bytes(self) -> int:
        return sum(e.chat.nbytes for e in self._entries.values())

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"sessions": len(self._entries), "busy": sum(e.users > 0 for e in self._entries.values()),
                    "bytes": self._bytes(), "max_sessions": self.max_sessions, "max_bytes": self.max_bytes,
                    "evicted": self.evicted, "pid": os.getpid()}
