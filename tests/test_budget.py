"""A fixed visual-token budget (vlm.budget): the LLM sees at most max_tokens visual tokens for any clip length,
the count is known up front, and every path (pixels, cached features, saved model) gives the same tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import TINY_LLM, TINY_TOWERS
from vlm.budget import TokenBudget, middle_positions
from vlm.data.conversation import Turn
from vlm.model import VideoLLM


def _model(connector: dict, budget: dict | None) -> VideoLLM:
    torch.manual_seed(0)
    return VideoLLM.from_config({"tower": copy.deepcopy(TINY_TOWERS["clip"]), "llm": copy.deepcopy(TINY_LLM),
                                 "connector": connector, "num_frames": 4, "token_budget": budget or {}}).eval()


def _encode(model: VideoLLM, frames: int) -> torch.Tensor:
    torch.manual_seed(frames)
    pixels = torch.randn(frames, 3, 32, 32)
    stamps = torch.arange(frames, dtype=torch.float32) / 4
    with torch.no_grad():
        return model.encode_visual([pixels], [stamps]).embeds[0]


class _Counter:  # a connector stand-in: output count of an MLP with pool p
    def __init__(self, pool: int = 1):
        self.pool = pool

    def num_tokens(self, grid):
        t, h, w = grid
        return t * -(-h // self.pool) * -(-w // self.pool)


def test_plan_pools_first_then_drops_frames():
    assert TokenBudget(256, "pool").plan((16, 8, 8), _Counter()) == (2, 16)  # 16 frames x 4x4
    assert TokenBudget(256, "frames").plan((16, 8, 8), _Counter()) == (1, 4)  # 4 frames x 8x8
    assert TokenBudget(8, "pool").plan((16, 8, 8), _Counter()) == (8, 8)  # 1x1 per frame, then 8 frames
    assert TokenBudget(None).plan((16, 8, 8), _Counter()) == (1, 16)
    with pytest.raises(ValueError, match="one temporal position"):
        TokenBudget(10, "frames").plan((4, 8, 8), _Counter())
    with pytest.raises(ValueError, match="policy"):
        TokenBudget.from_dict({"max_tokens": 4, "policy": "random"})
    with pytest.raises(ValueError, match="unknown token_budget"):
        TokenBudget.from_dict({"max_token": 4})
    assert middle_positions(16, 4).tolist() == [2, 6, 10, 14]


@pytest.mark.parametrize("policy", ["pool", "frames"])
def test_any_clip_length_fits_and_the_count_is_known_up_front(policy):
    model = _model({"name": "mlp"}, {"max_tokens": 16, "policy": policy})  # 4x4 patches per frame
    for frames in (1, 2, 4, 8, 32):
        tokens = _encode(model, frames)
        assert tokens.shape[0] == model.num_visual_tokens(frames) <= 16, (policy, frames)
    unbudgeted = _model({"name": "mlp"}, None)
    assert _encode(unbudgeted, 8).shape[0] == 128
    assert torch.equal(_encode(model, 1), _encode(unbudgeted, 1))  # within budget: untouched


def test_frames_policy_keeps_the_llm_sequence_length_constant():
    """STC (2x2x2) under a 16-token budget keeps 8 frames of any longer clip: the prompt is the same length."""
    model = _model({"name": "stc", "downsample": [2, 2, 2]}, {"max_tokens": 16, "policy": "frames"})
    lengths = set()
    for frames in (8, 16, 32):
        assert _encode(model, frames).shape[0] == model.num_visual_tokens(frames) == 16
        slot = model.processor.visual_slot(frames, [i / 4 for i in range(frames)])
        ids = model.processor.template.encode_prompt([Turn("user", "<video>\nWhat happens?")], "video", slot, where="chat")
        lengths.add(len(ids))
    assert len(lengths) == 1


def test_cached_features_and_a_saved_model_give_the_same_tokens(tmp_path):
    model = _model({"name": "mlp", "pool": 2}, {"max_tokens": 8, "policy": "pool"})
    pixels, stamps = torch.randn(16, 3, 32, 32), torch.arange(16, dtype=torch.float32)
    with torch.no_grad():
        direct = model.encode_visual([pixels], [stamps]).embeds[0]
        feats = model.tower_features(pixels[None], stamps[None])  # what the feature cache stores: all 16 frames
        cached = model.encode_visual([], [stamps], None, [feats.tokens[0]], [feats.grid]).embeds[0]
    torch.testing.assert_close(direct, cached)
    assert direct.shape[0] <= 8
    loaded = VideoLLM.from_pretrained(model.save_pretrained(tmp_path / "m")).eval()
    assert loaded.config.token_budget == {"max_tokens": 8, "policy": "pool"}
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_visual([pixels], [stamps]).embeds[0], direct)
