"""Padding-free training forwards: the same loss and gradients as the padded batch, from the batch's real positions."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_LLM, TINY_TOWERS
from tests.test_model import CONVERSATION, config, sample
from tests.train_helpers import make_tiny_data, tiny_recipe
from vlm.data.conversation import Turn
from vlm.llm.packing import SEGMENTS, enable_packing, pack, segment_attention, supports_packing
from vlm.model import VideoLLM
from vlm.train.recipe import RecipeError, parse_recipe


def test_segment_attention_is_causal_attention_inside_each_sample():
    torch.manual_seed(0)
    lengths = [5, 1, 9]
    n = sum(lengths)
    q, k, v = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)  # 2 query heads per KV head
    owner = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (owner[:, None] == owner[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              attn_mask=allowed, scale=0.3)
    module = torch.nn.Module()
    out, _ = segment_attention(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=torch.tensor([0, 5, 6, 15]))
    assert out.shape == (1, n, 4, 8)
    torch.testing.assert_close(out, expected.transpose(1, 2))
    module.is_causal, module.num_key_value_groups = True, 2
    plain, _ = segment_attention(module, q, k, v, None, scaling=0.3)  # without spans: transformers' SDPA attention
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True,
                                              scale=0.3)
    torch.testing.assert_close(plain, expected.transpose(1, 2))


def test_pack_keeps_real_positions_with_their_own_position_ids():
    embeds = torch.arange(2 * 4, dtype=torch.float).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = right.flip(1)
    targets = torch.tensor([[7, 8, -100, -100], [9, -100, -100, -100]])
    e, pos, t, cu, longest = pack(embeds, right, targets)
    assert e.flatten().tolist() == [0, 1, 2, 4, 5] and pos.tolist() == [[0, 1, 2, 0, 1]]
    assert t.tolist() == [[7, 8, -100, 9, -100]] and cu.tolist() == [0, 3, 5] and longest == 3
    e, pos, _, cu, _ = pack(embeds, left, targets.flip(1))
    assert e.flatten().tolist() == [1, 2, 3, 6, 7] and pos.tolist() == [[0, 1, 2, 0, 1]] and cu.tolist() == [0, 3, 5]
    with pytest.raises(ValueError, match="empty sample"):
        pack(embeds, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), targets)


def test_padding_free_loss_and_gradients_equal_the_padded_batch():
    """Samples of different lengths (a pruning connector keeps a static clip's first frame only, a text-only
    sample has no clip), LoRA on the LLM: the same loss and gradients, and the LLM's attention setting restored."""
    torch.manual_seed(0)
    model = VideoLLM.from_config(config("clip", "diff_prune+mlp"))
    model.set_mode("llm", "lora", {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj", "down_proj"]})
    model.train()
    text = {"id": "t", "turns": [Turn("user", "Hi"), Turn("assistant", "Hello there.")], "media_type": None}
    long_answer = CONVERSATION[:1] + [Turn("assistant", "A red circle moves to the left, then a blue one follows.")]
    batch = model.processor.build_batch([sample(model, 4, 0), sample(model, 4, 5, moving=False), text,
                                         sample(model, 4, 2, turns=long_answer)])
    _, attention, _ = model.embed(batch)
    assert len(set(attention.sum(1).tolist())) == 4  # four lengths: padding to pack away
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for padding_free in (False, True, False):
        model.zero_grad()
        loss = model(batch, padding_free=padding_free).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    assert model.llm.config._attn_implementation == SEGMENTS  # switched by the packed forward, for good
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert torch.equal(results[0][0], results[2][0])  # a padded batch after the switch: SDPA as before, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[2][1]))


def test_padding_free_is_refused_where_it_cannot_hold():
    llm = copy.deepcopy(TINY_LLM)
    llm["config"].update(model_type="qwen2", use_sliding_window=True, sliding_window=8)
    model = VideoLLM.from_config({"tower": copy.deepcopy(TINY_TOWERS["clip"]), "connector": {"name": "mlp"},
                                  "llm": llm, "num_frames": 4})
    assert "sliding-window" in supports_packing(model.llm)
    with pytest.raises(ValueError, match="padding-free batches are not available: .* sliding-window"):
        enable_packing(model.llm)
    raw = tiny_recipe({"captions": "c.json", "instruct": "i.json"}, "out", padding_free=True)
    raw["stages"][0]["objective"] = "words"
    with pytest.raises(RecipeError, match="padding_free: objective 'words' runs no LLM"):
        parse_recipe(raw, check_files=False)


def test_a_padding_free_stage_trains_to_the_same_weights(tmp_path, monkeypatch):
    """The engine passes the stage's `padding_free` to the objective: three steps of LoRA + connector from the same
    start end at the same weights as the padded run, with gradient checkpointing too (it recomputes each layer in
    the backward pass, which must attend as the forward did), and the stage's record says how it ran."""
    import vlm.objectives
    from vlm.train.engine import train_stage

    packed = []
    monkeypatch.setattr(vlm.objectives, "pack", lambda *a: packed.append(a[1].shape) or pack(*a))

    data = make_tiny_data(tmp_path / "data", n=6, bad=False)
    finals = {}
    for padding_free, checkpointing in ((False, False), (True, False), (True, True)):
        raw = tiny_recipe(data, tmp_path / f"run_{padding_free}", padding_free=padding_free,
                          gradient_checkpointing=checkpointing)
        raw["stages"][1]["data"]["mixture"] = [{"path": str(data["captions"])}, {"path": str(data["instruct"])}]
        raw["stages"][1]["batch_size"] = 3
        raw["stages"][1]["parts"]["llm"]["lora"]["dropout"] = 0.0  # nothing random between the two runs
        recipe = parse_recipe(raw)
        torch.manual_seed(0)
        stage_dir = tmp_path / f"stage_{padding_free}_{checkpointing}"
        finals[padding_free, checkpointing] = train_stage(recipe, 1, None, stage_dir)
        assert len(packed) == 3 * padding_free, packed  # every batch mixes captions and short answers
        packed.clear()
        assert json.loads((stage_dir / "stage.json").read_text())["padding_free"] is padding_free
    weights = [VideoLLM.from_pretrained(final).state_dict() for final in finals.values()]
    assert any("lora" in k for k in weights[0])
    for other in weights[1:]:
        assert other.keys() == weights[0].keys()
        for key in other:
            torch.testing.assert_close(other[key], weights[0][key], rtol=1e-4, atol=1e-5)
