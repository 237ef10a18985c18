"""The `video_vit` tower family: shapes == grid_for in every attention mode, gradients, position interpolation,
which tokens each attention variant lets interact (space / time / factorised / shifted windows), layer taps."""

from __future__ import annotations

import pytest
import torch

from vlm.towers import build_tower
from vlm.towers.video_vit import ATTENTION_MODES, VideoViT, VideoViTConfig
from vlm.towers.video_vit.attention import FactorizedDotProductAttention, MultiHeadAttention, WindowAttention3D
from vlm.towers.video_vit.embed import PositionEmbedding

TINY = dict(depth=3, width=32, heads=4, patch_size=8, tubelet=2, image_size=32, num_frames=4)
EXTRA = {"window": {"window": (2, 2, 2)}, "pooling": {"q_pool_blocks": [1], "kv_stride": (1, 2, 2)}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops run fastest on one thread on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tower(mode: str, **kw):
    torch.manual_seed(0)
    return build_tower("video_vit", **{**TINY, "attention": mode, **EXTRA.get(mode, {}), **kw})


def pixels(b: int, t: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, 3, size, size, generator=torch.Generator().manual_seed(seed))  # [B, T, 3, H, W]


@pytest.mark.parametrize("pos_embed", ["factorized", "joint"])
@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_every_mode_emits_the_grid_it_declares(mode, pos_embed):
    for layer in (-1, -2):
        tw = tower(mode, pos_embed=pos_embed, layer=layer)
        assert tw.hidden_size == 32 and tw.temporal_patch == 2
        for t, size in ((4, 32), (3, 40), (1, 32), (8, 24)):  # odd T repeats its last frame; T = 1 is an image
            feats = tw(pixels(2, t, size))
            grid = tw.grid_for(t, size, size)
            assert feats.grid == grid
            assert feats.tokens.shape == (2, grid[0], grid[1] * grid[2], 32)
            assert torch.isfinite(feats.tokens).all()
    if mode == "pooling":  # the query-pooling block (index 1) halves h and w: before the tap of -1 but not of layer 1
        assert tower(mode, layer=-1).grid_for(4, 32, 32) == (2, 2, 2)
        assert tower(mode, layer=1).grid_for(4, 32, 32) == (2, 4, 4)
    else:
        assert tower(mode).grid_for(4, 32, 32) == (2, 4, 4)


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_gradients_reach_every_parameter(mode):
    tw = tower(mode, layer=-2)  # truncated after the penultimate block: every kept parameter reaches the output
    tokens = tw(pixels(2, 4)).tokens
    tokens.pow(2).mean().backward()
    missing = [n for n, p in tw.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"{mode}: no gradient for {missing}"
    assert len(tw.encoder.blocks) == 2  # depth 3, layer -2: the last block was dropped


def test_position_tables_resize_to_new_frame_counts_and_sizes():
    for kind in ("factorized", "joint"):
        torch.manual_seed(0)
        pe = PositionEmbedding(kind, (4, 4, 4), 8)
        native = pe((4, 4, 4))
        if kind == "joint":
            assert native is pe.table  # the native grid is the table itself, not an interpolation
        else:
            assert torch.equal(native, pe.time[:, None, None] + pe.space[None])
        assert pe((8, 6, 3)).shape == (8, 6, 3, 8)
        assert pe((1, 4, 4)).shape == (1, 4, 4, 8)
    pe = PositionEmbedding("factorized", (4, 2, 2), 1)
    with torch.no_grad():  # a time ramp 0, 1, 2, 3 stays a monotonic ramp within range when stretched to 8 steps
        pe.time.copy_(torch.arange(4.0)[:, None])
        pe.space.zero_()
    ramp = pe((8, 2, 2))[:, 0, 0, 0]
    assert torch.all(ramp[1:] >= ramp[:-1]) and ramp.min() >= 0 and ramp.max() <= 3
    # the tower runs at a new frame count and frame size with its tables interpolated
    tw = tower("divided", layer=-1)
    assert tw(pixels(1, 12, 48)).grid == (6, 6, 6)


def _changed(module, x: torch.Tensor, grid, where: tuple[int, int]) -> torch.Tensor:
    """Which output tokens [T, N] change when input token `where` = (t, n) of sample 0 is perturbed."""
    with torch.no_grad():
        base = module(x, grid)[0]
        y = x.clone()
        y[0, where[0], where[1]] += 5.0
        return (module(y, grid)[0][0] - base[0]).abs().amax(-1) > 1e-6  # [T, N]


def test_each_attention_variant_mixes_exactly_the_tokens_it_should():
    torch.manual_seed(0)
    t, h, w, d = 4, 4, 4, 16
    x = torch.randn(1, t, h * w, d)
    grid = (t, h, w)
    tt, nn_ = torch.meshgrid(torch.arange(t), torch.arange(h * w), indexing="ij")
    same_t, same_n = tt == 1, nn_ == 5
    assert torch.equal(_changed(MultiHeadAttention(d, 4, scope="space"), x, grid, (1, 5)), same_t)
    assert torch.equal(_changed(MultiHeadAttention(d, 4, scope="time"), x, grid, (1, 5)), same_n)
    assert _changed(MultiHeadAttention(d, 4, scope="joint"), x, grid, (1, 5)).all()
    assert torch.equal(_changed(FactorizedDotProductAttention(d, 4), x, grid, (1, 5)), same_t | same_n)

    # windows of (2, 2, 2) on a 4 x 4 x 4 grid: token (t=0, y=0, x=0) reaches its own window only ...
    plain = WindowAttention3D(d, 4, (2, 2, 2), shifted=False)
    yy, xx = nn_ // w, nn_ % w
    assert torch.equal(_changed(plain, x, grid, (0, 0)), (tt < 2) & (yy < 2) & (xx < 2))
    # ... and with the shift by (1, 1, 1) it shares a window with the far corner (t=3, y=3, x=3) after the roll,
    # but the mask keeps them apart: it reaches only the tokens of its wrapped-around region
    shifted = WindowAttention3D(d, 4, (2, 2, 2), shifted=True)
    shifted.load_state_dict(plain.state_dict())
    changed = _changed(shifted, x, grid, (0, 0))
    assert torch.equal(changed, (tt == 0) & (yy == 0) & (xx == 0))
    interior = _changed(shifted, x, grid, (1, 1 * w + 1))  # (1, 1, 1): its shifted window is t, y, x in 1..2
    assert torch.equal(interior, (tt >= 1) & (tt <= 2) & (yy >= 1) & (yy <= 2) & (xx >= 1) & (xx <= 2))
    # a grid that is not a multiple of the window is padded; padded tokens never change real outputs
    odd = torch.randn(1, 3, 25, d)
    out = plain(odd, (3, 5, 5))[0]
    assert out.shape == odd.shape and torch.isfinite(out).all()


def test_factorized_encoder_tokens_carry_the_temporal_encoders_frame_output():
    torch.manual_seed(0)
    enc = VideoViT(VideoViTConfig(**{**TINY, "depth": 4, "temporal_depth": 2, "attention": "factorized_encoder"}))
    x, grid = enc.embed_tokens(pixels(2, 4))
    spatial, _ = enc.run_blocks(x, grid, 0, 2)
    z = spatial.mean(2, keepdim=True)
    for block in enc.blocks[2:]:
        z, _ = block(z, None)
    out = enc.hidden(pixels(2, 4))  # [B, T', N, D]
    assert torch.allclose(out.mean(2, keepdim=True), z, atol=1e-5)  # mean over a frame's tokens = frame output
    assert torch.allclose(out - out.mean(2, keepdim=True), spatial - spatial.mean(2, keepdim=True), atol=1e-5)


def test_invalid_configs_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match="attention must be one of"):
        tower("axial")
    with pytest.raises(ValueError, match="heads must be even"):
        tower("factorized_dot_product", heads=1)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tower("joint")(pixels(1, 2, 36))
    with pytest.raises(ValueError, match="out of range"):
        tower("joint", layer=7)


def test_classifier_trains_on_labelled_clips_and_plugs_into_the_multiview_evaluator(tmp_path):
    import json

    from evals.classify import evaluate_classification
    from tests.train_helpers import make_tiny_data
    from vlm.classifier import VideoClassifier, accuracy
    from vlm.data.classification import load_classification, load_labelled
    from vlm.train.classify import ClassifyTrainConfig, train_classifier

    make_tiny_data(tmp_path, n=8, frames=4, bad=False)  # a square moving right (even i) or left (odd i)
    rows = [{"video": f"videos/v{i}.mp4", "label": "right" if i % 2 == 0 else "left"} for i in range(8)]
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = VideoClassifier(tower("divided", layer=-1), num_classes=2)
    data = load_labelled(tmp_path / "cls.jsonl", 4, model.tower.preprocessor, classes=["left", "right"], progress=False)
    assert data.pixels.shape == (8, 4, 3, 32, 32) and data.labels.tolist() == [1, 0] * 4
    history = train_classifier(model, data.pixels, data.labels, ClassifyTrainConfig(epochs=10, batch_size=4, lr=3e-3),
                               progress=False)
    assert len(history) == 20 and history[-1]["loss"] < history[0]["loss"]
    assert accuracy(model, data.pixels, data.labels) == 100.0
    items, classes = load_classification(tmp_path / "cls.jsonl", classes=["left", "right"])
    result = evaluate_classification(model.classify_clip, items, classes, tmp_path / "eval", num_frames=4,
                                     num_clips=2, num_crops=3, progress=False)
    assert result.counts["scored"] == 8 and result.settings["views"] == 6
    assert result.metrics["top1"] is not None
