"""Registries: class and function entries are checked, duplicates refused, and every pluggable kind is on one."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from vlm.llm.template import IGNORE_INDEX
from vlm.registry import DuplicateNameError, Registry


class Base:
    pass


def test_class_registry_checks_the_base_and_refuses_duplicates() -> None:
    reg: Registry[type[Base]] = Registry("thing", Base)

    @reg.register("a")
    class A(Base):
        pass

    assert reg.get("a") is A and A.registry_name == "a" and isinstance(reg.build("a"), A)
    with pytest.raises(TypeError, match="thing 'b': .* is not a subclass of Base"):
        reg.register("b")(int)
    with pytest.raises(DuplicateNameError, match="thing 'a' is already registered by .*A"):
        reg.register("a")(type("A2", (Base,), {}))
    with pytest.raises(KeyError, match="unknown thing 'c'; registered: a"):
        reg.get("c")
    assert reg.unregister("a") is A and "a" not in reg and reg.names() == []


def test_a_duplicate_is_both_a_key_error_and_a_value_error() -> None:
    """Towers, connectors and LLM loaders raised KeyError on a duplicate name; policies and backends ValueError."""
    assert issubclass(DuplicateNameError, KeyError) and issubclass(DuplicateNameError, ValueError)


def test_function_registry_takes_functions_only() -> None:
    reg: Registry[Any] = Registry("scorer")
    reg.register("plain")(lambda x, y=0, *, scale=1.0: x * scale)
    reg.register("flexible")(lambda *args, **kwargs: 0.0)
    assert reg.names() == ["flexible", "plain"] and list(reg) == reg.names()
    with pytest.raises(TypeError, match="must be a function"):
        reg.register("class")(Base)
    with pytest.raises(TypeError, match="must be a function"):
        reg.register("value")(3)
    with pytest.raises(DuplicateNameError, match="already registered by .*<lambda>"):
        reg.register("plain")(lambda x, y=0, *, scale=1.0: x)
    assert "class" not in reg and "value" not in reg


def test_every_pluggable_kind_is_on_a_registry() -> None:
    import vlm.connectors  # noqa: F401
    import vlm.towers  # noqa: F401
    from vlm.connectors.base import CONNECTORS, REDUCERS
    from vlm.llm.load import LLM_LOADERS
    from vlm.objectives import CONTRASTIVE_OBJECTIVES, STAGE_OBJECTIVES
    from vlm.towers.base import TOWERS
    from vlm.video import BACKENDS, POLICIES

    kinds = {TOWERS: {"clip", "siglip", "videomae"}, CONNECTORS: {"mlp", "qformer", "stc"}, REDUCERS: {"pool2d"},
             LLM_LOADERS: {"hf", "gguf", "smollm2", "random"}, POLICIES: {"uniform", "segment_middle", "fps"},
             BACKENDS: {"pyav", "decord", "frames", "gif", "image"}, STAGE_OBJECTIVES: {"lm", "words"},
             CONTRASTIVE_OBJECTIVES: {"infonce", "siglip"}}
    for registry, names in kinds.items():
        assert names <= set(registry.names()), registry.kind


# ---------------------------------------------------------------------------------------------- stage objectives
def _tiny_lm_batch() -> tuple[SimpleNamespace, torch.Tensor]:
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2)).eval()
    embeds = torch.randn(2, 7, 32)  # [B, S, D]
    attention = torch.ones(2, 7, dtype=torch.long)
    attention[1, :2] = 0  # left padding
    labels = torch.full((2, 7), IGNORE_INDEX)
    labels[0, 4:] = torch.tensor([3, 9, 11])
    labels[1, 5:] = torch.tensor([7, 2])
    model = SimpleNamespace(llm=llm, embed=lambda batch: (embeds, attention, batch))
    return model, labels


def test_lm_objective_loss_equals_the_full_vocabulary_forward() -> None:
    from vlm.objectives import STAGE_OBJECTIVES

    model, labels = _tiny_lm_batch()
    lm = STAGE_OBJECTIVES.get("lm")
    embeds, attention, _ = model.embed(labels)
    full = model.llm(inputs_embeds=embeds, attention_mask=attention, labels=labels, use_cache=False)
    with torch.no_grad():
        sparse = lm(model, labels)
        with_logits = lm(model, labels, True)
    assert sparse.logits is None and with_logits.logits.shape == (2, 7, 50)
    torch.testing.assert_close(sparse.loss, full.loss.detach())
    torch.testing.assert_close(with_logits.loss, full.loss.detach())


def test_words_objective_wraps_the_word_alignment_loss(monkeypatch) -> None:
    from vlm import objectives

    monkeypatch.setattr(objectives, "word_alignment_loss", lambda model, batch: torch.tensor(float(batch)))
    assert float(objectives.STAGE_OBJECTIVES.get("words")(None, 2.5).loss) == 2.5


def test_contrastive_objectives_build_by_name() -> None:
    from vlm.objectives import ContrastiveObjective, InfoNCELoss, build_objective

    loss = build_objective("infonce", init_temperature=0.1)
    assert isinstance(loss, InfoNCELoss) and isinstance(loss, ContrastiveObjective) and isinstance(loss, nn.Module)
    assert loss.temperature == pytest.approx(0.1)
    with pytest.raises(KeyError, match="unknown contrastive objective 'clip'; registered: infonce, siglip"):
        build_objective("clip")


def test_vlm_list_prints_every_registry_with_its_builtins(capsys):
    from vlm.cli import main

    assert main(["list"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    expected = {"towers": "efficientnet_lite0", "connectors": "stc", "token reducers": "tome", "LLM loaders": "smollm2",
                "sampling policies": "segment_middle", "video backends": "pyav", "stage objectives": "words",
                "contrastive objectives": "siglip"}
    assert set(lines) == set(expected)
    assert all(name in lines[title].split(", ") for title, name in expected.items())
