"""Strict, atomic weight files: every mismatch names the part, the key and the reason."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class CheckpointMismatchError(ValueError):
    """Saved weights do not fit the model part they are loaded into."""


def check_state_dict(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], part: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key in sorted(set(expected) & set(found)):
        if tuple(expected[key].shape) != tuple(found[key].shape):
            problems.append(f"key '{key}': checkpoint shape {tuple(found[key].shape)} != model shape {tuple(expected[key].shape)}")
    if problems:
        raise CheckpointMismatchError(f"{part}: " + "; ".join(problems))


def save_tensors(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def load_module(module: nn.Module, path: str | os.PathLike, part: str) -> None:
    """Load a safetensors file into `module`, strictly: same keys, same shapes."""
    state = load_file(str(path))
    check_state_dict(module.state_dict(), state, f"{part} ({path})")
    module.load_state_dict(state, strict=True)


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
