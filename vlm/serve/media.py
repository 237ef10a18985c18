"""Where a served conversation's video comes from: a path under the media root, a data: URL or an uploaded file.

Every way in is bounded and named in its error: a path outside the media root is refused (403), an upload or
data: URL over the size limit is refused (413) while it is being read, remote URLs are refused (this server
fetches nothing), and a file that does not decode as a video or image is refused (400) by the session that loads
it. Uploads and data: URLs are stored under `upload_dir` by content hash, so the same bytes are one file (and one
cached session); the oldest are deleted beyond `max_stored` files.
"""

from __future__ import annotations

import base64
import io
import binascii
import hashlib
import os
import re
import threading
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from vlm.video.backends import IMAGE_SUFFIXES

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif")
_FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
_CHUNK = 1 << 20


class MediaError(Exception):
    """A request's media cannot be used; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class MediaStore:
    """Resolves the `url` of a video/image content part to a local file (see the module docstring)."""

    def __init__(self, upload_dir: str | os.PathLike, media_root: str | os.PathLike | None = None,
                 max_bytes: int = 64 << 20, max_stored: int = 64):
        self.upload_dir = Path(upload_dir)
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        self.media_root = None if media_root is None else Path(media_root).resolve()
        self.max_bytes = int(max_bytes)
        self.max_stored = int(max_stored)
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- storing
    def store(self, stream: BinaryIO, name: str = "upload") -> str:
        """Copy an uploaded file into the store, refusing it past `max_bytes`; returns its id (`file-<hex>`)."""
        digest = hashlib.sha256()
        tmp = self.upload_dir / f".incoming-{os.getpid()}-{threading.get_ident()}"
        size = 0
        try:
            with open(tmp, "wb") as out:
                while chunk := stream.read(_CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise MediaError(413, f"{name}: larger than the server's upload limit of {self._limit()}")
                    digest.update(chunk)
                    out.write(chunk)
            if size == 0:
                raise MediaError(400, f"{name}: empty file (0 bytes)")
            file_id = f"file-{digest.hexdigest()[:24]}"
            with self._lock:
                os.replace(tmp, self.upload_dir / file_id)
                self._prune()
            return file_id
        finally:
            tmp.unlink(missing_ok=True)

    def _prune(self) -> None:
        stored = sorted((p for p in self.upload_dir.iterdir() if _FILE_ID.match(p.name)), key=lambda p: p.stat().st_mtime)
        for old in stored[: max(0, len(stored) - self.max_stored)]:
            old.unlink(missing_ok=True)

    def _limit(self) -> str:
        return f"{self.max_bytes / (1 << 20):.1f} MiB"

    # ---------------------------------------------------------------- resolving
    def resolve(self, url: str) -> Path:
        """The local file a content part's `url` names: `data:<mime>;base64,...`, an uploaded file's id
        (`file-...`, from `POST /v1/files`), `file:///abs/path` or a path (relative to the media root)."""
        if not isinstance(url, str) or not url:
            raise MediaError(400, "a video_url/image_url part needs a non-empty 'url'")
        if url.startswith("data:"):
            return self._from_data_url(url)
        if _FILE_ID.match(url):
            path = self.upload_dir / url
            if not path.is_file():
                raise MediaError(404, f"{url}: no such uploaded file (it may have been evicted; upload it again)")
            return path
        scheme = urlparse(url).scheme
        if scheme in ("http", "https", "ftp", "s3", "gs"):
            raise MediaError(400, f"{url}: remote URLs are not fetched by this server; upload the file "
                                  f"(POST /v1/files), send a data: URL, or use a path under the media root")
        return self._from_path(unquote(url[len("file://"):]) if scheme == "file" else url)

    def _from_path(self, raw: str) -> Path:
        if self.media_root is None:
            raise MediaError(403, f"{raw}: this server reads no local paths (start it with --media-root DIR)")
        path = (self.media_root / raw).resolve()  # an absolute `raw` replaces the root; checked next
        if path != self.media_root and self.media_root not in path.parents:
            raise MediaError(403, f"{raw}: outside the media root {self.media_root}")
        if not path.exists():
            raise MediaError(404, f"{raw}: no such file under the media root")
        if path.is_file() and path.stat().st_size > self.max_bytes:
            raise MediaError(413, f"{raw}: larger than the server's media limit of {self._limit()}")
        return path

    def _from_data_url(self, url: str) -> Path:
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise MediaError(400, "data: URL: expected data:<mime type>;base64,<data>")
        if len(payload) * 3 // 4 > self.max_bytes + 2:
            raise MediaError(413, f"data: URL: larger than the server's upload limit of {self._limit()}")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError(400, f"data: URL: invalid base64 ({e})") from None
        return self.upload_dir / self.store(io.BytesIO(raw), "data: URL")

    def listing(self, limit: int = 200) -> list[str]:
        """Video and image files under the media root (relative paths, sorted), for the web page's picker."""
        if self.media_root is None:
            return []
        found = []
        for path in sorted(self.media_root.rglob("*")):
            if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES + tuple(IMAGE_SUFFIXES):
                found.append(path.relative_to(self.media_root).as_posix())
                if len(found) >= limit:
                    break
        return found
