"""Two CPU processes over gloo: DDP, DeepSpeed ZeRO-2 and ZeRO-3 train, checkpoint, resume and save reloadable parts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.train_helpers import Solo, make_tiny_data, tiny_recipe
from vlm.weights import CheckpointMismatchError
from vlm.model import VideoLLM
from vlm.train.resume import load_checkpoint
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
    proc = torchrun(tmp_path / "r.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained model:") == 1  # rank 0 reports
    for stage, steps in (("1-align", 4), ("2-instruct", 3)):
        rows = read_jsonl(tmp_path / "run" / stage / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
        assert (tmp_path / "run" / stage / "checkpoints" / f"step-{steps:07d}").is_dir()
    final = tmp_path / "run" / "2-instruct" / "final"
    # Saved parts are whole tensors, never empty ZeRO-3 partitions (LLaVA's GitHub issue 665), and they reload.
    connector = load_file(str(final / "connector.safetensors"))
    assert all(t.numel() > 0 for t in connector.values()) and any(t.abs().sum() > 0 for t in connector.values())
    lora = load_file(str(final / "llm_lora" / "adapter.safetensors"))
    assert lora and all(t.numel() > 0 for t in lora.values())
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in lora.items())  # LoRA B starts at zero: it trained
    # The reloaded model holds exactly the weights training ended with: those of the last checkpoint.
    model = VideoLLM.from_pretrained(final)
    params = dict(model.named_parameters())
    trained = trained_weights(tmp_path / "run" / "2-instruct" / "checkpoints" / "step-0000003", deepspeed)
    assert sorted(trained) == sorted(n for n in params if n.startswith("connector.") or "lora_" in n)
    for name, weight in trained.items():
        if deepspeed:  # the engine trains fp32 master weights and keeps (and saves) their bf16 copies
            weight = weight.to(torch.bfloat16)
        assert torch.equal(params[name].float(), weight.float()), name
    stage1 = load_file(str(tmp_path / "run" / "1-align" / "final" / "connector.safetensors"))
    assert any(not torch.equal(stage1[k].float(), v.float()) for k, v in model.connector.state_dict().items())
    # the frozen LLM left stage 2 as it entered it (whole tensors gathered from every partition)
    llm1, llm2 = (load_file(str(tmp_path / "run" / s / "final" / "llm.safetensors")) for s in ("1-align", "2-instruct"))
    assert llm1.keys() == llm2.keys() and all(torch.equal(llm1[k], llm2[k]) for k in llm1)


def trained_weights(ckpt: Path, deepspeed: str | None) -> dict[str, torch.Tensor]:
    """The trainable weights a checkpoint holds (DeepSpeed: its fp32 master weights, gathered from the shards)."""
    if not deepspeed:
        return load_file(str(ckpt / "trainable.safetensors"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="pytorch_model")


def torchrun(recipe: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(Path.home() / ".cache" / "vlm" / "torch_extensions"))
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return subprocess.run([exe, "--nproc_per_node", "2", "-m", "vlm.cli", "train", str(recipe)],
                          env=env, capture_output=True, text=True, timeout=600)


def test_zero3_resume_continues_the_loss_curve_and_refuses_other_parameters(tmp_path):
    """Two processes, ZeRO-3: a run that lost everything after step 2's checkpoint resumes from it with the same loss
    curve and final weights; the checkpoint's parameter names are checked against the model's trainable ones."""
    data = make_tiny_data(tmp_path / "data", bad=False)
    raw = tiny_recipe(data, tmp_path / "run", save_every=2, max_steps=4, precision="bf16",
                      deepspeed=str(REPO / "recipes" / "deepspeed" / "zero3.json"))
    raw["stages"] = raw["stages"][1:]  # connector + LoRA (dropout: the RNG states matter)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    proc = torchrun(tmp_path / "r.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage = tmp_path / "run" / "1-instruct"
    reference = [r["loss"] for r in read_jsonl(stage / "metrics.jsonl")]
    assert len(reference) == 4
    final = {f: load_file(str(stage / "final" / f)) for f in ("connector.safetensors", "llm_lora/adapter.safetensors")}

    # the disk as a kill during step 3 leaves it: checkpoint 2 (and the log up to step 3), no checkpoint 4, no model
    shutil.rmtree(stage / "final")
    shutil.rmtree(stage / "checkpoints" / "step-0000004")
    proc = torchrun(tmp_path / "r.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((stage / "stage.json").read_text())["resumed_from_step"] == 2
    assert [r["step"] for r in read_jsonl(stage / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [r["loss"] for r in read_jsonl(stage / "metrics.jsonl")] == pytest.approx(reference, abs=1e-6)
    for f, tensors in final.items():
        again = load_file(str(stage / "final" / f))
        assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors), f

    # the real ZeRO-3 checkpoint names exactly the trainable parameters; any other set is refused, naming the keys
    ckpt = stage / "checkpoints" / "step-0000002"
    model = VideoLLM.from_pretrained(stage / "final")
    trainable = set(trained_weights(ckpt, "zero3"))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    acc = Solo()
    assert load_checkpoint(acc, model, None, None, ckpt, deepspeed=True)["step"] == 2
    assert acc.calls == [("load_state", str(ckpt), {"load_module_strict": False})]
    model.connector.requires_grad_(False)  # e.g. a recipe that trains the LoRA only
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \['connector\.projector\.0\.bias'"):
        load_checkpoint(Solo(), model, None, None, ckpt, deepspeed=True)
    model.connector.requires_grad_(True)
    model.llm.get_input_embeddings().weight.requires_grad_(True)  # trains more than the checkpoint holds
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \[.*embed_tokens"):
        load_checkpoint(Solo(), model, None, None, ckpt, deepspeed=True)
