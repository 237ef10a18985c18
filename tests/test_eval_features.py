"""The evaluation feature cache: reused only for the same tower weights, preprocessing and video files."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
import pytest
import torch

from evals.features import extract_features
from tests.conftest import TINY_TOWERS
from tests.eval_helpers import single_thread  # noqa: F401  (fixture)
from vlm.towers import build_tower
from vlm.video import write_video


def _tower(seed: int):
    torch.manual_seed(seed)
    spec = dict(TINY_TOWERS["clip"])
    return build_tower(spec.pop("name"), **spec)


def _videos(root, n=3):
    for i in range(n):
        frames = np.random.default_rng(i).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
        write_video(root / f"v{i}.mp4", frames, fps=4)
    return [root / f"v{i}.mp4" for i in range(n)]


def test_same_id_other_weights_or_edited_video_is_recomputed(tmp_path, single_thread):
    videos = _videos(tmp_path)
    cache = tmp_path / "feats.safetensors"
    a, b = _tower(0), _tower(1)  # same class, width and id string; other weights
    fa, idx, _ = extract_features(a, videos, num_frames=4, cache=cache, tower_id="CLIPTower(hidden=32)", progress=False)
    fb, _, _ = extract_features(b, videos, num_frames=4, cache=cache, tower_id="CLIPTower(hidden=32)", progress=False)
    fresh_b, _, _ = extract_features(b, videos, num_frames=4, tower_id="x", progress=False)
    assert idx == [0, 1, 2]
    assert not torch.equal(fa, fb) and torch.allclose(fb, fresh_b)

    again, _, _ = extract_features(b, videos, num_frames=4, cache=cache, tower_id="CLIPTower(hidden=32)", progress=False)
    assert torch.equal(again, fb)  # a hit returns what was stored, not zeros

    frames = np.random.default_rng(99).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    write_video(videos[1], frames, fps=4)  # the same path, other pixels
    st = os.stat(videos[1])
    os.utime(videos[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    edited, _, _ = extract_features(b, videos, num_frames=4, cache=cache, tower_id="CLIPTower(hidden=32)", progress=False)
    assert torch.allclose(edited[0], fb[0]) and not torch.allclose(edited[1], fb[1])


TID = "CLIPTower(hidden=32)"


def _reference(tower, video, num_frames=4, sampling="uniform") -> torch.Tensor:
    """A fresh encode written out here: the tower's preprocessor, the tower in eval mode, tokens mean-pooled over space."""
    from vlm.video import read_clip

    was = tower.training
    tower.eval()
    with torch.no_grad():
        pixels = tower.preprocessor(read_clip(video, num_frames, sampling).frames)[None]
        out = tower(pixels).tokens.float().mean(dim=2)[0]  # [T', D]
    tower.train(was)
    return out


class _Counter:
    """Wraps evals.features.clip_features: how many clips were encoded (0 on a cache hit)."""

    def __init__(self, monkeypatch):
        import evals.features as features

        self.clips, self.batches, real = 0, [], features.clip_features

        def counting(tower, clips):
            self.clips += len(clips)
            self.batches.append(len(clips))
            return real(tower, clips)

        monkeypatch.setattr(features, "clip_features", counting)


def _extract(tower, videos, cache, **kw):
    kw = {"num_frames": 4, "tower_id": TID, "progress": False} | kw
    return extract_features(tower, videos, cache=cache, **kw)


def test_features_match_a_fresh_encode_and_a_hit_encodes_nothing(tmp_path, single_thread, monkeypatch):
    """Five sources, batches of two: a broken file second and a missing one fourth are skipped and named; the rows
    are the fresh features of the decodable videos in order; a second call encodes nothing and returns the same
    features, indices and errors (int keys)."""
    videos = _videos(tmp_path, 3)
    (tmp_path / "broken.mp4").write_text("not a video")
    sources = [videos[0], tmp_path / "broken.mp4", videos[1], tmp_path / "missing.mp4", videos[2]]
    tower = _tower(0)
    count = _Counter(monkeypatch)
    cache = tmp_path / "c" / "feats.safetensors"
    feats, index, errors = _extract(tower, sources, cache, batch_size=2)
    assert count.clips == 3 and index == [0, 2, 4] and sorted(errors) == [1, 3]
    assert "broken.mp4" in errors[1] and "missing.mp4" in errors[3]
    expected = torch.stack([_reference(tower, sources[i]) for i in index])
    assert feats.shape == expected.shape == (3, 4, 32) and torch.allclose(feats, expected, atol=1e-5)
    assert feats.abs().sum() > 0
    again, index2, errors2 = _extract(tower, sources, cache, batch_size=2)
    assert count.clips == 3  # nothing encoded
    assert torch.equal(again, feats) and index2 == index and errors2 == errors
    fresh, _, _ = _extract(tower, sources, None, batch_size=5)  # no cache, one batch
    assert torch.allclose(again, fresh, atol=1e-5)


def test_changed_weights_preprocessing_frames_sampling_or_id_are_re_encoded(tmp_path, single_thread, monkeypatch):
    from vlm.video.transforms import VideoPreprocessor

    videos = _videos(tmp_path, 2)
    long = tmp_path / "long.mp4"
    write_video(long, np.random.default_rng(5).integers(0, 255, (12, 32, 32, 3), dtype=np.uint8), fps=4)
    videos.append(long)
    tower = _tower(0)
    count = _Counter(monkeypatch)
    cache = tmp_path / "feats.safetensors"

    def check(encoded, **kw):
        before = count.clips
        feats, index, _ = _extract(tower, videos, cache, **kw)
        assert count.clips - before == encoded, kw
        expected = torch.stack([_reference(tower, v, kw.get("num_frames", 4), kw.get("sampling", "uniform")) for v in videos])
        assert torch.allclose(feats, expected, atol=1e-5), kw
        return feats

    first = check(3)
    check(0)
    with torch.no_grad():  # the same tower object, one weight nudged in place
        w = next(p for n, p in tower.named_parameters() if "patch_embedding" in n)
        w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    nudged = check(3)
    assert not torch.allclose(nudged, first, atol=1e-4)
    check(0)
    pre = tower.preprocessor.to_dict()
    tower.preprocessor = VideoPreprocessor.from_dict(pre | {"mean": [0.3, 0.3, 0.3]})
    check(3)
    check(0)
    check(3, num_frames=2)
    check(3, sampling="segment_middle", num_frames=2)
    check(3)
    check(3, tower_id="another tower")
    check(0, tower_id="another tower")


def test_edited_missing_moved_or_rewritten_frames_are_re_encoded(tmp_path, single_thread, monkeypatch):
    """Same size and other pixels (uncompressed AVI) with a new mtime; other size with the old mtime restored; a
    missing file that appears; the same relative path from another folder; a frame folder with a frame rewritten
    in place (the folder's own mtime does not change): each is re-encoded."""
    from PIL import Image

    tower = _tower(0)
    count = _Counter(monkeypatch)

    def frames(seed, n=4):
        return np.random.default_rng(seed).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)

    raw = tmp_path / "raw.avi"
    write_video(raw, frames(0), 4, codec="rawvideo")
    cache = tmp_path / "feats.safetensors"
    a, _, _ = _extract(tower, [raw], cache)
    size, mtime = os.stat(raw).st_size, os.stat(raw).st_mtime_ns
    write_video(raw, frames(1), 4, codec="rawvideo")
    os.utime(raw, ns=(mtime + 1_000_000_000, mtime + 1_000_000_000))
    assert os.stat(raw).st_size == size
    b, _, _ = _extract(tower, [raw], cache)
    assert count.clips == 2 and torch.allclose(b[0], _reference(tower, raw), atol=1e-5) and not torch.allclose(a, b)
    mtime = os.stat(raw).st_mtime_ns
    write_video(raw, frames(2, 5), 4, codec="rawvideo")  # one frame more: another size
    os.utime(raw, ns=(mtime, mtime))
    assert os.stat(raw).st_size != size and os.stat(raw).st_mtime_ns == mtime
    c, _, _ = _extract(tower, [raw], cache)
    assert count.clips == 3 and torch.allclose(c[0], _reference(tower, raw), atol=1e-5)

    late = tmp_path / "late.mp4"
    _, index, errors = _extract(tower, [raw, late], cache)
    assert index == [0] and list(errors) == [1]
    write_video(late, frames(3), 4)
    d, index, errors = _extract(tower, [raw, late], cache)
    assert index == [0, 1] and errors == {} and torch.allclose(d[1], _reference(tower, late), atol=1e-5)

    for sub, seed in (("x", 4), ("y", 5)):
        (tmp_path / sub).mkdir()
        write_video(tmp_path / sub / "v.avi", frames(seed), 4, codec="rawvideo")
    os.utime(tmp_path / "y" / "v.avi", ns=(os.stat(tmp_path / "x" / "v.avi").st_mtime_ns,) * 2)  # same size and mtime
    rel = tmp_path / "rel.safetensors"
    monkeypatch.chdir(tmp_path / "x")
    e, _, _ = _extract(tower, ["v.avi"], rel)
    monkeypatch.chdir(tmp_path / "y")
    f, _, _ = _extract(tower, ["v.avi"], rel)
    assert torch.allclose(f[0], _reference(tower, tmp_path / "y" / "v.avi"), atol=1e-5) and not torch.allclose(e, f)

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(1, 5):
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i:05d}.png")
    g, _, _ = _extract(tower, [folder], cache)
    folder_mtime, st = os.stat(folder).st_mtime_ns, os.stat(folder / "00002.png")
    Image.fromarray(np.full((32, 32, 3), 250, dtype=np.uint8)).save(folder / "00002.png")  # rewritten in place
    os.utime(folder / "00002.png", ns=(st.st_mtime_ns + 1_000_000_000,) * 2)
    assert os.stat(folder).st_mtime_ns == folder_mtime and os.stat(folder / "00002.png").st_size == st.st_size
    h, _, _ = _extract(tower, [folder], cache)
    assert torch.allclose(h[0], _reference(tower, folder), atol=1e-5) and not torch.allclose(g, h)


def test_a_half_written_cache_is_recomputed(tmp_path, single_thread, monkeypatch):
    videos = _videos(tmp_path, 2)
    tower = _tower(0)
    count = _Counter(monkeypatch)
    cache = tmp_path / "feats.safetensors"
    feats, _, _ = _extract(tower, videos, cache)
    cache.with_suffix(".json").unlink()  # features without their key
    again, _, _ = _extract(tower, videos, cache)
    assert count.clips == 4 and torch.allclose(again, feats)
    cache.unlink()  # a key without features
    again, _, _ = _extract(tower, videos, cache)
    assert count.clips == 6 and torch.allclose(again, feats)


def test_nothing_decodable_is_an_error_naming_the_first_failure(tmp_path):
    (tmp_path / "bad.mp4").write_text("no")
    with pytest.raises(RuntimeError, match="no video could be decoded.*bad.mp4"):
        extract_features(_tower(0), [tmp_path / "bad.mp4", tmp_path / "missing.mp4"], num_frames=4, progress=False)


def test_clip_features_shape_and_training_mode_is_given_back(tmp_path, single_thread):
    from evals.features import clip_features, describe_tower
    from vlm.video import read_clip

    videos = _videos(tmp_path, 2)
    tower = _tower(0).train()
    out = clip_features(tower, [read_clip(v, 4) for v in videos])
    assert tower.training and out.shape == (2, 4, 32) and out.dtype == torch.float32
    assert torch.allclose(out[1], _reference(tower, videos[1]), atol=1e-5)
    assert clip_features(tower.eval(), [read_clip(videos[0], 4)]).shape == (1, 4, 32) and not tower.training
    modes = []
    tower.train().register_forward_pre_hook(lambda module, args: modes.append(module.training))
    clip_features(tower, [read_clip(videos[0], 4)])
    assert modes == [False] and tower.training  # encoded in eval mode (no dropout), given back in training mode
    half = _tower(0).to(torch.bfloat16)  # pixels follow the tower's dtype; features come back as float32
    out = clip_features(half, [read_clip(videos[1], 4)])
    assert out.dtype == torch.float32 and torch.allclose(out[0], _reference(_tower(0), videos[1]), atol=0.1)
    assert describe_tower(tower) == f"{type(tower).__name__}(hidden=32)"
    assert describe_tower(tower, {"name": "clip", "b": 1}) == '{"b": 1, "name": "clip"}'


def _fingerprint(tower) -> str:
    """The training cache's tower fingerprint for an empty tower config, written out here: sha1 of
    [{}, preprocessing] as sorted JSON, then each state-dict tensor (by name) as "name:shape:dtype" and its bytes."""
    h = hashlib.sha1(json.dumps([{}, tower.preprocessor.to_dict()], sort_keys=True, default=str).encode())
    for name, p in sorted(tower.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _ident(video) -> list:
    st = os.stat(video)
    return [str(video.resolve()), st.st_size, st.st_mtime_ns]


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def test_key_file_names_every_video_the_tower_frames_and_sampling(tmp_path, single_thread):
    """The JSON next to the features is the key (videos as [resolved path, size, mtime_ns], a missing one as
    [path, None, None]; tower id; weights fingerprint; frames; sampling), its digest (the first 16 hex digits of the
    sha256 of the key as sorted JSON) and the errors; the cache folder is created, parents included."""
    videos = _videos(tmp_path, 2)
    missing = tmp_path / "missing.mp4"
    tower = _tower(0)
    cache = tmp_path / "deep" / "er" / "feats.safetensors"  # two folders that do not exist yet
    _, index, errors = _extract(tower, [videos[0], missing, videos[1]], cache, sampling="segment_middle")
    assert index == [0, 2] and list(errors) == [1]
    key = {"videos": [_ident(videos[0]), [str(missing), None, None], _ident(videos[1])], "tower": TID,
           "weights": _fingerprint(tower), "num_frames": 4, "sampling": "segment_middle"}
    meta = json.loads(cache.with_suffix(".json").read_text())
    assert meta == key | {"digest": _digest(key), "errors": {"1": errors[1]}}
    assert len(meta["digest"]) == 16


def test_a_cache_written_in_the_documented_format_is_served(tmp_path, single_thread, monkeypatch, caplog):
    """Features and a key written here by hand (not by extract_features) are returned as stored, nothing encoded,
    errors with int keys; the reuse is logged with the cache's path."""
    from safetensors.torch import save_file

    videos = _videos(tmp_path, 2)
    missing = tmp_path / "missing.mp4"
    tower = _tower(0)
    count = _Counter(monkeypatch)
    cache = tmp_path / "feats.safetensors"
    stored = torch.arange(2 * 4 * 32, dtype=torch.float32).reshape(2, 4, 32)
    save_file({"features": stored, "index": torch.tensor([0, 2])}, str(cache))
    key = {"videos": [_ident(videos[0]), [str(missing), None, None], _ident(videos[1])], "tower": TID,
           "weights": _fingerprint(tower), "num_frames": 4, "sampling": "uniform"}
    cache.with_suffix(".json").write_text(json.dumps({"digest": _digest(key), **key, "errors": {"1": "gone"}}))
    with caplog.at_level(logging.INFO, logger="evals.features"):
        feats, index, errors = _extract(tower, [videos[0], missing, videos[1]], cache)
    assert count.clips == 0 and torch.equal(feats, stored) and index == [0, 2] and errors == {1: "gone"}
    assert [r.getMessage() for r in caplog.records if r.name == "evals.features"] == [f"features: reusing {cache}"]


def test_another_missing_video_is_not_served_the_cached_error(tmp_path, single_thread, monkeypatch):
    """A missing video is keyed by its path: the same list with another missing file is recomputed."""
    videos = _videos(tmp_path, 1)
    tower = _tower(0)
    count = _Counter(monkeypatch)
    cache = tmp_path / "feats.safetensors"
    _, _, errors = _extract(tower, [videos[0], tmp_path / "gone_a.mp4"], cache)
    assert "gone_a.mp4" in errors[1]
    _, index, errors = _extract(tower, [videos[0], tmp_path / "gone_b.mp4"], cache)
    assert count.clips == 2 and index == [0] and "gone_b.mp4" in errors[1] and "gone_a.mp4" not in errors[1]


def test_defaults_eight_uniform_frames_batches_of_eight_empty_id_and_a_progress_bar(tmp_path, single_thread,
                                                                                 monkeypatch, capsys):
    video = tmp_path / "long.mp4"
    write_video(video, np.random.default_rng(7).integers(0, 255, (12, 32, 32, 3), dtype=np.uint8), fps=4)
    tower = _tower(0)
    count = _Counter(monkeypatch)
    cache = tmp_path / "feats.safetensors"
    capsys.readouterr()
    feats, index, errors = extract_features(tower, [video] * 9, cache=cache)
    err = capsys.readouterr().err
    assert count.batches == [8, 1] and index == list(range(9)) and errors == {}
    expected = _reference(tower, video, 8, "uniform")
    assert feats.shape == (9, 8, 32) and all(torch.allclose(f, expected, atol=1e-5) for f in feats)
    meta = json.loads(cache.with_suffix(".json").read_text())
    assert meta["tower"] == "" and meta["num_frames"] == 8 and meta["sampling"] == "uniform"
    assert "tower features: 100%" in err and "9/9" in err and "video/s" in err


def test_progress_false_writes_nothing(tmp_path, single_thread, capsys):
    videos = _videos(tmp_path, 2)
    capsys.readouterr()
    extract_features(_tower(0), videos, num_frames=4, progress=False)
    assert capsys.readouterr().err == ""
    extract_features(_tower(0), videos, num_frames=4, progress=True)
    assert "tower features: 100%" in capsys.readouterr().err


def test_batch_size_is_the_most_clips_per_tower_call(tmp_path, single_thread, monkeypatch):
    videos = _videos(tmp_path, 5)
    count = _Counter(monkeypatch)
    _extract(_tower(0), videos, None, batch_size=2)
    assert count.batches == [2, 2, 1]
    _extract(_tower(0), videos, None, batch_size=1)
    assert count.batches == [2, 2, 1, 1, 1, 1, 1, 1]


def test_skipped_videos_are_logged_with_their_error(tmp_path, single_thread, caplog):
    videos = _videos(tmp_path, 1)
    missing = tmp_path / "missing.mp4"
    with caplog.at_level(logging.INFO, logger="evals.features"):
        _, _, errors = _extract(_tower(0), [missing, videos[0]], None)
    assert [r.getMessage() for r in caplog.records if r.name == "evals.features"] == [
        f"features: skipping {missing}: {errors[0]}"]
    assert [r.levelno for r in caplog.records if r.name == "evals.features"] == [logging.WARNING]


def test_no_videos_at_all_is_an_error_with_a_placeholder(single_thread):
    with pytest.raises(RuntimeError, match=r"^no video could be decoded \(first error: \?\)$"):
        extract_features(_tower(0), [], num_frames=4, progress=False)
