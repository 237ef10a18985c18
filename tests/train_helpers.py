"""Tiny data and recipes for the training tests, a one-process stand-in for the accelerator, and `vlm` commands run
in subprocesses (one of them killed with SIGKILL in the middle of a run)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from tests.conftest import TINY_LLM, TINY_TOWERS
from vlm.video import write_video

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def make_tiny_data(root: Path, n: int = 8, frames: int = 4, bad: bool = True) -> dict[str, Path]:
    """n short clips of a coloured square moving left or right, a caption file, an instruction file and the caption
    records with the clips' ground truth (regions.json)."""
    (root / "videos").mkdir(parents=True, exist_ok=True)
    captions, instruct = [], []
    for i in range(n):
        color = list(COLORS)[i % 4]
        direction = "right" if i % 2 == 0 else "left"
        video = np.full((frames, 32, 32, 3), 90, dtype=np.uint8)
        for t in range(frames):
            x = 4 + 5 * t if direction == "right" else 24 - 5 * t
            video[t, 12:20, x:x + 6] = COLORS[color]
        write_video(root / "videos" / f"v{i}.mp4", video, fps=4)
        captions.append({"id": f"cap{i}", "video": f"videos/v{i}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nDescribe the video."},
            {"from": "gpt", "value": f"A {color} square moves to the {direction}."}]})
        instruct.append({"id": f"ins{i}", "video": f"videos/v{i}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhich way does the square move?"},
            {"from": "gpt", "value": direction.capitalize() + "."}]})
    if bad:
        captions.append({"id": "missing", "video": "videos/nope.mp4", "conversations": [
            {"from": "human", "value": "<video>\nDescribe."}, {"from": "gpt", "value": "Nothing."}]})
        (root / "videos" / "broken.mp4").write_text("not a video")
        captions.append({"id": "broken", "video": "videos/broken.mp4", "conversations": [
            {"from": "human", "value": "<video>\nDescribe."}, {"from": "gpt", "value": "Nothing."}]})
        captions.append({"id": "noplaceholder", "video": "videos/v0.mp4", "conversations": [
            {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Nothing."}]})
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "instruct.jsonl").write_text("\n".join(json.dumps(r) for r in instruct) + "\n")
    regions = [dict(r, regions=square_regions(int(r["id"][3:]) if r["id"].startswith("cap") else 0, frames))
               for r in captions]  # the bad records stay bad, with regions
    (root / "regions.json").write_text(json.dumps(regions))
    return {"captions": root / "captions.json", "instruct": root / "instruct.jsonl", "regions": root / "regions.json"}


def square_regions(i: int, frames: int) -> list[dict[str, Any]]:
    """Clip i's ground truth as per-frame annotations (vlm.data.regions): the square's centre, colour, shape, size
    and motion."""
    right = i % 2 == 0
    return [{"t": t / 4, "scene": {"tone": "gray", "tone2": "none", "pattern": "solid"},
             "objects": [{"center": [((4 + 5 * t if right else 24 - 5 * t) + 3) / 32, 0.5],
                          "color": list(COLORS)[i % 4], "shape": "square", "size": "small",
                          "action": "moves right" if right else "moves left"}]} for t in range(frames)]


def tiny_recipe(data: dict[str, Path], out: Path, **stage_overrides: Any) -> dict[str, Any]:
    stage1 = {"name": "align", "parts": {"connector": {"mode": "full", "lr": 1e-3}},
              "data": {"mixture": [{"path": str(data["captions"])}], "frames": 4},
              "batch_size": 2, "max_steps": 4, "precision": "fp32", "schedule": {"warmup_steps": 1}}
    stage2 = {"name": "instruct", "parts": {"connector": {"mode": "full", "lr": 1e-3},
                                            "llm": {"mode": "lora", "lr": 1e-3, "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}}},
              "data": {"mixture": [{"path": str(data["instruct"]), "weight": 2.0}], "frames": 4},
              "batch_size": 2, "max_steps": 3, "precision": "fp32"}
    for s in (stage1, stage2):
        s.update(copy.deepcopy(stage_overrides))
    return {"name": "tiny", "output_dir": str(out), "seed": 0,
            "model": {"tower": copy.deepcopy(TINY_TOWERS["clip"]), "connector": {"name": "mlp"},
                      "llm": copy.deepcopy(TINY_LLM), "num_frames": 4, "max_length": 256},
            "stages": [stage1, stage2]}


class Solo:
    """The part of an accelerate.Accelerator the checkpoints use, for one process."""

    is_main_process = True
    process_index = 0

    def __init__(self):
        self.calls: list[tuple[str, str, dict]] = []

    def wait_for_everyone(self) -> None:
        pass

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def save_state(self, path: str, **kwargs) -> None:  # DeepSpeed's engine checkpoint, recorded only
        self.calls.append(("save_state", path, kwargs))
        (Path(path) / "engine.bin").write_bytes(b"engine")

    def load_state(self, path: str, **kwargs) -> None:
        self.calls.append(("load_state", path, kwargs))


REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

# `vlm <args>`, stopped for good (sleeping until killed) right after it logs step `step` of its first run of the
# loop; it touches `marker` first, so the test knows where the run is when it kills it.
_PAUSE = """
import sys, time
from pathlib import Path
from vlm.train.metrics import MetricsLog
from vlm.cli import main
step, marker, args = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
write = MetricsLog.write
def pausing_write(self, record):
    write(self, record)
    if record["step"] == step and not marker.exists():
        marker.touch()
        time.sleep(600)
MetricsLog.write = pausing_write
sys.exit(main(args))
"""


def run_vlm(args: list[str]) -> str:
    """`vlm <args>` in a fresh single-threaded process; returns its log (stderr), fails the test if it fails."""
    proc = subprocess.run([sys.executable, "-m", "vlm.cli", *args], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def kill_after_step(args: list[str], step: int, marker: Path, timeout: float = 300) -> None:
    """Run `vlm <args>` in a subprocess and SIGKILL it once it has logged optimizer step `step`."""
    log = marker.with_name(marker.name + ".log")
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _PAUSE, str(step), str(marker), *args], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.time() + timeout
            while not marker.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert marker.exists(), f"the run never reached step {step}: {log.read_text()[-3000:]}"
