"""Device and precision: one convention (CUDA + bfloat16 when a GPU is present, else CPU + float32) that reaches
every part of a loaded model, the chat's cached prefix, and every command that loads a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlm.data.conversation import Turn
from vlm.model import VideoLLM
from vlm.towers.common import placement
from vlm.video import Clip


def clip() -> Clip:
    frames = np.random.default_rng(0).integers(0, 255, (4, 40, 48, 3), dtype=np.uint8)
    return Clip(frames, np.arange(4) * 0.5, np.arange(4), "c", 2.0, 4)


def test_placement_defaults_follow_the_machine(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    gpu = torch.cuda.is_available()
    assert placement() == (torch.device("cuda" if gpu else "cpu"), torch.bfloat16 if gpu else torch.float32)
    assert placement("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert placement("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    assert placement("cuda:1", None) == (torch.device("cuda:1"), torch.bfloat16)  # no GPU needed to decide
    with pytest.raises(ValueError, match="unknown dtype"):
        placement("cpu", "float13")
    monkeypatch.setenv("LOCAL_RANK", "3")  # under torchrun each process takes its own GPU
    assert placement("cuda")[0] == torch.device("cuda:3") and placement("cuda:0")[0] == torch.device("cuda:0")
    assert placement("cpu")[0] == torch.device("cpu")


def test_every_part_and_the_chat_prefix_take_the_requested_dtype(tiny_model_dir):
    from evals.interface import ScoringRequest
    from vlm.chat import VideoChat

    ref = VideoLLM.from_pretrained(tiny_model_dir, device="cpu")  # float32 on the CPU: the default here
    low = VideoLLM.from_pretrained(tiny_model_dir, device="cpu", dtype="bfloat16")
    for part in ("tower", "connector", "llm"):
        assert {p.dtype for p in ref.part(part).parameters()} == {torch.float32}
        assert {p.dtype for p in low.part(part).parameters()} == {torch.bfloat16}, part
        assert {p.device.type for p in low.part(part).parameters()} == {"cpu"}
    req = ScoringRequest(uid="q", clip=clip(), turns=[Turn("user", "<video>\nWhat moves?")],
                         continuations=["a red square", "nothing at all"])
    want, got = ref.score_options([req])[0], low.score_options([req])[0]
    assert np.all(np.isfinite(got)) and np.allclose(got, want, rtol=0.05), (got, want)  # bfloat16 rounding only

    chat = VideoChat.from_pretrained(tiny_model_dir, device="cpu", dtype="bfloat16")
    chat.load_clip(clip())
    assert chat.ask("Describe the video.", max_new_tokens=4)
    keys = chat._cache.kv.layers[0].keys  # the cached video + conversation prefix
    assert keys.dtype == torch.bfloat16 and keys.shape[-2] == chat.context_tokens


class Loaded(Exception):
    """Raised by the stand-in loader with the placement it was asked for."""


@pytest.mark.parametrize("argv", [
    ["eval", "mcq", "--bench", "B", "--out", "O"],
    ["eval", "openqa", "--data", "D", "--out", "O"],
    ["eval", "reliance", "--data", "D", "--out", "O"],
    ["eval", "retrieval", "--train", "T", "--test", "T", "--out", "O"],
    ["eval", "classify", "--train", "T", "--test", "T", "--out", "O"],
    ["chat"],
], ids=lambda a: "-".join(a[:2]))
def test_every_command_that_loads_a_model_passes_device_and_dtype(argv, monkeypatch):
    from vlm.cli import main

    def stand_in(cls, folder, *, device=None, dtype=None, device_map=None, merge_lora=False):
        raise Loaded(folder, device, dtype, device_map, merge_lora)

    monkeypatch.setattr(VideoLLM, "from_pretrained", classmethod(stand_in))
    monkeypatch.setattr("evals.openqa.load_openqa", lambda *a, **k: [])  # openqa reads its data before the model
    with pytest.raises(Loaded) as e:
        main(argv + ["--model", "M", "--device", "cpu", "--dtype", "bfloat16"])
    assert e.value.args == ("M", "cpu", "bfloat16", None, True)  # inference: LoRA folded into the weights
    with pytest.raises(Loaded) as e:
        main(argv + ["--model", "M", "--device-map", "auto"])
    assert e.value.args == ("M", None, None, "auto", True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_gets_the_model_in_bfloat16_by_default(tiny_model_dir):
    model = VideoLLM.from_pretrained(tiny_model_dir)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cuda", torch.bfloat16)}


def test_device_map_spreads_the_model_and_offloads_what_does_not_fit(tiny_model_dir, tmp_path):
    """An explicit map that offloads a decoder layer and the LM head to disk (accelerate's hooks bring them in when
    needed): the scores and the chat's answers do not change. "auto" on this machine keeps everything on the CPU;
    too little memory for the input embeddings, or disk without a folder, is refused with the reason."""
    from evals.interface import ScoringRequest
    from vlm.chat import VideoChat
    from vlm.dispatch import no_split_classes

    ref = VideoLLM.from_pretrained(tiny_model_dir, device="cpu")
    assert no_split_classes(ref) == ["CLIPTower", "LlamaDecoderLayer", "MLPConnector"]
    spread = {"tower": "cpu", "connector": "cpu", "llm.model.embed_tokens": "cpu", "llm.model.layers.0": "cpu",
              "llm.model.layers.1": "disk", "llm.model.norm": "cpu", "llm.model.rotary_emb": "cpu", "llm.lm_head": "disk"}
    split = VideoLLM.from_pretrained(tiny_model_dir, device_map=spread, offload_folder=str(tmp_path / "offload"))
    assert split.llm.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # on disk until it is needed
    auto = VideoLLM.from_pretrained(tiny_model_dir, device_map="auto")
    assert set(map(str, auto.hf_device_map.values())) == {"cpu"}
    req = ScoringRequest(uid="q", clip=clip(), turns=[Turn("user", "<video>\nWhat moves?")],
                         continuations=["a red square", "nothing at all"])
    want = ref.score_options([req])[0]
    for model in (split, auto):
        assert np.allclose(model.score_options([req])[0], want, atol=1e-5, rtol=0)
    answers = []
    for model in (split, ref):  # the chat's cached prefix works across the offloaded layers
        chat = VideoChat(model)
        chat.load_clip(clip())
        answers.append([chat.ask("Describe the video.", max_new_tokens=4), chat.ask("And then?", max_new_tokens=4)])
    assert answers[0] == answers[1]

    with pytest.raises(ValueError, match="offload_folder"):
        VideoLLM.from_pretrained(tiny_model_dir, device_map=spread)
    with pytest.raises(ValueError, match="input embeddings on 'disk'"):
        VideoLLM.from_pretrained(tiny_model_dir, device_map="auto", max_memory={"cpu": 100_000},
                                 offload_folder=str(tmp_path / "o2"))
    with pytest.raises(ValueError, match="device_map must be"):
        VideoLLM.from_pretrained(tiny_model_dir, device_map="everywhere")
