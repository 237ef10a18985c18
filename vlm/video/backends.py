"""The backend interface and registry, plus the backends for stills: frame folders, GIFs and single images.

A backend opens one source and decodes exact frame positions. Video files live in `pyav_backend.py`
(our PyAV keyframe planner) and `decord_backend.py`.
"""

from __future__ import annotations

import logging
import os
import re
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from vlm.registry import Registry
from vlm.video.clip import VideoInfo
from vlm.video.errors import VideoDecodeError

logger = logging.getLogger(__name__)

DEFAULT_FRAME_FOLDER_FPS = 3.0  # MVBench's TVQA frame folders are sampled at 3 fps
DEFAULT_GIF_FPS = 10.0  # what browsers play a GIF without frame delays at
DEFAULT_IMAGE_FPS = 1.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_FRAME_FILE = re.compile(r"^(\d+)\.(jpe?g|png)$", re.IGNORECASE)


class Backend(ABC):
    """One opened source. `read` takes sorted, unique, in-range positions and returns their frames."""

    registry_name: ClassVar[str]  # set by @register_backend; what `VideoInfo.backend` reports
    path: str
    info: VideoInfo

    @abstractmethod
    def read(self, indices: np.ndarray) -> np.ndarray:
        """Frames uint8 [K, H, W, 3] RGB at `indices` (int64 [K], ascending, unique, in range)."""

    @abstractmethod
    def timestamps(self, indices: np.ndarray) -> np.ndarray:
        """Seconds (float64 [K]) of the frames at `indices`, from the source's first frame."""

    def close(self) -> None:
        """Release files and decoder state; reading afterwards is an error."""


BACKENDS: Registry[type[Backend]] = Registry("video backend", Backend)
register_backend = BACKENDS.register


def positive_fps(path: str, fps: float | None, default: float) -> float:
    value = default if fps is None else float(fps)
    if not value > 0 or not np.isfinite(value):
        raise ValueError(f"{path}: fps must be > 0, got {fps!r}")
    return value


def _load_rgb(path: str) -> np.ndarray:
    """One image file as uint8 [H, W, 3] RGB."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise VideoDecodeError(path, "file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise VideoDecodeError(path, f"not a readable image ({e})") from None


@register_backend("frames")
class FrameFolderBackend(Backend):
    """A folder of numbered images (`00001.jpg, 00002.jpg, ...`), contiguous from 1 (or 0); default 3 fps."""

    def __init__(self, path: str, fps: float | None = None):
        self.path = path
        fps_ = positive_fps(path, fps, DEFAULT_FRAME_FOLDER_FPS)
        if not os.path.isdir(path):
            raise VideoDecodeError(path, "not a frame folder")
        numbered: dict[int, str] = {}
        for entry in os.scandir(path):
            m = _FRAME_FILE.match(entry.name)
            if m and entry.is_file():
                number = int(m.group(1))
                if number in numbered:
                    raise VideoDecodeError(path, f"two frames numbered {number}: {numbered[number]}, {entry.name}")
                numbered[number] = entry.name
        if not numbered:
            raise VideoDecodeError(path, "empty frame folder (no numbered .jpg/.png frames such as 00001.jpg)")
        first = min(numbered)
        if first not in (0, 1):
            raise VideoDecodeError(path, f"frame numbers start at {first}, expected 1 (or 0)")
        last = max(numbered)
        if last - first + 1 != len(numbered):
            missing = next(i for i in range(first, last + 1) if i not in numbered)
            raise VideoDecodeError(
                path,
                f"gap in frame folder: frame {missing} is missing ({len(numbered)} frames numbered {first}..{last})",
            )
        self.files = [os.path.join(path, numbered[i]) for i in range(first, last + 1)]
        height, width = _load_rgb(self.files[0]).shape[:2]
        n = len(self.files)
        self.info = VideoInfo(n, fps_, n / fps_, width, height, self.registry_name)

    def read(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), self.info.height, self.info.width, 3), np.uint8)  # [K, H, W, 3]
        for k, i in enumerate(indices):
            frame = _load_rgb(self.files[int(i)])
            if frame.shape != out.shape[1:]:
                raise VideoDecodeError(
                    self.files[int(i)], f"frame size {frame.shape[1]}x{frame.shape[0]} differs from the first frame's"
                )
            out[k] = frame
        return out

    def timestamps(self, indices: np.ndarray) -> np.ndarray:
        return indices.astype(np.float64) / self.info.fps


@register_backend("gif")
class GifBackend(Backend):
    """An animated (or still) GIF; frame times come from the GIF's frame delays."""

    def __init__(self, path: str, fps: float | None = None):
        self.path = path
        try:
            with Image.open(path) as im:
                if im.format != "GIF":
                    raise VideoDecodeError(path, f"not a GIF (PIL reads it as {im.format})")
                width, height = im.size
                delays_ms = [float(frame.info.get("duration") or 0.0) for frame in ImageSequence.Iterator(im)]
        except FileNotFoundError:
            raise VideoDecodeError(path, "file not found") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise VideoDecodeError(path, f"not a readable GIF ({e})") from None
        n = len(delays_ms)
        if fps is not None or not all(d > 0 for d in delays_ms):
            fps_ = positive_fps(path, fps, DEFAULT_GIF_FPS)
            self._starts = np.arange(n, dtype=np.float64) / fps_  # [n]
            duration = n / fps_
        else:
            self._starts = np.concatenate([[0.0], np.cumsum(delays_ms[:-1])]) / 1000.0  # [n]
            duration = sum(delays_ms) / 1000.0
            fps_ = n / duration
        self.info = VideoInfo(n, fps_, duration, width, height, self.registry_name)

    def read(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), self.info.height, self.info.width, 3), np.uint8)  # [K, H, W, 3]
        try:
            with Image.open(self.path) as im:
                for k, i in enumerate(indices):
                    im.seek(int(i))  # ascending: PIL decodes forward from the last position
                    out[k] = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as e:
            raise VideoDecodeError(self.path, f"GIF frame could not be decoded ({e})") from None
        return out

    def timestamps(self, indices: np.ndarray) -> np.ndarray:
        return self._starts[indices]


@register_backend("image")
class ImageBackend(Backend):
    """A single image read as a 1-frame clip (an image is a 1-frame video)."""

    def __init__(self, path: str, fps: float | None = None):
        self.path = path
        fps_ = positive_fps(path, fps, DEFAULT_IMAGE_FPS)
        self._frame = _load_rgb(path)  # [H, W, 3]
        height, width = self._frame.shape[:2]
        self.info = VideoInfo(1, fps_, 1.0 / fps_, width, height, self.registry_name)

    def read(self, indices: np.ndarray) -> np.ndarray:
        return np.repeat(self._frame[None], len(indices), axis=0)  # [K, H, W, 3]

    def timestamps(self, indices: np.ndarray) -> np.ndarray:
        return indices.astype(np.float64) / self.info.fps
