"""Long videos in bounded memory (vlm.memory) and VideoChat's long/streaming mode."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from tests.conftest import TINY_LLM, TINY_TOWERS
from vlm.memory import VideoMemory, chunks_of, encode_stream
from vlm.model import VideoLLM
from vlm.video.encode import write_video


@pytest.fixture(scope="module")
def model() -> VideoLLM:
    torch.manual_seed(0)
    return VideoLLM.from_config({"tower": copy.deepcopy(TINY_TOWERS["clip"]), "llm": copy.deepcopy(TINY_LLM),
                                 "connector": {"name": "mlp", "pool": 2}, "num_frames": 4}).eval()


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """Four minutes at 1 fps (240 frames of 32 px): four scenes of one minute each."""
    rng = np.random.default_rng(0)
    scenes = [rng.integers(0, 255, (1, 32, 32, 3), dtype=np.uint8).repeat(60, 0) for _ in range(4)]
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    write_video(path, np.concatenate(scenes), fps=1.0)
    return path


def test_consolidation_merges_the_most_alike_neighbours():
    memory = VideoMemory(max_groups=3)
    a, b = torch.ones(2, 4), torch.tensor([[1.0, -1, 1, -1]] * 2)
    c = torch.tensor([[0.0, 1, 0, 1]] * 2)
    memory.add(torch.cat([a, b, b * 1.01, c]), groups=4, times=[0.0, 1.0, 2.0, 3.0])
    assert len(memory.groups) == 3 and memory.merges == 1
    assert memory.spans == [(0.0, 0.0), (1.0, 2.0), (3.0, 3.0)] and memory.weights == [1, 2, 1]
    torch.testing.assert_close(memory.groups[1], b * 1.005)
    memory.add(c, groups=1, times=[4.0])  # identical to its neighbour: merged with it, weighted 1:1
    assert memory.spans[-1] == (3.0, 4.0) and memory.tokens.shape == (6, 4)
    with pytest.raises(ValueError, match="groups"):
        memory.add(torch.ones(3, 4), groups=2, times=[5.0, 6.0])


def test_stream_encoding_is_bounded_whatever_the_length(model, long_video):
    sizes = {}
    for minutes in (1, 4):
        memory, last, stats = encode_stream(model, long_video, fps=1.0, chunk_frames=8, max_groups=6,
                                            end=60.0 * minutes)
        assert stats.frames == 60 * minutes and stats.chunks == -(-stats.frames // 8)
        assert len(memory.groups) == 6 and memory.tokens.shape[0] == 6 * 4  # 2x2 pooled 4x4 grid per frame
        assert [s[0] for s in memory.spans] == sorted(s[0] for s in memory.spans)
        assert memory.spans[0][0] == 0.0 and memory.spans[-1][1] == 60.0 * minutes - 1
        sizes[minutes] = memory.nbytes
        assert len(last) <= 8
    assert sizes[1] == sizes[4]
    chunks = list(chunks_of(long_video, fps=0.5, chunk_frames=16))
    assert sum(len(c) for c in chunks) == 120 and all(len(c) <= 16 for c in chunks)


def test_videochat_long_and_streaming_modes_agree(model, long_video):
    """Loading the first three minutes and streaming the fourth in gives the memory, the prompt and the answer of
    loading all four minutes at once; the conversation survives the appended frames."""
    from vlm.chat import VideoChat

    whole = VideoChat(model, max_new_tokens=4)
    stats = whole.load_long_video(long_video, max_groups=6)
    assert stats.frames == 240 and whole.num_visual_tokens == 24
    expected = whole.ask("What happens?")

    live = VideoChat(model, max_new_tokens=4)
    live.load_long_video(long_video, max_groups=6, end=180.0)
    first = live.ask("What happens?")
    for clip in chunks_of(long_video, fps=1.0, chunk_frames=8, start=180.0):
        live.append_frames(clip)
    assert len(live.history) == 2 and live.history[1].text == first  # the conversation goes on
    live.reset()
    assert live.ask("What happens?") == expected
    with pytest.raises(ValueError, match="load_long_video"):
        VideoChat(model).append_frames(next(chunks_of(long_video)))


def test_word_slot_tracks_keep_every_frames_detections_and_a_fixed_slot(long_video, tmp_path):
    """A tracks-layout word-slot model reads a long video chunk by chunk: its memory holds every frame's detections
    (the same as the whole video's in one pass), its text is the one the connector writes for the whole video, its
    tokens fit the fixed slot, and streaming the last minute in gives the answer of loading it all."""
    from tests.test_word_slots import tiny_slots_model
    from vlm.chat import VideoChat
    from vlm.memory import TrackMemory

    torch.manual_seed(0)
    slots = tiny_slots_model(layout="tracks", text_tokens=40).eval()
    one, _, _ = encode_stream(slots, long_video, chunk_frames=240)  # the whole video at 1 fps in one chunk
    clip = next(chunks_of(long_video, chunk_frames=240))
    pixels, stamps = slots.processor.preprocess_clip(clip)
    with torch.no_grad():
        feats = slots.connector.reduced(slots.tower_features(pixels[None], stamps[None]))
    assert isinstance(one, TrackMemory) and len(one.times) == 240 and one.text == slots.connector.describe(feats)[0]
    slots.connector.configure(layout="story")  # the same memory, told as the story layout tells it
    assert one.text == slots.connector.describe(feats)[0] != ""
    slots.connector.configure(layout="tracks")
    chunked, _, stats = encode_stream(slots, long_video, chunk_frames=8)
    assert stats.chunks == 30 and chunked.times == one.times
    seen = [[(d.cell, d.identity) for d in frame] for frame in chunked.frames]
    assert seen == [[(d.cell, d.identity) for d in frame] for frame in one.frames]  # motion words may differ at chunk edges
    assert 0 < chunked.tokens.shape[0] <= 40

    whole = VideoChat(slots, max_new_tokens=4)
    whole.load_long_video(long_video, chunk_frames=8)
    assert whole.num_visual_tokens == chunked.tokens.shape[0]
    expected = whole.ask("What happens?")
    live = VideoChat(slots, max_new_tokens=4)
    live.load_long_video(long_video, chunk_frames=8, end=184.0)
    for part in chunks_of(long_video, chunk_frames=8, start=184.0):
        live.append_frames(part)
    live.reset()
    assert live.ask("What happens?") == expected

    from evals.judges import build_judge
    from evals.openqa import OpenQAItem, evaluate_openqa

    items = [OpenQAItem(uid=f"q{k}", video=long_video, question=q, answer="a") for k, q in enumerate(["What happens?", "Why?"])]
    result = evaluate_openqa(slots, items, build_judge("contains"), tmp_path / "openqa", max_new_tokens=4, batch_size=1,
                             memory={"max_groups": 1, "fps": 1.0, "chunk_frames": 8}, progress=False)
    assert result.counts["asked"] == 2 and result.settings["memory"]["chunk_frames"] == 8
    preds = [json.loads(line) for line in (tmp_path / "openqa" / "predictions.jsonl").read_text().splitlines()]
    assert preds[0]["pred"] == expected.strip()  # the memory path of the chat, through the harness


def test_time_stamps_name_the_span_of_each_memory_group(long_video):
    torch.manual_seed(0)
    stamped = VideoLLM.from_config({"tower": copy.deepcopy(TINY_TOWERS["clip"]), "llm": copy.deepcopy(TINY_LLM),
                                    "connector": {"name": "mlp", "pool": 2}, "num_frames": 4,
                                    "time_stamps": True}).eval()
    from vlm.chat import VideoChat

    chat = VideoChat(stamped, max_new_tokens=2)
    chat.load_long_video(long_video, max_groups=4, end=120.0)
    text = stamped.processor.tokenizer.decode([i for i in chat._video.slot if i >= 0])
    starts = [s[0] for s in chat._memory.spans]
    assert text.count("Time:") == 4 and all(f"Time: {t:.1f}s" in text for t in starts)


def test_time_encoding_gives_tokens_their_absolute_time(tmp_path):
    """`time_encoding: sinusoid`: starts as a no-op; once trained, the same frame at another second gives other
    tokens, and the same frame at the same second gives the same tokens however many frames surround it."""
    torch.manual_seed(0)
    timed = VideoLLM.from_config({"tower": copy.deepcopy(TINY_TOWERS["clip"]), "llm": copy.deepcopy(TINY_LLM),
                                  "connector": {"name": "mlp", "pool": 2, "time_encoding": "sinusoid"},
                                  "num_frames": 4}).eval()
    frame = torch.randn(1, 3, 32, 32)

    def tokens(frames: int, at: float) -> torch.Tensor:  # `frames` copies of the frame, the last one at `at` s
        stamps = torch.arange(frames, dtype=torch.float32) + (at - frames + 1)
        with torch.no_grad():
            return timed.encode_visual([frame.repeat(frames, 1, 1, 1)], [stamps]).embeds[0][-4:]  # the last frame

    clock = timed.connector.time_encoding
    assert torch.equal(tokens(4, 30.0), tokens(4, 90.0))  # zero-initialised: nothing changes yet
    with torch.no_grad():
        clock.proj.weight.normal_(0, 0.5)
    assert not torch.allclose(tokens(4, 30.0), tokens(4, 90.0))
    torch.testing.assert_close(tokens(4, 30.0), tokens(8, 30.0))
    loaded = VideoLLM.from_pretrained(timed.save_pretrained(tmp_path / "m")).eval()
    torch.testing.assert_close(loaded.connector.time_encoding.proj.weight, clock.proj.weight)
    with pytest.raises(ValueError, match="time_encoding must be"):
        VideoLLM.from_config({"tower": copy.deepcopy(TINY_TOWERS["clip"]), "llm": copy.deepcopy(TINY_LLM),
                              "connector": {"name": "mlp", "time_encoding": "rope"}})


def test_mcq_through_the_memory_reads_every_frame(model, tmp_path):
    """`evaluate_mcq(memory=...)`: with room for every frame the memory holds each frame's tokens unmerged, so the
    scores equal the ordinary path reading the same frames (all 12 at 1 fps); a smaller memory consolidates,
    gives other scores, and the settings are recorded. A missing video is a counted error, not the end."""
    import json

    from evals.mcq import evaluate_mcq
    from tests.eval_helpers import moving_square

    root = tmp_path / "bench"
    (root / "video").mkdir(parents=True)
    write_video(root / "video" / "a.mp4", moving_square((220, 30, 30), frames=12), fps=1.0)
    items = [{"video": v, "question": q, "candidates": ["left", "right", "up"], "answer": "right"}
             for v, q in (("a.mp4", "Which way?"), ("a.mp4", "Where to?"), ("gone.mp4", "Which way?"))]
    (root / "json").mkdir()
    (root / "json" / "md.json").write_text(json.dumps(items))
    (root / "tasks.json").write_text(json.dumps([{"task": "MD", "json": "md.json", "prefix": "video/",
                                                  "data_type": "video", "bound": False}]))

    def scores(out, **kw):
        evaluate_mcq(model, root, tmp_path / out, profile="cloze", workers=0, progress=False, **kw)
        rows = [json.loads(line) for line in (tmp_path / out / "predictions.jsonl").read_text().splitlines()]
        return {r["uid"]: r.get("scores", r.get("error")) for r in rows}

    plain = scores("plain", num_frames=12, sampling="uniform")
    full = scores("full", memory={"max_groups": 12, "fps": 1.0, "chunk_frames": 5})
    small = scores("small", memory={"max_groups": 3})
    for uid in ("MD/0", "MD/1"):
        np.testing.assert_allclose(full[uid], plain[uid], atol=1e-4)
        assert not np.allclose(small[uid], plain[uid], atol=1e-4)
    assert "gone.mp4" in small["MD/2"]
    settings = json.loads((tmp_path / "small" / "results.json").read_text())["settings"]
    assert settings["memory"] == {"max_groups": 3}
    with pytest.raises(ValueError, match="memory"):
        evaluate_mcq(model, root, tmp_path / "bad", memory={"groups": 3}, workers=0)
