"""Two CPU processes over gloo: DDP, DeepSpeed ZeRO-2 and ZeRO-3 train, checkpoint and save reloadable parts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.train_helpers import make_tiny_data, tiny_recipe
from vlm.model import VideoLLM
from vlm.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("deepspeed", [None, "zero2", "zero3"])
def test_two_process_training(tmp_path, deepspeed):
    data = make_tiny_data(tmp_path / "data", bad=True)
    raw = tiny_recipe(data, tmp_path / "run", save_every=2)
    for stage in raw["stages"]:
        stage["precision"] = "bf16"
        if deepspeed:
            stage["deepspeed"] = str(REPO / "recipes" / "deepspeed" / f"{deepspeed}.json")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(Path.home() / ".cache" / "vlm" / "torch_extensions"))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "vlm.cli", "train", str(tmp_path / "r.yaml")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained model:") == 1  # rank 0 reports
    for stage, steps in (("1-align", 4), ("2-instruct", 3)):
        rows = read_jsonl(tmp_path / "run" / stage / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
        assert (tmp_path / "run" / stage / "checkpoints" / f"step-{steps:07d}").is_dir()
    final = tmp_path / "run" / "2-instruct" / "final"
    # Saved parts are whole tensors, never empty ZeRO-3 partitions (LLaVA issue #665), and they reload.
    connector = load_file(str(final / "connector.safetensors"))
    assert all(t.numel() > 0 for t in connector.values()) and any(t.abs().sum() > 0 for t in connector.values())
    lora = load_file(str(final / "llm_lora" / "adapter.safetensors"))
    assert lora and all(t.numel() > 0 for t in lora.values())
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in lora.items())  # LoRA B starts at zero: it trained
    model = VideoLLM.from_pretrained(final)
    stage1 = load_file(str(tmp_path / "run" / "1-align" / "final" / "connector.safetensors"))
    assert any(not torch.equal(stage1[k].float(), v.float()) for k, v in model.connector.state_dict().items())
