"""VideoPreprocessor: shapes, normalisation, crop/squash/pad geometry, batching, serialisation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlm.video.transforms import VideoPreprocessor

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def normalized(value: float) -> torch.Tensor:
    """What a constant grey `value` becomes per channel: [3]."""
    return (value / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)


def frames(t: int, h: int, w: int, value: int = 0) -> np.ndarray:
    return np.full((t, h, w, 3), value, dtype=np.uint8)


@pytest.mark.parametrize("mode", ["resize_crop", "squash", "pad"])
def test_shapes_numpy_tensor_and_batched(mode: str) -> None:
    pre = VideoPreprocessor(size=32, mean=MEAN, std=STD, mode=mode)
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (4, 48, 80, 3), dtype=np.uint8)
    out = pre(clip)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    batched = pre(torch.from_numpy(np.stack([clip, clip])))  # [B, T, H, W, 3]
    assert batched.shape == (2, 4, 3, 32, 32)
    torch.testing.assert_close(batched[1], out)
    rect = VideoPreprocessor(size=(24, 40), mean=MEAN, std=STD, mode=mode)(clip)
    assert rect.shape == (4, 3, 24, 40)
    upsampled = pre(rng.integers(0, 256, (2, 10, 14, 3), dtype=np.uint8))  # smaller than the output
    assert upsampled.shape == (2, 3, 32, 32)


def test_normalisation_of_a_constant_image() -> None:
    pre = VideoPreprocessor(size=16, mean=MEAN, std=STD)
    out = pre(frames(2, 40, 30, value=200))
    expected = normalized(200).view(1, 3, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pre(frames(2, 40, 30, value=200)), out, atol=0, rtol=0)  # deterministic


def test_resize_crop_keeps_the_centre_and_orientation() -> None:
    # 100 x 200 frame: 40-px bars of 250 at the left and right, 100 elsewhere, a darker left half of the centre.
    img = frames(1, 100, 200, value=100)
    img[:, :, :40] = 250
    img[:, :, 160:] = 250
    img[:, :, 60:100] = 20
    out = VideoPreprocessor(size=50, mean=MEAN, std=STD, mode="resize_crop")(img)[0]  # [3, 50, 50]
    # shortest edge 100 -> 50 (scale 0.5), width 200 -> 100, centre crop = source columns 50..150: no bar left
    assert (out - normalized(250).view(3, 1, 1)).abs().min() > 1.0
    left, right = out[:, :, 10:20].mean(), out[:, :, 30:40].mean()
    assert left < right  # darker left stays left (no flip)
    squashed = VideoPreprocessor(size=50, mean=MEAN, std=STD, mode="squash")(img)[0]
    torch.testing.assert_close(squashed[:, :, 0], normalized(250).view(3, 1).expand(3, 50), atol=1e-4, rtol=0)


def test_resize_crop_on_a_tall_frame_crops_vertically() -> None:
    img = frames(1, 200, 100, value=100)
    img[:, :40] = 250  # top bar, cropped away
    out = VideoPreprocessor(size=50, mean=MEAN, std=STD, mode="resize_crop")(img)
    torch.testing.assert_close(out[0], normalized(100).view(3, 1, 1).expand(3, 50, 50), atol=1e-4, rtol=0)


def test_pad_fills_with_the_mean_colour() -> None:
    img = frames(1, 200, 100, value=200)  # tall: padded left and right
    out = VideoPreprocessor(size=50, mean=MEAN, std=STD, mode="pad")(img)[0]  # [3, 50, 50]
    # fitted to 50 x 25, centred at columns 12..37; the border is the mean colour, i.e. exactly 0 normalised
    assert torch.count_nonzero(out[:, :, :12]) == 0 and torch.count_nonzero(out[:, :, 37:]) == 0
    torch.testing.assert_close(out[:, :, 12:37], normalized(200).view(3, 1, 1).expand(3, 50, 25), atol=1e-4, rtol=0)


def test_uint8_resize_matches_a_float_resize_within_one_level() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (2, 90, 120, 3), dtype=np.uint8)
    pre = VideoPreprocessor(size=(45, 60), mean=(0.0,) * 3, std=(1 / 255,) * 3, mode="squash")  # out = pixel value
    ref = F.interpolate(
        torch.from_numpy(img).permute(0, 3, 1, 2).float(), size=(45, 60), mode="bilinear", antialias=True
    )
    assert (pre(img) - ref).abs().max() <= 1.0 + 1e-3


def test_batch_stacks_clips_of_different_sizes() -> None:
    pre = VideoPreprocessor(size=16, mean=MEAN, std=STD)
    clips = [
        SimpleNamespace(frames=frames(3, 40, 60), source="a.mp4"),
        SimpleNamespace(frames=frames(3, 24, 24), source="b.mp4"),
    ]
    assert pre.batch(clips).shape == (2, 3, 3, 16, 16)


def test_batch_names_the_clip_with_a_different_frame_count() -> None:
    pre = VideoPreprocessor(size=16, mean=MEAN, std=STD)
    clips = [
        SimpleNamespace(frames=frames(4, 20, 20), source="data/a.mp4"),
        SimpleNamespace(frames=frames(3, 20, 20), source="data/short.mp4"),
    ]
    with pytest.raises(ValueError, match="data/short.mp4.*3 frames"):
        pre.batch(clips)


def test_to_dict_round_trip_and_validation() -> None:
    pre = VideoPreprocessor(size=(336, 336), mean=MEAN, std=STD, mode="pad")
    d = pre.to_dict()
    assert d == {"size": 336, "mean": list(MEAN), "std": list(STD), "mode": "pad"}
    assert VideoPreprocessor.from_dict(json.loads(json.dumps(d))) == pre
    rect = VideoPreprocessor(size=[24, 40], mean=MEAN, std=STD)
    assert VideoPreprocessor.from_dict(json.loads(json.dumps(rect.to_dict()))) == rect and rect.hw == (24, 40)
    with pytest.raises(ValueError, match="mode"):
        VideoPreprocessor(mode="random_crop")
    with pytest.raises(ValueError, match="unknown keys"):
        VideoPreprocessor.from_dict({**d, "flip": True})
    with pytest.raises(TypeError, match="uint8"):
        pre(np.zeros((1, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        pre(np.zeros((8, 8, 3), dtype=np.uint8))
