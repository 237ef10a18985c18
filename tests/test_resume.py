"""Resumable checkpoints on their own (one process, a tiny module): what is saved, what is restored, which
folders exist, in which order, and what a crash in the middle of a save leaves behind."""

from __future__ import annotations

import json
import pickle
import random
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vlm.train.resume as ckpts
from tests.train_helpers import Solo
from vlm.weights import CheckpointMismatchError
from vlm.train.resume import list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state


class Net(nn.Module):
    """A frozen part, a trainable part and dropout (the RNG matters)."""

    def __init__(self, trainable_head: bool = True):
        super().__init__()
        self.frozen = nn.Linear(6, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 1)
        self.drop = nn.Dropout(0.3)
        self.frozen.requires_grad_(False)
        self.head.requires_grad_(trainable_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.body(self.frozen(x)))))


def setup(seed: int = 0, trainable_head: bool = True):
    torch.manual_seed(seed)
    model = Net(trainable_head)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def step(model, opt, sched) -> float:
    """One step whose data comes from all three global RNGs (python, numpy, torch) plus dropout."""
    x = torch.randn(4, 6) + float(np.random.rand()) + random.random()
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def draws() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), float(np.random.randn()),
            torch.rand(3).tolist(), torch.randn(2).tolist())


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# ---------------------------------------------------------------- RNG
def test_rng_state_round_trip_through_disk(tmp_path):
    seed_all(3)
    random.gauss(0, 1)  # python caches the second gaussian of a pair
    np.random.randn()  # so does numpy's legacy generator: the cache is part of the state
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = draws()
    seed_all(99)
    draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected
    set_rng_state(state)  # and from memory
    assert draws() == expected


# ---------------------------------------------------------------- save -> load -> continue
def test_resume_from_a_checkpoint_continues_exactly_like_the_uninterrupted_run(tmp_path):
    seed_all(0)
    model, opt, sched = setup()
    frozen_start = {k: v.clone() for k, v in model.frozen.state_dict().items()}
    reference = [step(model, opt, sched) for _ in range(2)]
    position = {"step": 2, "epoch": 1, "batch": 5, "skipped": 3}
    path = save_checkpoint(Solo(), model, opt, sched, position, tmp_path, keep_last=2, deepspeed=False)
    assert path == tmp_path / "step-0000002"
    assert names(path) == ["optimizer.pt", "rng-0.pt", "scheduler.pt", "state.json", "trainable.safetensors"]
    saved = load_file(str(path / "trainable.safetensors"))
    assert sorted(saved) == ["body.bias", "body.weight", "head.bias", "head.weight"]  # trainable only
    for n, t in saved.items():
        assert torch.equal(t, model.get_parameter(n).detach())
    reference += [step(model, opt, sched) for _ in range(3)]

    seed_all(1)  # another process: other RNG states, a different trainable init, a fresh optimizer
    model2, opt2, sched2 = setup(seed=1)
    model2.frozen.load_state_dict(frozen_start)  # frozen weights come from the stage's starting point
    got = load_checkpoint(Solo(), model2, opt2, sched2, path, deepspeed=False)
    assert got == position
    assert sched2.last_epoch == 2 and sched2.get_last_lr() == pytest.approx([1e-2 / 3])
    assert all(s["step"] == 2 for s in opt2.state_dict()["state"].values())
    assert all(torch.equal(v, frozen_start[k]) for k, v in model2.frozen.state_dict().items())  # untouched
    resumed = [step(model2, opt2, sched2) for _ in range(3)]
    assert resumed == reference[2:]  # bit-exact: parameters, Adam moments, schedule and every RNG restored
    assert torch.equal(model2.head.weight, model.head.weight)


def test_load_refuses_a_checkpoint_with_other_trainable_parameters(tmp_path):
    model, opt, sched = setup()
    step(model, opt, sched)
    path = save_checkpoint(Solo(), model, opt, sched, {"step": 1}, tmp_path, keep_last=1, deepspeed=False)
    other, o2, s2 = setup(trainable_head=False)  # the checkpoint has head.* the model does not train
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \['head.bias', 'head.weight'\]"):
        load_checkpoint(Solo(), other, o2, s2, path, deepspeed=False)
    bigger, o3, s3 = setup()
    bigger.frozen.requires_grad_(True)  # the model trains more than the checkpoint holds
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \['frozen.bias', 'frozen.weight'\]"):
        load_checkpoint(Solo(), bigger, o3, s3, path, deepspeed=False)
    wide, o4, s4 = setup()
    wide.head = nn.Linear(6, 2)
    with pytest.raises(CheckpointMismatchError, match=r"key 'head.weight': checkpoint shape \(1, 6\) != model shape \(2, 6\)"):
        load_checkpoint(Solo(), wide, o4, s4, path, deepspeed=False)
    assert str(path) in str(pytest.raises(CheckpointMismatchError, load_checkpoint, Solo(), other, o2, s2, path, False).value)


# ---------------------------------------------------------------- folders: names, order, pruning, atomicity
def test_keep_last_keeps_exactly_the_newest_and_names_sort_by_step(tmp_path):
    model, opt, sched = setup()
    for s in (1, 2, 9, 10, 11):
        save_checkpoint(Solo(), model, opt, sched, {"step": s}, tmp_path, keep_last=3, deepspeed=False)
    assert names(tmp_path) == ["step-0000009", "step-0000010", "step-0000011"]  # no temporary folder left
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000009", "step-0000010", "step-0000011"]
    assert [json.loads((p / "state.json").read_text())["step"] for p in list_checkpoints(tmp_path)] == [9, 10, 11]
    save_checkpoint(Solo(), model, opt, sched, {"step": 100}, tmp_path, keep_last=2, deepspeed=False)
    assert names(tmp_path) == ["step-0000011", "step-0000100"]
    save_checkpoint(Solo(), model, opt, sched, {"step": 101}, tmp_path, keep_last=1, deepspeed=False)
    assert names(tmp_path) == ["step-0000101"]
    other = tmp_path / "other"
    for s in (10, 9, 100, 2):  # listed by step whatever the creation order
        save_checkpoint(Solo(), model, opt, sched, {"step": s}, other, keep_last=10, deepspeed=False)
    assert [p.name for p in list_checkpoints(other)] == ["step-0000002", "step-0000009", "step-0000010", "step-0000100"]
    assert list_checkpoints(tmp_path / "nothing") == []


def test_only_complete_checkpoints_are_listed(tmp_path):
    model, opt, sched = setup()
    save_checkpoint(Solo(), model, opt, sched, {"step": 4}, tmp_path, keep_last=5, deepspeed=False)
    (tmp_path / "step-0000006").mkdir()  # a folder without state.json (copied in part, or written by hand)
    (tmp_path / "step-0000006" / "trainable.safetensors").write_bytes(b"")
    (tmp_path / ".tmp-step-0000008").mkdir()  # a save that died before its rename
    (tmp_path / ".tmp-step-0000008" / "state.json").write_text("{}")
    for bad in ("step-12", "step-00000123", "xstep-0000009", "step-0000009.old"):
        (tmp_path / bad).mkdir()
        (tmp_path / bad / "state.json").write_text("{}")
    (tmp_path / "step-0000007").write_text("a file")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000004"]


def test_a_crash_during_a_save_leaves_the_previous_checkpoints_usable(tmp_path, monkeypatch):
    model, opt, sched = setup()
    step(model, opt, sched)
    first = save_checkpoint(Solo(), model, opt, sched, {"step": 1}, tmp_path, keep_last=1, deepspeed=False)
    before = load_file(str(first / "trainable.safetensors"))
    step(model, opt, sched)
    real_save = torch.save

    def dies_on_the_optimizer(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpts.torch, "save", dies_on_the_optimizer)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(Solo(), model, opt, sched, {"step": 2}, tmp_path, keep_last=1, deepspeed=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000001"]  # not pruned, not replaced
    assert not (tmp_path / "step-0000002").exists()
    for n, t in load_file(str(first / "trainable.safetensors")).items():
        assert torch.equal(t, before[n])
    monkeypatch.setattr(ckpts.torch, "save", real_save)
    fresh, o2, s2 = setup(seed=5)
    assert load_checkpoint(Solo(), fresh, o2, s2, list_checkpoints(tmp_path)[-1], deepspeed=False) == {"step": 1}
    leftover = tmp_path / ".tmp-step-0000002"
    assert "trainable.safetensors" in names(leftover)
    (leftover / "zero_pp_rank_1_optim_states.pt").write_bytes(b"from the dead save")
    path = save_checkpoint(Solo(), model, opt, sched, {"step": 2}, tmp_path, keep_last=1, deepspeed=False)  # a retry
    assert names(tmp_path) == ["step-0000002"]
    assert names(path) == ["optimizer.pt", "rng-0.pt", "scheduler.pt", "state.json", "trainable.safetensors"]


def test_saving_a_step_again_replaces_it(tmp_path):
    model, opt, sched = setup()
    save_checkpoint(Solo(), model, opt, sched, {"step": 3, "batch": 1}, tmp_path, keep_last=2, deepspeed=False)
    (tmp_path / "step-0000003" / "stale.txt").write_text("from the first save")
    step(model, opt, sched)
    path = save_checkpoint(Solo(), model, opt, sched, {"step": 3, "batch": 2}, tmp_path, keep_last=2, deepspeed=False)
    assert names(tmp_path) == ["step-0000003"] and not (path / "stale.txt").exists()
    assert json.loads((path / "state.json").read_text())["batch"] == 2
    assert torch.equal(load_file(str(path / "trainable.safetensors"))["head.weight"], model.head.weight.detach())


# ---------------------------------------------------------------- DeepSpeed: the engine's own checkpoint
def fake_deepspeed_checkpoint(ckpt: Path, shapes: list[dict[str, tuple[int, ...]]] | None,
                              module: dict[str, torch.Tensor] | None = None, buffers: list[str] | None = None) -> None:
    """The file DeepSpeed writes beside its optimizer shards (only what the check reads from it)."""
    (ckpt / "pytorch_model").mkdir(parents=True)
    state = {"module": module or {}, "buffer_names": buffers or [], "ds_version": "0.19.8",
             "param_shapes": None if shapes is None else [OrderedDict((n, torch.Size(s)) for n, s in g.items()) for g in shapes]}
    torch.save(state, ckpt / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    (ckpt / "state.json").write_text(json.dumps({"step": 7}))


def test_deepspeed_checkpoints_are_saved_by_the_engine_without_frozen_weights(tmp_path):
    model, opt, sched = setup()
    acc = Solo()
    path = save_checkpoint(acc, model, opt, sched, {"step": 5}, tmp_path, keep_last=2, deepspeed=True)
    assert acc.calls == [("save_state", str(tmp_path / ".tmp-step-0000005"), {"exclude_frozen_parameters": True})]
    assert names(path) == ["engine.bin", "state.json"]  # the engine's files, nothing of ours but the position


def test_deepspeed_load_checks_the_trainable_names_and_shapes_first(tmp_path):
    model, opt, sched = setup()
    trainable = {"body.weight": (6, 6), "body.bias": (6,), "head.weight": (1, 6), "head.bias": (1,)}
    good = tmp_path / "good"
    fake_deepspeed_checkpoint(good, [{k: trainable[k] for k in ("body.weight", "body.bias")},
                                     {k: trainable[k] for k in ("head.weight", "head.bias")}])
    acc = Solo()
    assert load_checkpoint(acc, model, opt, sched, good, deepspeed=True) == {"step": 7}
    assert acc.calls == [("load_state", str(good), {"load_module_strict": False})]

    cases = {
        "other": ([{"body.weight": (6, 6), "body.bias": (6,), "tail.weight": (1, 6), "tail.bias": (1,)}],
                  r"missing keys \['head.bias', 'head.weight'\]; unexpected keys \['tail.bias', 'tail.weight'\]"),
        "frozen": ([dict(trainable, **{"frozen.weight": (6, 6)})], r"unexpected keys \['frozen.weight'\]"),
        "fewer": ([{"body.weight": (6, 6), "body.bias": (6,)}], r"missing keys \['head.bias', 'head.weight'\]"),
        "shape": ([dict(trainable, **{"head.weight": (2, 6)})], r"key 'head.weight': checkpoint shape \(2, 6\) != model shape \(1, 6\)"),
    }
    for name, (shapes, message) in cases.items():
        fake_deepspeed_checkpoint(tmp_path / name, shapes)
        acc = Solo()
        with pytest.raises(CheckpointMismatchError, match=message) as err:
            load_checkpoint(acc, model, opt, sched, tmp_path / name, deepspeed=True)
        assert str(tmp_path / name) in str(err.value) and acc.calls == []  # refused before anything is loaded

    # ZeRO-3 partitions parameters: their full shape is `ds_shape`
    model.head.weight.ds_shape = torch.Size([1, 6])
    model.head.weight.data = torch.empty(0)
    assert load_checkpoint(Solo(), model, opt, sched, good, deepspeed=True) == {"step": 7}
    model.head.weight.ds_shape = torch.Size([3, 6])
    with pytest.raises(CheckpointMismatchError, match=r"model shape \(3, 6\)"):
        load_checkpoint(Solo(), model, opt, sched, good, deepspeed=True)

    # without ZeRO there are no param_shapes: the module state holds the trainable parameters and the buffers
    plain, o2, s2 = setup()
    module = {n: torch.zeros(s) for n, s in trainable.items()} | {"norm.running_mean": torch.zeros(6)}
    fake_deepspeed_checkpoint(tmp_path / "nozero", None, module, buffers=["norm.running_mean"])
    assert load_checkpoint(Solo(), plain, o2, s2, tmp_path / "nozero", deepspeed=True) == {"step": 7}
    fake_deepspeed_checkpoint(tmp_path / "nozero-bad", None, {"body.weight": torch.zeros(6, 6)})
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \['body.bias', 'head.bias', 'head.weight'\]"):
        load_checkpoint(Solo(), plain, o2, s2, tmp_path / "nozero-bad", deepspeed=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no DeepSpeed model states"):
        load_checkpoint(Solo(), plain, o2, s2, tmp_path / "empty", deepspeed=True)


# ---------------------------------------------------------------- RNG: the saved format and the CUDA generators
def test_rng_state_holds_every_generator_as_plain_tensors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seed_all(11)
    state = rng_state()
    assert sorted(state) == ["cuda", "numpy", "python", "torch"]
    assert state["cuda"] == []  # no CUDA: nothing to save
    name, keys, pos, has_gauss, cached = state["numpy"]
    mt = np.random.get_state()
    assert name == "MT19937" and (pos, has_gauss, cached) == (mt[2], mt[3], mt[4])
    assert keys.dtype == torch.int64 and keys.shape == (624,)  # the 624 Mersenne Twister words, widened
    assert keys.tolist() == mt[1].astype(np.int64).tolist()
    assert state["python"][1] == list(random.getstate()[1])
    assert torch.equal(state["torch"], torch.get_rng_state())


class FakeCuda:
    """CUDA's generator functions, recorded (the checkpoints run on CPU here)."""

    def __init__(self, monkeypatch, available: bool):
        self.states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)]
        self.got: list = []
        self.set: list = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: self.got.append(1) or [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: self.set.append([s.tolist() for s in states]))


def test_cuda_generators_are_saved_and_restored_when_cuda_is_there(tmp_path, monkeypatch):
    cuda = FakeCuda(monkeypatch, available=True)
    state = rng_state()
    assert [s.tolist() for s in state["cuda"]] == [[1, 2, 3], [4, 5]]
    set_rng_state(state)
    assert cuda.set == [[[1, 2, 3], [4, 5]]]
    model, opt, sched = setup()
    path = save_checkpoint(Solo(), model, opt, sched, {"step": 1}, tmp_path, keep_last=1, deepspeed=False)
    cuda.set.clear()
    load_checkpoint(Solo(), model, opt, sched, path, deepspeed=False)  # through the file
    assert cuda.set == [[[1, 2, 3], [4, 5]]]
    cuda.set.clear()
    set_rng_state(dict(state, cuda=[]))  # a checkpoint written without CUDA: the generators stay as they are
    assert cuda.set == []


def test_cuda_generators_are_left_alone_without_cuda(monkeypatch):
    cuda = FakeCuda(monkeypatch, available=False)
    state = rng_state()
    assert state["cuda"] == [] and cuda.got == []  # not even asked
    set_rng_state(dict(state, cuda=[torch.tensor([9], dtype=torch.uint8)]))  # a GPU run resumed on CPU
    assert cuda.set == []


# ---------------------------------------------------------------- what a checkpoint file may hold
class Payload:
    """Pickled code: unpickling it runs `_ran`, which leaves a file behind."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (_ran, (str(self.marker),))


def _ran(marker: str) -> None:
    Path(marker).write_text("code from a checkpoint ran")


def test_loading_never_runs_code_pickled_into_a_checkpoint(tmp_path, monkeypatch):
    """Only tensors and plain values load, even where a user forces torch.load's unsafe default."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    model, opt, sched = setup()
    step(model, opt, sched)
    marker = tmp_path / "ran.txt"
    for n, file in enumerate(("optimizer.pt", "scheduler.pt", "rng-0.pt")):
        path = save_checkpoint(Solo(), model, opt, sched, {"step": n}, tmp_path / "ckpts", keep_last=5, deepspeed=False)
        torch.save(Payload(marker), path / file)
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            load_checkpoint(Solo(), model, opt, sched, path, deepspeed=False)
        assert not marker.exists(), file
    ds = tmp_path / "ds"
    fake_deepspeed_checkpoint(ds, [{"body.weight": (6, 6)}])
    torch.save(Payload(marker), next((ds / "pytorch_model").glob("*model_states.pt")))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(Solo(), model, opt, sched, ds, deepspeed=True)
    assert not marker.exists()


# ---------------------------------------------------------------- DeepSpeed: reading the shapes
def test_deepspeed_shapes_are_read_on_cpu_lazily_from_a_gpu_written_checkpoint(tmp_path, monkeypatch):
    trainable = {"body.weight": (6, 6), "body.bias": (6,), "head.weight": (1, 6), "head.bias": (1,)}
    real_tag = torch.serialization.location_tag
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")  # as a GPU run writes it
    fake_deepspeed_checkpoint(tmp_path / "gpu", None, {n: torch.zeros(s) for n, s in trainable.items()})
    monkeypatch.setattr(torch.serialization, "location_tag", real_tag)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # resumed (or inspected) on a CPU-only machine
    assert ckpts.deepspeed_trainable_shapes(tmp_path / "gpu") == trainable
    real_load, calls = torch.load, []
    monkeypatch.setattr(ckpts.torch, "load", lambda f, **k: calls.append(k) or real_load(f, **k))
    model, opt, sched = setup()
    assert load_checkpoint(Solo(), model, opt, sched, tmp_path / "gpu", deepspeed=True) == {"step": 7}
    # mapped to the CPU, only tensors and plain values, and memory-mapped: a ZeRO-less module state can be the
    # whole model, and only its shapes are wanted
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]


def test_deepspeed_shape_check_allocates_nothing(tmp_path):
    """The check compares shapes only: a 2**50-element parameter (4 PiB in fp32) would never fit in memory."""
    model, opt, sched = setup()
    huge = (1 << 50,)
    model.head.weight.ds_shape = torch.Size(huge)  # ZeRO-3: the full shape of a partitioned parameter
    model.head.weight.data = torch.empty(0)
    fake_deepspeed_checkpoint(tmp_path / "ckpt", [{"body.weight": (6, 6), "body.bias": (6,), "head.weight": huge, "head.bias": (1,)}])
    acc = Solo()
    assert load_checkpoint(acc, model, opt, sched, tmp_path / "ckpt", deepspeed=True) == {"step": 7}
    assert acc.calls == [("load_state", str(tmp_path / "ckpt"), {"load_module_strict": False})]


# ---------------------------------------------------------------- the position file and pruning
def test_state_json_is_the_position_indented_for_people(tmp_path):
    model, opt, sched = setup()
    path = save_checkpoint(Solo(), model, opt, sched, {"step": 3, "epoch": 0, "batch": [1, 2]}, tmp_path,
                           keep_last=1, deepspeed=False)
    assert (path / "state.json").read_text() == '{\n  "step": 3,\n  "epoch": 0,\n  "batch": [\n    1,\n    2\n  ]\n}'


def test_a_checkpoint_that_cannot_be_pruned_does_not_fail_the_save(tmp_path, monkeypatch):
    model, opt, sched = setup()
    for s in (1, 2):
        save_checkpoint(Solo(), model, opt, sched, {"step": s}, tmp_path, keep_last=2, deepspeed=False)
    real_rmtree = shutil.rmtree

    def another_job_pruned_it_first(path, *a, **k):
        if Path(path).name == "step-0000001":
            real_rmtree(path)
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", another_job_pruned_it_first)
    path = save_checkpoint(Solo(), model, opt, sched, {"step": 3}, tmp_path, keep_last=2, deepspeed=False)
    assert path == tmp_path / "step-0000003"
    assert names(tmp_path) == ["step-0000002", "step-0000003"]
