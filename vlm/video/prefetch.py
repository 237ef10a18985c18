"""Clips decoded ahead of the model: a DataLoader over decode jobs, in order, errors returned rather than raised.

    for job, clip, error in prefetch_clips(groups, read, workers=2):
        ...  # clip is None and error the exception when the job's video could not be read

With `workers=0` the jobs are decoded in this process, one at a time, when they are asked for (no prefetch).
With workers, up to `workers * ahead` clips are decoded while the caller runs the model on earlier ones; each
job still decodes once, and the order of the jobs is kept.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, Sequence, TypeVar

from torch.utils.data import DataLoader, Dataset

from vlm.video.clip import Clip
from vlm.video.errors import VideoDecodeError

Job = TypeVar("Job")
# what a bad video raises (a missing file, an unreadable container, a window outside the video, a missing key)
READ_ERRORS = (VideoDecodeError, OSError, ValueError, KeyError)


class _Jobs(Dataset, Generic[Job]):
    def __init__(self, jobs: Sequence[Job], read: Callable[[Job], Clip]):
        self.jobs, self.read = jobs, read

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> tuple[int, Clip | None, BaseException | None]:
        try:
            return i, self.read(self.jobs[i]), None
        except READ_ERRORS as e:
            return i, None, e


def _as_is(item: object) -> object:
    return item


def prefetch_clips(jobs: Sequence[Job], read: Callable[[Job], Clip], *, workers: int = 0,
                   ahead: int = 2) -> Iterator[tuple[Job, Clip | None, BaseException | None]]:
    """(job, clip, None) or (job, None, error) per job, in order; `read` must be picklable (a module-level
    function or a functools.partial of one) when `workers` > 0."""
    if not jobs:
        return
    loader = DataLoader(_Jobs(jobs, read), batch_size=None, shuffle=False, num_workers=max(0, workers),
                        collate_fn=_as_is, prefetch_factor=ahead if workers > 0 else None)
    for i, clip, error in loader:
        yield jobs[i], clip, error
