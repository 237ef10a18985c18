"""Resumable training checkpoints: atomic (written to a temporary folder, then renamed), last K kept.

Without DeepSpeed a checkpoint holds the trainable parameters only (frozen weights are rebuilt from the
stage's starting point), the optimizer and scheduler states, every process's RNG states and the training
position. Under DeepSpeed, `accelerator.save_state` writes the engine's own (ZeRO-partitioned) checkpoint,
without frozen parameters. Loading either kind refuses a checkpoint whose parameter names or shapes differ from
the model's trainable ones.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlm.weights import check_state_dict

_NAME = re.compile(r"^step-(\d{7})$")


def rng_state() -> dict[str, Any]:
    """Every RNG of this process as tensors and plain values (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name) and (p / "state.json").is_file())


def deepspeed_trainable_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter a DeepSpeed checkpoint written by `save_checkpoint` holds: its ZeRO
    `param_shapes` (the optimizer's parameters), or without ZeRO the module state less its buffers."""
    files = sorted(Path(ckpt).glob("pytorch_model/*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt}: no DeepSpeed model states (pytorch_model/*model_states.pt)")
    states = torch.load(files[0], map_location="cpu", weights_only=True, mmap=True)
    if states.get("param_shapes") is not None:
        return {n: tuple(s) for group in states["param_shapes"] for n, s in group.items()}
    buffers = set(states.get("buffer_names") or [])
    return {n: tuple(t.shape) for n, t in states["module"].items() if n not in buffers}


def save_checkpoint(accelerator: Any, model: Any, optimizer: Any, scheduler: Any, position: dict[str, Any],
                    folder: Path, keep_last: int, deepspeed: bool) -> Path:
    """Collective: every process calls it. Returns the checkpoint folder."""
    target = folder / f"step-{position['step']:07d}"
    tmp = folder / f".tmp-{target.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if deepspeed:
        accelerator.save_state(str(tmp), exclude_frozen_parameters=True)
    else:
        torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            inner = accelerator.unwrap_model(model)
            trainable = {n: p.detach().cpu().contiguous() for n, p in inner.named_parameters() if p.requires_grad}
            save_file(trainable, str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps(position, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        for old in list_checkpoints(folder)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(accelerator: Any, model: Any, optimizer: Any, scheduler: Any, ckpt: Path,
                    deepspeed: bool) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote; returns the training position."""
    inner = accelerator.unwrap_model(model)
    if deepspeed:
        expected = {n: torch.empty(tuple(getattr(p, "ds_shape", p.shape)), device="meta")  # ZeRO-3: full shape
                    for n, p in inner.named_parameters() if p.requires_grad}
        found = {n: torch.empty(s, device="meta") for n, s in deepspeed_trainable_shapes(ckpt).items()}
        check_state_dict(expected, found, f"trainable parameters ({ckpt})")
        # The engine's checkpoint holds the trainable parameters only (saved with exclude_frozen_parameters), so
        # its module state cannot load strictly; the checks above make any other key or shape an error.
        accelerator.load_state(str(ckpt), load_module_strict=False)
    else:
        state = load_file(str(ckpt / "trainable.safetensors"))
        expected = {n: p for n, p in inner.named_parameters() if p.requires_grad}
        check_state_dict(expected, state, f"trainable parameters ({ckpt})")
        with torch.no_grad():
            for n, p in expected.items():
                p.copy_(state[n])
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        rng_file = ckpt / f"rng-{accelerator.process_index}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((ckpt / "state.json").read_text())
