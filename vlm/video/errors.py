"""The one error type of the video layer."""

from __future__ import annotations

import os


class VideoDecodeError(RuntimeError):
    """A video (or frame folder, or GIF) could not be read; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple:  # travels from a DataLoader worker intact
        return type(self), (self.path, self.reason)
