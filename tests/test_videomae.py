"""VideoMAE pretraining: exact mask ratios, visible-only encoder, targets, a falling loss, and the entry point
(resumable, writes an encoder folder that loads as a `video_vit` tower inside a VideoLLM)."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import TINY_LLM
from vlm.model import VideoLLM
from vlm.towers import build_tower
from vlm.towers.video_vit import VideoViT, VideoViTConfig
from vlm.towers.video_vit.mae import MAEConfig, VideoMAE, make_mask, patchify, reconstruction_targets

ENC = dict(depth=2, width=32, heads=4, patch_size=8, tubelet=2, image_size=32, num_frames=8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def moving_squares(n: int, frames: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n clips of a bright square moving across a dark frame, as normalised-ish pixels [n, T, 3, S, S]."""
    rng = np.random.default_rng(seed)
    x = torch.full((n, frames, 3, size, size), -1.0)
    for i in range(n):
        y0, x0, dx, color = rng.integers(0, size - 8), rng.integers(0, 8), rng.integers(1, 3), rng.uniform(0, 2, 3)
        for t in range(frames):
            xs = min(x0 + dx * t, size - 8)
            x[i, t, :, y0 : y0 + 8, xs : xs + 8] = torch.tensor(color, dtype=torch.float32)[:, None, None]
    return x


@pytest.mark.parametrize("strategy", ["tube", "random", "frame"])
def test_masks_have_the_exact_ratio_and_shape(strategy):
    grid = (4, 5, 5)  # 100 tokens, 25 per time step
    m = make_mask(3, grid, 0.9, strategy, torch.Generator().manual_seed(0))
    masked = m.masked.view(3, 4, 25)
    if strategy == "tube":  # floor(0.9 * 25) = 22 positions, the same in every time step
        assert (masked.sum(-1) == 22).all() and (masked == masked[:, :1]).all()
        assert m.layout == (4, 3)
    elif strategy == "frame":  # floor(0.9 * 4) = 3 whole time steps
        assert (masked.all(-1).sum(-1) == 3).all() and (masked.all(-1) | ~masked.any(-1)).all()
        assert m.layout == (1, 25)
    else:  # floor(0.9 * 100) = 90 tokens anywhere
        assert (m.masked.sum(-1) == 90).all()
        assert m.layout == (1, 10)
    assert m.visible.shape == (3, 100 - int(m.masked[0].sum()))
    assert (m.visible.diff(dim=1) > 0).all()  # ascending, time-major
    assert not m.masked.gather(1, m.visible).any()  # visible and masked are disjoint and cover everything
    assert m.masked.sum(1).tolist() == [100 - m.visible.shape[1]] * 3
    assert make_mask(2, grid, 0.99, "frame").layout == (1, 25)  # at least one time step stays visible


def test_encoder_sees_only_the_visible_tokens_and_never_masked_pixels():
    torch.manual_seed(0)
    model = VideoMAE(VideoViT(VideoViTConfig(**ENC)), MAEConfig(mask_ratio=0.75, masking="tube"))
    x = moving_squares(2)
    seen = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    mask = make_mask(2, (4, 4, 4), 0.75, "tube", torch.Generator().manual_seed(1))
    out = model(x, mask=mask)
    assert seen == [(2, 4, 4, 32)]  # T' = 4 time steps x 4 visible of 16 positions (25%)
    assert out.pred.shape == out.target.shape == (2, 48, 2 * 8 * 8 * 3)
    # changing the pixels under masked tubelets does not change what the encoder produces
    y = x.clone()
    tubes = patchify(y, 2, 8)  # [B, L, P, C] view order = token order
    noisy = tubes + mask.masked[..., None, None] * torch.randn_like(tubes)
    y = noisy.view(2, 4, 4, 4, 2, 8, 8, 3).permute(0, 1, 4, 7, 2, 5, 3, 6).reshape(2, 8, 3, 32, 32)
    assert torch.equal(patchify(y, 2, 8), noisy)  # the inverse above is right
    a = model.encoder.encode_visible(x, mask.visible, mask.layout)
    b = model.encoder.encode_visible(y, mask.visible, mask.layout)
    assert torch.allclose(a, b, atol=1e-6)


def test_targets_are_tubelets_in_token_order_normalised_per_patch():
    x = torch.arange(4 * 2 * 2, dtype=torch.float32).view(1, 4, 1, 2, 2).repeat(1, 1, 3, 4, 4)  # [1, T=4, 3, 8, 8]
    tubes = patchify(x, 2, 4)  # 2 x 2 x 2 tokens of 2 x 4 x 4 pixels
    assert tubes.shape == (1, 8, 32, 3)
    emb = torch.nn.Conv3d(3, 1, (2, 4, 4), stride=(2, 4, 4), bias=False)  # the encoder's token order
    with torch.no_grad():
        emb.weight.fill_(1.0)
    assert torch.allclose(emb(x.transpose(1, 2)).flatten(), tubes.sum((2, 3))[0])
    target = reconstruction_targets(torch.randn(2, 4, 3, 8, 8), 2, 4).view(2, 8, 32, 3)
    assert torch.allclose(target.mean(2), torch.zeros(2, 8, 3), atol=1e-5)
    assert torch.allclose(target.std(2), torch.ones(2, 8, 3), atol=1e-3)


def test_modes_that_need_the_full_grid_refuse_visible_only_masking():
    for attention in ("window", "pooling"):
        with pytest.raises(ValueError, match="full token grid"):
            VideoMAE(VideoViT(VideoViTConfig(**ENC, attention=attention)), MAEConfig())
    with pytest.raises(ValueError, match="it can with tube, frame"):
        VideoMAE(VideoViT(VideoViTConfig(**ENC, attention="divided")), MAEConfig(masking="random"))
    torch.manual_seed(0)  # divided attention runs on tube-masked visible tokens
    out = VideoMAE(VideoViT(VideoViTConfig(**ENC, attention="divided")), MAEConfig(masking="tube"))(moving_squares(2))
    assert torch.isfinite(out.loss)


def test_reconstruction_loss_falls_in_a_tiny_run():
    torch.manual_seed(0)  # raw-pixel targets: per-patch normalised targets of flat squares are mostly zeros
    model = VideoMAE(VideoViT(VideoViTConfig(**ENC)), MAEConfig(mask_ratio=0.75, norm_pix=False))
    x = moving_squares(8)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(30):
        out = model(x, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def _recipe(tmp_path, data, **train):
    return {"name": "tiny_mae", "output_dir": str(tmp_path / "mae"), "seed": 0,
            "encoder": dict(ENC, depth=3, num_frames=4),
            "objective": {"mask_ratio": 0.75, "masking": "tube", "decoder_depth": 1},
            "data": {"sources": [str(data["captions"])], "frames": 4},
            "train": {"batch_size": 2, "max_steps": 4, "lr": 1e-3, "precision": "fp32", "warmup_steps": 1, **train}}


def test_pretraining_resumes_exactly_and_the_encoder_loads_as_a_tower_in_a_videollm(tmp_path):
    from tests.train_helpers import make_tiny_data
    from vlm.cli import main as vlm_main

    data = make_tiny_data(tmp_path / "data", n=6)  # includes a missing and a broken video: skipped and counted
    path = tmp_path / "mae.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, data, save_every=2)))
    assert vlm_main(["pretrain", str(path)]) == 0
    out = tmp_path / "mae"
    enc_dir = out / "encoder"
    first = load_file(str(enc_dir / "model.safetensors"))
    assert (out / "loss_curves.png").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 4
    summary = json.loads((out / "pretrain.json").read_text())
    assert summary["skipped_clips"] >= 1 and "broken.mp4" in (out / "skipped.txt").read_text()  # counted, not fatal
    # resume: drop the final checkpoint and the encoder, run again -> restarts at step 2 and ends identical
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    shutil.rmtree(enc_dir)
    assert vlm_main(["pretrain", str(path), "--set", "train.log_every=1"]) == 0
    again = load_file(str(enc_dir / "model.safetensors"))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)

    spec = {"name": "video_vit", "checkpoint": str(enc_dir)}
    tw = build_tower(**copy.deepcopy(spec))
    assert tw.loaded_from_checkpoint and tw.hidden_size == 32 and tw.preprocessor.hw == (32, 32)
    kept = {f"encoder.{k}" for k in first if not k.startswith(("blocks.2.", "norm."))}  # layer -2: block 3 dropped
    assert set(tw.state_dict()) == kept
    assert all(torch.equal(tw.state_dict()[k], first[k.removeprefix("encoder.")]) for k in kept)
    with pytest.raises(ValueError, match="width=32"):
        build_tower("video_vit", checkpoint=str(enc_dir), width=64)

    torch.manual_seed(0)
    model = VideoLLM.from_config({"tower": spec, "connector": {"name": "mlp"}, "llm": copy.deepcopy(TINY_LLM),
                                  "num_frames": 4})
    video = np.random.default_rng(0).integers(0, 255, (4, 40, 48, 3), dtype=np.uint8)
    from tests.test_model import CONVERSATION

    sample = {"id": "s0", "turns": CONVERSATION, "media_type": "video",
              "pixel_values": model.processor.preprocess_clip(video)[0], "timestamps": torch.arange(4) * 0.5}
    batch = model.processor.build_batch([sample])
    loss = model(batch).loss
    assert torch.isfinite(loss)
    model.save_pretrained(tmp_path / "vlm")
    reloaded = VideoLLM.from_pretrained(tmp_path / "vlm")
    assert reloaded.tower.loaded_from_checkpoint  # rebuilt from the encoder folder, not saved with the model
    assert not (tmp_path / "vlm" / "tower.safetensors").exists()
    assert torch.allclose(reloaded(batch).loss, loss, atol=1e-5)
